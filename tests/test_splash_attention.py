"""Numerics of the splash-attention kernel (model/splash_attention.py) on CPU, in Pallas interpret mode.

The real TPU kernel code runs through the Pallas interpreter, so values and gradients
(splash's own custom VJP) are checked against a dense fp32 reference written here:
einsum scores, a boolean mask built from the attention-kernel Layout contract, softmax.
Shapes are the smallest the kernel accepts (tiles are multiples of 128 even when
interpreted), so each case takes a few seconds on two CPU cores.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ministral_jax.errors import UserError
from ministral_jax.model import splash_attention
from ministral_jax.model.splash_attention import splash_attend


class Layout(NamedTuple):
  """Same fields and meaning as attention_kernels.Layout: token i may attend key j iff
  (not causal or kv_index[j] <= q_index[i]) and q_segment[i] == kv_segment[j]."""
  q_segment: jax.Array | None
  kv_segment: jax.Array | None
  q_index: jax.Array | None
  kv_index: jax.Array | None


# Tolerances. Values: splash's forward is an online softmax in fp32, measured ~1e-7 relative to the
# dense reference here (max 2.1e-7 over these cases); the target is relative error <= 1e-5 (max |err| / max |ref|).
VALUE_RTOL = 1e-5
# Gradients: the backward kernels re-accumulate dq and dk/dv block by block from the saved logsumexp
# (a different summation order and exp(s - lse) instead of softmax), which in interpret mode was
# measured at ~2.7e-5 absolute error in the library survey (here, with conftest's fp32 "highest" matmul
# precision, at most 3.4e-6 over dq, dk and dv). Inputs and the output functional are O(1)
# normals, so gradient entries are O(1) to O(10); an absolute bound of 1e-4 leaves ~4x headroom over
# that measurement while still catching any real bug (a wrong mask, missing scale or wrong head
# mapping gives errors of order 0.1 to 1).
GRAD_ATOL = 1e-4


def dense_reference(q, k, v, layout: Layout, *, causal: bool, scale: float):
  """softmax(scale q k^T + mask) v in fp32 with grouped-query heads; q [b,t,h,d], k/v [b,s,kvh,d]."""
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  q_index = jnp.broadcast_to(jnp.arange(t), (b, t)) if layout.q_index is None else layout.q_index
  kv_index = jnp.broadcast_to(jnp.arange(s), (b, s)) if layout.kv_index is None else layout.kv_index
  q_seg = jnp.zeros((b, t), jnp.int32) if layout.q_segment is None else layout.q_segment
  kv_seg = jnp.zeros((b, s), jnp.int32) if layout.kv_segment is None else layout.kv_segment
  mask = q_seg[:, :, None] == kv_seg[:, None, :]  # [b, t, s]
  if causal:
    mask &= kv_index[:, None, :] <= q_index[:, :, None]
  # Query head h reads kv head h // (h / kvh): repeat each kv head for its group.
  kr = jnp.repeat(k.astype(jnp.float32), h // kvh, axis=2)
  vr = jnp.repeat(v.astype(jnp.float32), h // kvh, axis=2)
  scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kr) * scale
  scores = jnp.where(mask[:, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", probs, vr)


def packed_segments(lengths_per_row, seq):
  """[batch, seq] int32 segment ids for documents of the given lengths packed back to back."""
  rows = []
  for lengths in lengths_per_row:
    assert sum(lengths) == seq
    rows.append(np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)]))
  return jnp.asarray(np.stack(rows))


def random_inputs(batch, seq, heads, kv_heads, head_dim, seed=0):
  kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (batch, seq, heads, head_dim), jnp.float32)
  k = jax.random.normal(kk, (batch, seq, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(kv, (batch, seq, kv_heads, head_dim), jnp.float32)
  w = jax.random.normal(kw, (batch, seq, heads, head_dim), jnp.float32)  # the linear functional's weights
  return q, k, v, w


def check_against_reference(q, k, v, w, seg, *, causal, block):
  scale = q.shape[-1] ** -0.5

  def splash_loss(q, k, v):
    out = splash_attend(q, k, v, seg, seg, causal=causal, scale=scale, block=block, interpret=True)
    return jnp.sum(out * w), out

  def ref_loss(q, k, v):
    out = dense_reference(q, k, v, Layout(seg, seg, None, None), causal=causal, scale=scale)
    return jnp.sum(out * w), out

  (_, out), grads = jax.jit(jax.value_and_grad(splash_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  (_, ref), ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  assert out.shape == q.shape and out.dtype == q.dtype
  value_err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
  grad_errs = {name: float(jnp.max(jnp.abs(g - r))) for name, g, r in zip("qkv", grads, ref_grads)}
  print(f"value rel err {value_err:.2e}; grad abs err " + ", ".join(f"d{n} {e:.2e}" for n, e in grad_errs.items()))
  assert value_err <= VALUE_RTOL, value_err
  for name, err in grad_errs.items():
    assert err <= GRAD_ATOL, (name, err)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (8, 2)], ids=["gqa1", "gqa4"])
def test_packed_causal_matches_dense_reference(heads, kv_heads):
  """3 documents of uneven length per row, crossing the 128-token block boundaries, causal."""
  batch, seq, head_dim = 2, 256, 64
  q, k, v, w = random_inputs(batch, seq, heads, kv_heads, head_dim)
  seg = packed_segments([[100, 61, 95], [30, 170, 56]], seq)
  check_against_reference(q, k, v, w, seg, causal=True, block=128)


def test_unsegmented_single_block_matches_dense_reference():
  """No segment ids (one document), one 128 block chosen by min(block, seq), GQA ratio 2, causal and full."""
  q, k, v, w = random_inputs(1, 128, 4, 2, 64, seed=1)
  check_against_reference(q, k, v, w, None, causal=True, block=512)
  scale = 64 ** -0.5
  out = splash_attend(q, k, v, None, None, causal=False, scale=scale, interpret=True)
  ref = dense_reference(q, k, v, Layout(None, None, None, None), causal=False, scale=scale)
  assert float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))) <= VALUE_RTOL


def test_kernel_is_built_once_and_survives_the_trace_that_built_it():
  """A retrace reuses the cached kernel; a kernel first built inside a jit trace holds no tracers."""
  q, k, v, _ = random_inputs(1, 128, 2, 1, 64, seed=2)
  seg = jnp.zeros((1, 128), jnp.int32)
  splash_attention._kernel.cache_clear()
  call = lambda q, k, v: splash_attend(q, k, v, seg, seg, causal=True, scale=0.125, interpret=True)
  jax.eval_shape(call, q, k, v)  # builds the kernel while tracing
  out = jax.jit(lambda q, k, v: call(q, k, v) * 1.0)(q, k, v)  # a new trace: cache hit, must not leak a tracer
  info = splash_attention._kernel.cache_info()
  assert (info.misses, info.hits) == (1, 1), info
  assert bool(jnp.all(jnp.isfinite(out)))


def test_length_not_multiple_of_block_is_a_user_error():
  q, k, v, _ = random_inputs(1, 384, 2, 1, 64)
  with pytest.raises(UserError, match=r"384 is not a multiple of the attention block 256.*pad the sequence to a "
                     r"multiple of 256.*model\.attention_block=128.*attention_impl='blockwise'"):
    splash_attend(q, k, v, None, None, causal=True, scale=0.125, block=256, interpret=True)
  # Shorter than one block and not a multiple of the 128-lane tile: the fix is to pad to 128.
  q, k, v, _ = random_inputs(1, 96, 2, 1, 64)
  with pytest.raises(UserError, match=r"pad the sequence to a multiple of 128"):
    splash_attend(q, k, v, None, None, causal=True, scale=0.125, block=512, interpret=True)
  # A block the TPU tiles cannot use, even though it divides the sequence.
  q, k, v, _ = random_inputs(1, 256, 2, 1, 64)
  with pytest.raises(UserError, match=r"attention_block=64 is not a multiple of 128"):
    splash_attend(q, k, v, None, None, causal=True, scale=0.125, block=64, interpret=True)
