"""The Pallas GPU (Triton) flash-attention kernel, run in Pallas interpret mode on CPU.

Values and gradients are checked against a dense fp32 reference written here
(einsum, boolean mask, softmax) on packed rows: several documents of uneven
length whose boundaries fall inside kernel tiles, plus trailing padding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ministral_jax.errors import UserError
from ministral_jax.model.gpu_attention import pallas_gpu_attend

BATCH, SEQ = 2, 128
# Document lengths per row (sum 128). Boundaries at 37, 42, 102, ... cut through
# 32- and 64-token tiles; row 1 has a 1-token document and ends in padding
# (segment 0: the padding attends among itself, as the contract says).
DOCS = ([37, 5, 60, 26], [90, 1, 20, 9, 8])
PAD_LAST_ROW = 8

# Errors are relative to the reference's scale: max |kernel - reference| / max |reference|.
# Values: <= 1e-5 in fp32 (measured <= 4e-7).
VALUE_RTOL = 1e-5
# Gradients: the kernel's backward does not differentiate the reference's
# softmax; it recomputes p = exp2(log2(e) * scale * q.k - lse2) from the
# forward's base-2 log-sum-exp and forms dS = P * (dP - delta) with
# delta = rowsum(dO * O) taken from the kernel's own output, then sums ~seq such
# terms per dQ/dK entry, each rounded in fp32 (eps 1.2e-7). Measured here:
# <= 9e-7 relative, <= 4e-6 absolute on gradients of size 2-10 (an earlier
# measurement of interpret-mode backward saw ~1.9e-5 absolute). 1e-5 relative
# is ~10x what this file measures; a masking or GQA-mapping bug shows as O(1).
GRAD_RTOL = 1e-5


def _segment_ids():
  rows = []
  for r, lengths in enumerate(DOCS):
    ids = np.concatenate([np.full(n, d + 1, np.int32) for d, n in enumerate(lengths)])
    if r == len(DOCS) - 1:
      ids[SEQ - PAD_LAST_ROW:] = 0
    assert ids.shape == (SEQ,)
    rows.append(ids)
  return jnp.asarray(np.stack(rows))


def _inputs(heads, kv_heads, head_dim, seed=0):
  kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (BATCH, SEQ, heads, head_dim), jnp.float32)
  k = jax.random.normal(kk, (BATCH, SEQ, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(kv, (BATCH, SEQ, kv_heads, head_dim), jnp.float32)
  w = jax.random.normal(kw, (BATCH, SEQ, heads, head_dim), jnp.float32)  # the linear functional
  return q, k, v, w


def _reference(q, k, v, segment_ids, *, causal, scale):
  """Dense fp32 attention; GQA by grouping query heads (no repeat), mask from the contract."""
  batch, seq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)  # head h = (h // group, h % group)
  logits = jnp.einsum("bikgd,bjkd->bkgij", qg, k, precision="highest") * scale
  i = jnp.arange(seq)[:, None]
  j = jnp.arange(seq)[None, :]
  mask = jnp.ones((batch, seq, seq), bool)
  if segment_ids is not None:
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
  if causal:
    mask = mask & (j <= i)[None]
  logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgij,bjkd->bikgd", weights, v, precision="highest")
  return out.reshape(batch, seq, heads, head_dim)


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _check(heads, kv_heads, head_dim, block, causal, segment_ids):
  q, k, v, w = _inputs(heads, kv_heads, head_dim)
  scale = head_dim ** -0.5

  def kernel(q, k, v):
    return pallas_gpu_attend(q, k, v, segment_ids, causal=causal, scale=scale, block=block, interpret=True)

  def reference(q, k, v):
    return _reference(q, k, v, segment_ids, causal=causal, scale=scale)

  out = jax.jit(kernel)(q, k, v)
  want = reference(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  value_err = _rel_err(out, want)
  assert value_err <= VALUE_RTOL, value_err

  def functional(f):
    return lambda q, k, v: jnp.sum(f(q, k, v) * w)

  grads = jax.jit(jax.grad(functional(kernel), argnums=(0, 1, 2)))(q, k, v)
  want_grads = jax.grad(functional(reference), argnums=(0, 1, 2))(q, k, v)
  for name, g, wg in zip("qkv", grads, want_grads):
    assert g.shape == wg.shape and g.dtype == wg.dtype, name
    grad_err = _rel_err(g, wg)
    assert grad_err <= GRAD_RTOL, (name, grad_err)


# GQA ratio 4 with two kv heads, so that a wrong head mapping (tile instead of repeat) shows.
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)], ids=["ratio1", "ratio4"])
def test_packed_causal_matches_dense(heads, kv_heads):
  _check(heads, kv_heads, head_dim=32, block=32, causal=True, segment_ids=_segment_ids())


def test_packed_causal_block64_head_dim64():
  _check(heads=4, kv_heads=2, head_dim=64, block=64, causal=True, segment_ids=_segment_ids())


def test_packed_bidirectional_matches_dense():
  _check(heads=4, kv_heads=1, head_dim=32, block=64, causal=False, segment_ids=_segment_ids())


def test_no_segment_ids_is_one_document_per_row():
  _check(heads=4, kv_heads=4, head_dim=32, block=64, causal=True, segment_ids=None)


def test_length_not_multiple_of_block_names_the_fix():
  q = jnp.zeros((1, 100, 4, 32))
  kv = jnp.zeros((1, 100, 1, 32))
  with pytest.raises(UserError, match="multiple of 64") as info:
    pallas_gpu_attend(q, kv, kv, jnp.ones((1, 100), jnp.int32), causal=True, scale=1.0, block=64, interpret=True)
  message = str(info.value)
  assert "Pad the sequence to a multiple of 64" in message
  assert "model.attention_block" in message and "attention_impl='blockwise'" in message


def test_bad_shapes_are_user_errors():
  q = jnp.zeros((1, 64, 4, 32))
  kv = jnp.zeros((1, 64, 2, 32))
  with pytest.raises(UserError, match="same length"):  # decode shape: one query against a cache
    pallas_gpu_attend(q[:, :1], kv, kv, None, causal=True, scale=1.0, block=64, interpret=True)
  with pytest.raises(UserError, match="head_dim 8"):
    small = jnp.zeros((1, 64, 4, 8))
    pallas_gpu_attend(small, small, small, None, causal=True, scale=1.0, block=64, interpret=True)
  with pytest.raises(UserError, match="power of two"):
    pallas_gpu_attend(q, kv, kv, None, causal=True, scale=1.0, block=48, interpret=True)
  with pytest.raises(UserError, match="multiple of kv_heads"):
    pallas_gpu_attend(q, jnp.zeros((1, 64, 3, 32)), jnp.zeros((1, 64, 3, 32)), None, causal=True, scale=1.0,
                      block=64, interpret=True)
  with pytest.raises(UserError, match="segment_ids"):
    pallas_gpu_attend(q, kv, kv, jnp.ones((1, 32), jnp.int32), causal=True, scale=1.0, block=64, interpret=True)
