"""The attention kernel, behind one function so that backends can be swapped.

`attend` takes already-rotated queries and keys and a `Layout` (per-token
segment ids and causal indices, never a `[q, kv]` mask). `attention_impl`
picks the kernel:

  blockwise   pure-JAX flash attention with its own VJP (`blockwise_attention.py`):
              any backend, any layout, memory linear in the sequence. The default
              on CPU and the fallback everywhere.
  splash      TPU: JAX's splash-attention Pallas kernel (`splash_attention.py`),
              causal + segment ids, blocks skipped by the mask.
  pallas_gpu  GPU: JAX's Pallas (Triton) flash attention with segment ids
              (`gpu_attention.py`), for packed training sequences.
  cudnn       GPU: cuDNN flash attention through `jax.nn.dot_product_attention`;
              it has no segment ids, so only unpacked causal sequences.
  xla         the dense reference (a `[batch, 1, q, kv]` mask and XLA's softmax):
              small shapes and tests only; its memory is quadratic.

`auto` picks splash on TPU and pallas_gpu / cudnn on GPU where the layout is
the static causal triangle, and blockwise otherwise. On a mesh, the Pallas
kernels run under `shard_map` over the batch and head axes; when the
sequence is sharded over the `context` mesh axis, every kernel call becomes
context-parallel (see `context_parallel.py`).

`MINISTRAL_JAX_PALLAS_INTERPRET=1` runs the Pallas kernels through the Pallas
interpreter on any backend: how their numerics are tested on CPU.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp

from ministral_jax.errors import UserError
from ministral_jax.model import context_parallel
from ministral_jax.model.blockwise_attention import Layout, blockwise_attend, dense_mask
from ministral_jax.model.config import ATTENTION_IMPLS as IMPLS

_BACKENDS = {"splash": ("tpu",), "pallas_gpu": ("gpu",), "cudnn": ("gpu",)}
_PALLAS = ("splash", "pallas_gpu")
_GPU_BLOCK = 128  # Triton tiles beyond 128 rows run out of shared memory at head_dim 128


def interpret_pallas() -> bool:
  return os.environ.get("MINISTRAL_JAX_PALLAS_INTERPRET") == "1"


def check_impl(name: str, backend: str | None = None) -> None:
  """A kernel selected on a backend that lacks it: one error naming the fix, before any work."""
  backend = backend or jax.default_backend()
  if name not in IMPLS:
    raise UserError(f"attention_impl='{name}' is unknown; pick one of {IMPLS}.")
  needs = _BACKENDS.get(name)
  if needs and backend not in needs and not (name in _PALLAS and interpret_pallas()):
    raise UserError(f"attention_impl='{name}' needs a {'/'.join(needs).upper()} backend, and this job runs on "
                    f"'{backend}'. Set model.attention_impl='auto' (it picks the best kernel here) or "
                    "'blockwise' (every backend).")


def resolve_impl(name: str, dtype, layout: Layout, q_len: int, kv_len: int, backend: str | None = None) -> str:
  """'auto' -> the best kernel for this backend, dtype and layout."""
  backend = backend or jax.default_backend()
  if name != "auto":
    check_impl(name, backend)
    return name
  static = layout.q_index is None and layout.kv_index is None and q_len == kv_len
  if backend == "tpu" and static and q_len % 128 == 0:
    return "splash"
  if backend == "gpu" and static and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    if layout.q_segment is None and layout.kv_segment is None:
      return "cudnn"
    if q_len % _GPU_BLOCK == 0:
      return "pallas_gpu"
  return "blockwise"


def _xla(q, k, v, layout: Layout, *, causal: bool, scale: float, block: int) -> jax.Array:
  mask = dense_mask(layout, q.shape[0], q.shape[1], k.shape[1], causal)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def _static_only(name: str, layout: Layout) -> None:
  if layout.q_index is not None or layout.kv_index is not None:
    raise UserError(f"attention_impl='{name}' takes only the static causal pattern (training and prefill "
                    "without a cache, no context parallelism); use attention_impl='auto' or 'blockwise'.")


def _cudnn(q, k, v, layout: Layout, *, causal: bool, scale: float, block: int) -> jax.Array:
  _static_only("cudnn", layout)
  if layout.q_segment is not None or layout.kv_segment is not None:
    raise UserError("attention_impl='cudnn' has no segment ids, so it cannot attend within packed documents; "
                    "use attention_impl='auto' (pallas_gpu on GPU) or 'blockwise'.")
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")


def _splash(q, k, v, layout: Layout, *, causal: bool, scale: float, block: int) -> jax.Array:
  from ministral_jax.model.splash_attention import splash_attend
  _static_only("splash", layout)
  return splash_attend(q, k, v, layout.q_segment, layout.kv_segment, causal=causal, scale=scale, block=block,
                       interpret=interpret_pallas())


def _pallas_gpu(q, k, v, layout: Layout, *, causal: bool, scale: float, block: int) -> jax.Array:
  from ministral_jax.model.gpu_attention import pallas_gpu_attend
  _static_only("pallas_gpu", layout)
  return pallas_gpu_attend(q, k, v, layout.q_segment, causal=causal, scale=scale, block=min(block, _GPU_BLOCK),
                           interpret=interpret_pallas())


def _blockwise(q, k, v, layout: Layout, *, causal: bool, scale: float, block: int) -> jax.Array:
  return blockwise_attend(q, k, v, layout, causal=causal, scale=scale, block=block)


_KERNELS: dict[str, Callable[..., jax.Array]] = {
    "blockwise": _blockwise, "xla": _xla, "cudnn": _cudnn, "splash": _splash, "pallas_gpu": _pallas_gpu}


def attend(q: jax.Array, k: jax.Array, v: jax.Array, layout: Layout, impl: str, causal: bool,
           block: int) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim), masked by `layout`) v with grouped-query heads.

  q `[batch, q_len, heads, head_dim]`; k, v `[batch, kv_len, kv_heads, head_dim]`.
  Query head h reads key/value head h // (heads / kv_heads), as in transformers.
  """
  impl = resolve_impl(impl, q.dtype, layout, q.shape[1], k.shape[1])
  kernel = functools.partial(_KERNELS[impl], causal=causal, scale=q.shape[-1] ** -0.5, block=block)
  plan = context_parallel.current_plan()
  if plan is None or (plan.context is None and impl not in _PALLAS):
    return kernel(q, k, v, layout)  # XLA partitions it like any other op
  if plan.context is not None and impl not in ("blockwise", "xla"):
    raise UserError(f"attention_impl='{impl}' cannot attend over a sequence sharded on the context axis; "
                    "use attention_impl='auto' or 'blockwise' with mesh.context > 1.")
  return context_parallel.sharded_attention(kernel, q, k, v, layout, plan)
