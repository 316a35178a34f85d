"""What a restore checks before it hands weights to a job: every tensor finite and bit-identical to
what was saved.

A checkpoint's writer records one fingerprint per tensor; the reader recomputes
them on the restored arrays and compares. The fingerprint is a position-weighted
sum of the tensor's bits in uint32 arithmetic:

    fp(x) = sum_i bits(x_i) * (2 i + 1)   (mod 2^32),   and a second sum with the bits rotated

Integer addition wraps exactly and is associative, so the value does not depend
on the mesh or the reduction order: a checkpoint saved on 8 devices verifies on
1. Every single flipped bit changes it (2i+1 is odd, so bit * (2i+1) is never
0 mod 2^32), and swapped elements change it through the weights. Both sums run
on the devices holding the shards, in one jitted pass; only scalars reach the host.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ministral_jax.errors import UserError


def _bits(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32, one or more words per element (8-byte dtypes give two)."""
  size = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _index(shape: tuple[int, ...]) -> jax.Array:
  """The flat (row-major) index of every element, mod 2^32, without a 64-bit iota."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  u = _bits(x)
  weight = _index(u.shape) * np.uint32(2) + np.uint32(1)
  rotated = (u << 13) | (u >> 19)
  mixed = weight * np.uint32(0x9E3779B1) | np.uint32(1)
  return jnp.stack([jnp.sum(u * weight, dtype=jnp.uint32), jnp.sum(rotated * mixed, dtype=jnp.uint32)])


def _leaf_finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.array(True)


@functools.partial(jax.jit, static_argnames=())
def _summaries(tree: Any) -> tuple[Any, Any]:
  return jax.tree.map(_leaf_fingerprint, tree), jax.tree.map(_leaf_finite, tree)


def _names(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def summarize(tree: Any) -> tuple[dict[str, str], list[str]]:
  """(fingerprint per tensor name, names of tensors holding NaN or Inf), in one device pass."""
  if not jax.tree.leaves(tree):
    return {}, []
  prints, finite = jax.device_get(_summaries(tree))
  names = _names(tree)
  fps = {n: f"{int(a):08x}{int(b):08x}" for n, (a, b) in zip(names, jax.tree.leaves(prints))}
  bad = [n for n, ok in zip(names, jax.tree.leaves(finite)) if not bool(ok)]
  return fps, bad


def fingerprints(tree: Any) -> dict[str, str]:
  return summarize(tree)[0]


def check_finite(tree: Any, where: str) -> None:
  """An error naming every tensor of `tree` that holds NaN or Inf."""
  bad = summarize(tree)[1]
  if bad:
    raise UserError(f"{where} holds non-finite values (NaN or Inf) in {len(bad)} tensor(s): "
                    f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. The file is damaged or the model "
                    "diverged; use an intact checkpoint.")


def verify(tree: Any, expected: dict[str, str] | None, where: str, allow_non_finite: bool = False) -> None:
  """Checks `tree` is finite (unless `allow_non_finite`) and, when `expected` fingerprints were recorded,
  bit-identical to them."""
  fps, bad = summarize(tree)
  if bad and not allow_non_finite:
    raise UserError(f"{where} holds non-finite values (NaN or Inf) in {len(bad)} tensor(s): "
                    f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. The file is damaged or the model "
                    "diverged; use an intact checkpoint.")
  if expected is None:
    return
  wrong = sorted(n for n, f in fps.items() if expected.get(n) != f)
  missing = sorted(set(expected) - set(fps))
  if wrong or missing:
    names = wrong + [f"{m} (absent)" for m in missing]
    raise UserError(f"{where} is damaged: {len(names)} tensor(s) differ from what was saved "
                    f"({', '.join(names[:8])}{' ...' if len(names) > 8 else ''}). Restore it from a copy, or "
                    "use another checkpoint.")
