"""The TPU attention kernel: JAX's splash-attention Pallas kernel behind the codebase's kernel contract.

Why this file exists: on TPU, XLA's fused softmax(QK^T)V materialises the
`[q_len, kv_len]` score matrix per head, so long packed sequences run out of
memory and time. Splash attention (`jax.experimental.pallas.ops.tpu.
splash_attention`) is a block-sparse flash-attention kernel: it never builds
the score matrix and skips every block the mask rules out (above the causal
diagonal), forward and backward (it has its own custom VJP). `splash_attend`
adapts it to the contract every kernel in `attention_kernels.py` follows:
q `[batch, q_len, heads, head_dim]`, k/v `[batch, kv_len, kv_heads, head_dim]`,
optional segment ids, grouped-query heads (query head h reads kv head
h // (heads // kv_heads)).

What splash needs, and how this file gives it:
  * No q scaling: the kernel computes softmax(q k^T) as is, so q is multiplied
    by `scale` here (in fp32, then cast back to q's dtype).
  * No native grouped-query attention: the kernel is either MHA (one kv head per
    q head) or MQA (one kv head for all q heads). GQA is the MQA form per kv
    head: q is reshaped to `[kv_heads, group, q_len, head_dim]` and an MQA
    kernel over `group` heads is vmapped over kv heads and then over the batch.
  * Static masks: the mask (`CausalMask` or `FullMask`) is a numpy-level object
    turned into block-sparsity tables when the kernel is built, so only the
    static causal triangle with `q_index = arange(q_len)`, `kv_index =
    arange(kv_len)` is supported; packing goes through `SegmentIds`, which are
    ordinary traced arrays. Building the tables costs host time, so the built
    kernel is cached per (shapes, causal, blocks, interpret) and a jit retrace
    reuses it.
  * Block sizes: the kernel tiles q and kv into blocks that must divide the
    sequence lengths and be multiples of 128 (the TPU lane width). The shipped
    kernel enforces 128 even in interpret mode (`block_kv_compute must be a
    multiple of 128`, and the dkv pass needs it for block_q), so there is no
    smaller-block escape for tests: the smallest usable sequence is 128. Both
    conditions are checked before the kernel is built and reported as a
    `UserError` that names the fix.

The kernel is single-device: `splash_attend` runs on whatever arrays it is
given. On a mesh the caller wraps it in `shard_map` over the batch and heads
axes (heads sharded in whole kv-head groups, i.e. kv_heads divisible by the
head shards); the sequence axes must be unsharded inside the map.

Tests (`tests/test_splash_attention.py`) run the real kernel on CPU with
`interpret=True` (Pallas interpret mode) and compare values and gradients with
a dense fp32 reference, for packed segments and GQA ratios 1 and 4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from ministral_jax.errors import UserError

LANES = 128  # splash tiles must be multiples of the TPU lane width, also in interpret mode


def _block_for(length: int, block: int, what: str) -> int:
  """min(block, length), after checking the kernel can tile `length` with it."""
  if block <= 0:
    raise UserError(f"Splash attention: model.attention_block is {block}; set it to a positive multiple of "
                    f"{LANES} (e.g. 512).")
  b = min(block, length)
  fixes = "or set attention_impl='blockwise' (or 'xla'), which takes any length"
  if b % LANES:
    if b == length:  # the sequence is shorter than the block and not a multiple of 128
      raise UserError(f"Splash attention: the {what} length {length} is not a multiple of {LANES}, which the kernel's "
                      f"tiles need; pad the sequence to a multiple of {LANES}, {fixes}.")
    raise UserError(f"Splash attention: model.attention_block={block} is not a multiple of {LANES}, which the "
                    f"kernel's tiles need; set model.attention_block to a multiple of {LANES} (e.g. 512), {fixes}.")
  if length % b:
    divisors = [c for c in range(b - LANES, 0, -LANES) if length % c == 0]
    smaller = f", set model.attention_block={divisors[0]} (it divides {length})" if divisors else ""
    raise UserError(f"Splash attention: the {what} length {length} is not a multiple of the attention block {b}; "
                    f"pad the sequence to a multiple of {b}{smaller}, {fixes}.")
  return b


@functools.lru_cache(maxsize=64)
def _kernel(q_len: int, kv_len: int, group: int, causal: bool, block_q: int, block_kv: int, interpret: bool):
  """The MQA splash kernel for `group` query heads sharing one kv head; built once per static configuration."""
  shape = (q_len, kv_len)
  # CausalMask with offset 0 allows kv position j for query i iff j <= i: q_index = arange(q_len),
  # kv_index = arange(kv_len), which is the only causal layout splash can express statically.
  head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  mask = splash.MultiHeadMask([head_mask] * group)
  sizes = splash.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
      block_q_dq=block_q, block_kv_dq=block_kv)
  # The maker turns the numpy mask tables into arrays with jnp.array; keep them concrete when the first
  # build happens inside a jit trace, so the cached kernel does not hold a tracer from that trace.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attend(q: jax.Array, k: jax.Array, v: jax.Array, q_segment: jax.Array | None,
                  kv_segment: jax.Array | None, *, causal: bool, scale: float, block: int = 512,
                  interpret: bool = False) -> jax.Array:
  """softmax(scale * q k^T, masked) v through the splash-attention kernel, with grouped-query heads.

  q `[batch, q_len, heads, head_dim]`; k, v `[batch, kv_len, kv_heads, head_dim]`; q_segment
  `[batch, q_len]` and kv_segment `[batch, kv_len]` int32 or None (None: one segment; if only one side
  is given the other is taken as all zeros). Token i attends key j iff (not causal or j <= i) and
  q_segment[i] == kv_segment[j]; every query must be able to attend at least one key (true for causal
  self-attention). `block` is the tile size for q and kv (min(block, length) is used); `interpret`
  runs the Pallas kernel in interpret mode (CPU tests). Returns `[batch, q_len, heads, head_dim]` in
  q's dtype. Differentiable w.r.t. q, k and v (splash's custom VJP).
  """
  batch, q_len, heads, head_dim = q.shape
  if k.ndim != 4 or k.shape[0] != batch or k.shape[3] != head_dim or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"splash_attend: expected k, v [batch, kv_len, kv_heads, {head_dim}] with batch {batch}; "
                     f"got k {k.shape}, v {v.shape} for q {q.shape}.")
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"splash_attend: {heads} query heads are not a multiple of {kv_heads} kv heads.")
  group = heads // kv_heads
  block_q = _block_for(q_len, block, "query")
  block_kv = _block_for(kv_len, block, "key/value")
  kernel = _kernel(q_len, kv_len, group, bool(causal), block_q, block_kv, bool(interpret))

  # [b, t, kvh*g, d] -> [b, kvh, g, t, d]: head h = kv_head * group + g, as in the GQA contract.
  qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
  qs = qs.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
  ks = k.transpose(0, 2, 1, 3)  # [b, kvh, s, d]
  vs = v.transpose(0, 2, 1, 3)

  if q_segment is None and kv_segment is None:
    def one_head(qh, kh, vh):  # qh [g, t, d], kh/vh [s, d]
      return kernel(qh, kh, vh)
    per_row = jax.vmap(one_head, in_axes=(0, 0, 0))
    out = jax.vmap(per_row, in_axes=(0, 0, 0))(qs, ks, vs)
  else:
    qseg = (jnp.zeros((batch, q_len), jnp.int32) if q_segment is None else q_segment.astype(jnp.int32))
    kvseg = (jnp.zeros((batch, kv_len), jnp.int32) if kv_segment is None else kv_segment.astype(jnp.int32))

    def one_head_seg(qh, kh, vh, sq, skv):
      return kernel(qh, kh, vh, segment_ids=splash.SegmentIds(q=sq, kv=skv))
    per_row = jax.vmap(one_head_seg, in_axes=(0, 0, 0, None, None))  # segments are shared by the kv heads
    out = jax.vmap(per_row, in_axes=(0, 0, 0, 0, 0))(qs, ks, vs, qseg, kvseg)

  # [b, kvh, g, t, d] -> [b, t, heads, d]
  out = out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, v.shape[-1])
  return out.astype(q.dtype)
