"""Chunked losses equal the full-logit ones, in value and gradient, and use far less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ministral_jax.train import losses

B, T, D_S, D_T, V = 2, 37, 24, 40, 203  # T and V not multiples of the chunks below
CHUNKS = dict(seq_chunk=8, vocab_chunk=64)


@pytest.fixture(scope="module")
def case():
  k = jax.random.split(jax.random.key(0), 6)
  mask = (jax.random.uniform(k[5], (B, T)) > 0.3).astype(jnp.float32)
  return dict(hs=jax.random.normal(k[0], (B, T, D_S)), ws=jax.random.normal(k[1], (D_S, V)) * 0.3,
              ht=jax.random.normal(k[2], (B, T, D_T)), wt=jax.random.normal(k[3], (D_T, V)) * 0.3,
              targets=jax.random.randint(k[4], (B, T), 0, V), mask=mask)


def _assert_close(a, b):
  # fp32 sums over ~50 tokens x 203 classes, reassociated by chunking: ~1e-6 relative.
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_value_and_gradients_equal_the_naive_ones(case):
  def run(fn, **kw):
    f = lambda h, w: fn(h, w, case["targets"], case["mask"], **kw)[0]
    return jax.value_and_grad(f, argnums=(0, 1))(case["hs"], case["ws"])
  (v1, g1), (v2, g2) = run(losses.cross_entropy, **CHUNKS), run(losses.naive_cross_entropy)
  _assert_close(v1, v2)
  for a, b in zip(g1, g2):
    _assert_close(a, b)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kd_value_and_student_gradients_equal_the_naive_ones(case, temperature):
  def run(fn, **kw):
    f = lambda h, w: fn(h, w, case["ht"], case["wt"], case["mask"], temperature=temperature, **kw)[0]
    return jax.value_and_grad(f, argnums=(0, 1))(case["hs"], case["ws"])
  (v1, g1), (v2, g2) = run(losses.kd_loss, **CHUNKS), run(losses.naive_kd_loss)
  _assert_close(v1, v2)
  for a, b in zip(g1, g2):
    _assert_close(a, b)


def test_teacher_gets_no_gradient_and_kl_with_itself_is_zero(case):
  g = jax.grad(lambda ht, wt: losses.kd_loss(case["hs"], case["ws"], ht, wt, case["mask"], **CHUNKS)[0],
               argnums=(0, 1))(case["ht"], case["wt"])
  assert all(float(jnp.abs(x).max()) == 0 for x in g)
  self_kl, _ = losses.kd_loss(case["hs"], case["ws"], case["hs"], case["ws"], case["mask"], **CHUNKS)
  assert abs(float(self_kl)) < 1e-4
  kl, count = losses.kd_loss(case["hs"], case["ws"], case["ht"], case["wt"], case["mask"], **CHUNKS)
  assert float(kl) > 0 and float(count) == float(case["mask"].sum())


def test_masked_tokens_contribute_nothing(case):
  changed = case["hs"].at[:, :].add(jnp.where(case["mask"][..., None] == 0, 100.0, 0.0))
  for fn in (lambda h: losses.cross_entropy(h, case["ws"], case["targets"], case["mask"], **CHUNKS),
             lambda h: losses.kd_loss(h, case["ws"], case["ht"], case["wt"], case["mask"], **CHUNKS)):
    _assert_close(fn(changed)[0], fn(case["hs"])[0])


def test_teacher_with_another_vocabulary_is_rejected(case):
  with pytest.raises(ValueError, match=r"Student vocabulary \(203\) != teacher vocabulary \(200\)"):
    losses.kd_loss(case["hs"], case["ws"], case["ht"], case["wt"][:, :200], case["mask"])


def test_chunked_kd_backward_needs_a_fraction_of_the_naive_memory():
  hs = jax.ShapeDtypeStruct((1, 512, 256), jnp.float32)
  w = jax.ShapeDtypeStruct((256, 32768), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 512), jnp.float32)

  def temp_bytes(fn, **kw):
    f = jax.grad(lambda h, w, ht, wt, m: fn(h, w, ht, wt, m, **kw)[0], argnums=(0, 1))
    return jax.jit(f).lower(hs, w, hs, w, mask).compile().memory_analysis().temp_size_in_bytes
  chunked = temp_bytes(losses.kd_loss, seq_chunk=128, vocab_chunk=4096)
  naive = temp_bytes(losses.naive_kd_loss)
  assert chunked < 0.25 * naive, (chunked, naive)
