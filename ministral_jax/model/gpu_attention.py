"""Flash attention on NVIDIA GPUs for packed sequences: JAX's Pallas (Triton) kernel, with segment ids.

Why this kernel. Training packs several documents into one row, so attention
needs segment ids (token i sees key j only inside its own document) on top of
the causal triangle. A dense `[batch, 1, seq, seq]` boolean mask is quadratic
in memory; a segment-id kernel is linear. The alternatives on GPU fall short:
`jax.nn.dot_product_attention` (cuDNN) takes no segment ids in its public API
-- cuDNN's packed layout is reachable only through the private
`jax._src.cudnn.fused_attention_stablehlo` with q/kv offsets, which may change
under us at any jax release -- and tokamax's newest versions need Python >= 3.12
(this codebase runs 3.11). JAX ships a Triton flash attention with segment ids,
`jax.experimental.pallas.ops.gpu.attention.mha`, with a custom VJP whose
backward is also a Triton kernel; this module wraps it.

Contract (shared by every attention kernel here): token i may attend to key j
iff (not causal or j <= i) and segment_ids[i] == segment_ids[j]. Queries and
keys have the same length (training and prefill); decoding against a KV cache
goes through attention_impl='blockwise'. Every query sees at least itself, so
no row is fully masked (mha masks with a large finite negative, and a fully
masked row would come out as a uniform average instead of zeros).

Grouped-query attention. `mha` has no GQA, so k and v are repeated along the
head axis (`jnp.repeat`; its transpose sums the gradients of each group back
onto the shared kv head): query head h reads kv head h // (heads // kv_heads).
This costs heads/kv_heads times the K/V memory (and HBM reads) of the
un-repeated tensors -- still linear in the sequence length, unlike a dense mask.

Constraints, checked before anything is built (`UserError`):
* seq must be a multiple of `block` (the forward q and kv tile). The backward
  kernels use tiles of min(block, 32), JAX's default for them (the fused dK/dV
  + dQ kernel keeps more accumulators live than the forward one); the fused
  backward needs the same tile for q and kv, which equal lengths guarantee.
* `block` must be a power of two >= 16: Triton tensors have power-of-two
  shapes, and its tensor-core dot wants every dimension >= 16.
* head_dim >= 16, for the same dot reason. head_dim need NOT be a power of two:
  mha pads the head tile to the next power of two with masked loads and stores
  (head_dim 48 computes on 64 lanes, 25% wasted); 64/128/256 waste nothing.
  Large head_dim with large blocks may run out of registers or shared memory
  in Triton; lower `block` if compilation fails that way.
* q, k and v share one dtype and head_dim; heads is a multiple of kv_heads.

Precision. Inside the kernel, dots of fp32 inputs lower to Triton TF32 unless
jax_default_matmul_precision is 'highest' (then IEEE fp32); bf16/fp16 inputs
accumulate in fp32. The softmax statistics are always fp32.

Sharding. A pallas_call is not partitioned by GSPMD: run this function under
`jax.shard_map` over the batch and heads mesh axes (the caller does that). With
heads split n ways, kv_heads must split the same n ways so that each shard's
local query head h still reads local kv head h // (heads / kv_heads).

Testing. `interpret=True` runs the same kernels through the Pallas interpreter
on any backend; tests/test_gpu_attention.py checks values and gradients that
way on CPU against a dense reference (no environment flags needed). The kernel
has NOT yet been compiled or measured on a GPU (none was available): its speed,
its Triton compilation for our shapes, and the block choice are unverified.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_attention

from ministral_jax.errors import UserError

MIN_TILE = 16  # Triton's tensor-core dot: M, N, K >= 16
BACKWARD_BLOCK = 32  # JAX's default tile for the backward kernels (BlockSizes.get_default)


def _check_inputs(q, k, v, segment_ids, block: int) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise UserError(f"Pallas GPU attention takes q, k, v of rank 4 [batch, seq, heads, head_dim]; got q {q.shape}, "
                    f"k {k.shape}, v {v.shape}.")
  batch, q_len, heads, head_dim = q.shape
  if k.shape != v.shape:
    raise UserError(f"Pallas GPU attention: k {k.shape} and v {v.shape} must have the same shape.")
  k_batch, kv_len, kv_heads, k_head_dim = k.shape
  if k_batch != batch:
    raise UserError(f"Pallas GPU attention: q has batch {batch} but k/v have batch {k_batch}.")
  if kv_len != q_len:
    raise UserError(f"Pallas GPU attention needs queries and keys of the same length (training/prefill); got "
                    f"q length {q_len} and k/v length {kv_len}. Decoding against a KV cache goes through "
                    "attention_impl='blockwise'.")
  if k_head_dim != head_dim:
    raise UserError(f"Pallas GPU attention: q head_dim {head_dim} differs from k/v head_dim {k_head_dim}.")
  if kv_heads == 0 or heads % kv_heads:
    raise UserError(f"Pallas GPU attention: heads {heads} must be a multiple of kv_heads {kv_heads} "
                    "(grouped-query attention).")
  if not (q.dtype == k.dtype == v.dtype):
    raise UserError(f"Pallas GPU attention: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
  if head_dim < MIN_TILE:
    raise UserError(f"Pallas GPU attention: head_dim {head_dim} is below {MIN_TILE}, the smallest dot Triton's "
                    "tensor cores take; use attention_impl='blockwise' for this model.")
  if block < MIN_TILE or block & (block - 1):
    raise UserError(f"Pallas GPU attention: block {block} must be a power of two >= {MIN_TILE} (Triton tiles); "
                    "set model.attention_block to 64 or 128.")
  if q_len % block:
    padded = -(-q_len // block) * block
    raise UserError(f"Pallas GPU attention: sequence length {q_len} is not a multiple of the attention block "
                    f"{block}. Pad the sequence to a multiple of {block} (here {padded}), or set "
                    f"model.attention_block to a power of two >= {MIN_TILE} that divides {q_len}, or use "
                    "attention_impl='blockwise'.")
  if segment_ids is not None:
    if tuple(segment_ids.shape) != (batch, q_len):
      raise UserError(f"Pallas GPU attention: segment_ids has shape {tuple(segment_ids.shape)}; expected "
                      f"[batch, seq] = {(batch, q_len)}.")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise UserError(f"Pallas GPU attention: segment_ids must be integers; got {segment_ids.dtype}.")


def pallas_gpu_attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *, causal: bool,
                      scale: float, block: int = 128, interpret: bool = False) -> jax.Array:
  """softmax(scale * q k^T, masked) v by the Pallas Triton flash-attention kernel.

  q `[batch, seq, heads, head_dim]`; k, v `[batch, seq, kv_heads, head_dim]`
  (same seq as q); segment_ids `[batch, seq]` integers, or None for one
  document per row. Token i attends to key j iff (not causal or j <= i) and
  segment_ids[:, i] == segment_ids[:, j]. Query head h reads kv head
  h // (heads // kv_heads); k/v are repeated to `heads` heads for the kernel,
  which costs heads/kv_heads times their memory, still linear in seq.
  `block` is the forward tile along q and kv (seq must be a multiple of it);
  `interpret=True` runs the Pallas interpreter instead of Triton (any backend).
  Differentiable w.r.t. q, k, v (mha's custom VJP; Triton backward kernels).
  Returns q's shape and dtype.
  """
  _check_inputs(q, k, v, segment_ids, block)
  heads, kv_heads = q.shape[2], k.shape[2]
  group = heads // kv_heads
  if group > 1:
    k = jnp.repeat(k, group, axis=2)
    v = jnp.repeat(v, group, axis=2)
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  backward = min(block, BACKWARD_BLOCK)
  block_sizes = pallas_gpu_attention.BlockSizes(
      block_q=block, block_k=block,
      block_q_dkv=backward, block_kv_dkv=backward, block_q_dq=backward, block_kv_dq=backward)
  return pallas_gpu_attention.mha(q, k, v, segment_ids, sm_scale=float(scale), causal=bool(causal),
                                  block_sizes=block_sizes, interpret=bool(interpret))
