"""The attention kernel, behind one function so that backends can be swapped.

`attend` takes already-rotated queries and keys and a boolean mask. It goes
through `jax.nn.dot_product_attention`: on GPUs with bf16/fp16 inputs that is
cuDNN flash attention, elsewhere XLA's fused softmax(QK^T)V.

Where the TPU splash-attention kernel plugs in: register a function with
`register_attention_impl("splash", fn)`, where `fn(q, k, v, mask, scale)` has
the same contract as `_jax_attention` below. The natural implementation wraps
`jax.experimental.pallas.ops.tpu.splash_attention.make_splash_mha` with a
`CausalMask` (training) and segment ids taken from the mask's block structure,
inside a `shard_map` over the batch and heads mesh axes. It is not built here
because nothing on a CPU machine can run or test it; selecting an impl that is
not registered is an error that lists the registered ones.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ministral_jax.errors import UserError

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, float], jax.Array]
_IMPLS: dict[str, AttentionFn] = {}


def register_attention_impl(name: str, fn: AttentionFn) -> None:
  _IMPLS[name] = fn


def resolve_impl(name: str, dtype) -> str:
  """'auto' picks cuDNN flash attention on GPU for half-precision inputs."""
  if name != "auto":
    return name
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str,
           causal: bool) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim), masked) v with grouped-query heads.

  q `[batch, q_len, heads, head_dim]`; k, v `[batch, kv_len, kv_heads, head_dim]`;
  mask `[batch, 1, q_len, kv_len]` bool (True = may attend); `causal` says the
  mask already contains the causal triangle, which lets cuDNN skip those blocks.
  Query head h reads key/value head h // (heads / kv_heads), as in transformers.
  """
  impl = resolve_impl(impl, q.dtype)
  scale = q.shape[-1] ** -0.5
  if impl in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl,
                                        is_causal=causal and impl == "cudnn")
  if impl not in _IMPLS:
    raise UserError(f"Attention implementation '{impl}' is not available. Built in: 'auto', 'xla', "
                     f"'cudnn'; registered: {sorted(_IMPLS)} (see model/attention_kernels.py).")
  return _IMPLS[impl](q, k, v, mask, scale)
