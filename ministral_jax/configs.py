"""Experiment config files (`configs/<name>.py[:arg]`) loaded outside the command line:
by the launchers (their sweeps), the notebooks and the tests."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import ml_collections

from ministral_jax.errors import UserError


def load_module(path: str) -> ModuleType:
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.exists(path):
    raise UserError(f"Cannot load config file {path!r}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> its `get_config(arg)` (as `--config=` would give it)."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  return module.get_config(arg) if arg else module.get_config()
