"""Hyper-parameter sweeps declared by an experiment config, as big_vision and the Flax examples do.

A config file may define, next to `get_config(arg)`:

    def get_hyper(h):
      return h.product([h.sweep("optimizer.lr", [1e-3, 3e-3]), h.sweep("seed", [0, 1])])

`h` is this module: `sweep` lists one field's values, `product` crosses
sweeps, `zip` pairs them element by element, `chain` concatenates them. The
result is a list of override dicts (field path -> value; a leading "config."
is allowed); every launcher turns each into one job, with its own workdir
named after its overrides (`run_name`) and the overrides as flags.
"""

from __future__ import annotations

import builtins
import inspect
import itertools
import re
from typing import Any, Iterable, Sequence

from ministral_jax import configs
from ministral_jax.errors import UserError

Point = dict[str, Any]


def sweep(name: str, values: Iterable[Any]) -> list[Point]:
  return [{_field(name): v} for v in values]


def product(sweeps: Sequence[list[Point]]) -> list[Point]:
  return [_merge(combo) for combo in itertools.product(*sweeps)]


def zip(sweeps: Sequence[list[Point]]) -> list[Point]:  # noqa: A001 (the name big_vision users know)
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise UserError(f"zip needs sweeps of one length, got lengths {sorted(lengths)}.")
  return [_merge(combo) for combo in builtins.zip(*sweeps)]


def chain(sweeps: Sequence[list[Point]]) -> list[Point]:
  return [point for s in sweeps for point in s]


def _field(name: str) -> str:
  return name[len("config."):] if name.startswith("config.") else name


def _merge(points: Iterable[Point]) -> Point:
  out: Point = {}
  for p in points:
    clash = set(out) & set(p)
    if clash:
      raise UserError(f"A sweep sets {sorted(clash)} twice in one point.")
    out.update(p)
  return out


def load_points(config: str) -> list[Point]:
  """The points of `path/to/config.py[:arg]` (one empty point when it declares no sweep)."""
  path, _, arg = config.partition(":")
  module = configs.load_module(path)
  if not hasattr(module, "get_hyper"):
    return [{}]
  import ministral_jax.sweep as h
  takes_arg = len(inspect.signature(module.get_hyper).parameters) > 1
  points = module.get_hyper(h, arg) if takes_arg else module.get_hyper(h)
  if not points:
    raise UserError(f"{path}: get_hyper returned no points.")
  return [dict(p) for p in points]


def run_name(point: Point) -> str:
  """A path-safe name that says the point's overrides, e.g. `optimizer.lr=0.001,seed=1`."""
  if not point:
    return "default"
  text = ",".join(f"{k}={_value(v)}" for k, v in point.items())
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def flags(point: Point) -> list[str]:
  """The point as command-line overrides of `ministral_jax.main`."""
  return [f"--config.{k}={_value(v)}" for k, v in point.items()]


def _value(v: Any) -> str:
  return repr(v) if isinstance(v, (tuple, list)) else str(v)
