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


def after_sft_stage(config_file: str, sft_arg: str,
                    blocks: tuple[str, ...] = ("model", "mesh", "loss", "eval", "data")) -> ml_collections.ConfigDict:
  """The start of a config for a job that begins from an SFT model it can make itself (GRPO, DPO): the
  `sft_tiny.py:<sft_arg>` config beside `config_file` as its `sft_stage`, and copies of the `blocks` both use."""
  stage = load(os.path.join(os.path.dirname(os.path.abspath(config_file)), "sft_tiny.py") + f":{sft_arg}")
  c = ml_collections.ConfigDict({"seed": 0, "init_from": "", "sft_stage": stage})
  for block in blocks:
    c[block] = stage[block].to_dict()
  return c
