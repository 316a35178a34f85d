"""Chunked losses equal the full-logit ones, in value and gradient, and use far less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ministral_jax.train import losses

B, T, D_S, D_T, V = 2, 37, 24, 40, 203  # T and V not multiples of the chunks; teacher wider
CHUNKS = dict(seq_chunk=8, vocab_chunk=64)


@pytest.fixture(scope="module")
def case():
  k = jax.random.split(jax.random.key(0), 6)
  mask = (jax.random.uniform(k[5], (B, T)) > 0.3).astype(jnp.float32)
  return dict(hs=jax.random.normal(k[0], (B, T, D_S)), ws=jax.random.normal(k[1], (D_S, V)) * 0.3,
              ht=jax.random.normal(k[2], (B, T, D_T)), wt=jax.random.normal(k[3], (D_T, V)) * 0.3,
              targets=jax.random.randint(k[4], (B, T), 0, V), mask=mask)


def _assert_close(a, b):
  # fp32 (conftest: highest matmul precision). Chunking only reassociates sums
  # of <= 203 classes and <= 74 tokens, and the KL is a difference of O(10)
  # terms per token: errors ~1e-6 relative at worst, so 1e-5 is well above them.
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _value_and_student_grads(fn, c, *teacher_and_targets, **kw):
  f = lambda h, w: fn(h, w, *teacher_and_targets, c["mask"], **kw)[0]
  return jax.value_and_grad(f, argnums=(0, 1))(c["hs"], c["ws"])


def _assert_same_value_and_grads(got, want):
  _assert_close(got[0], want[0])
  for a, b in zip(got[1], want[1]):
    _assert_close(a, b)


@pytest.mark.parametrize("chunks", [CHUNKS, dict(seq_chunk=64, vocab_chunk=1024)], ids=["uneven", "one_chunk"])
def test_chunked_cross_entropy_value_and_gradients_equal_the_naive_ones(case, chunks):
  got = _value_and_student_grads(losses.cross_entropy, case, case["targets"], **chunks)
  want = _value_and_student_grads(losses.naive_cross_entropy, case, case["targets"])
  _assert_same_value_and_grads(got, want)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kd_value_and_student_gradients_equal_the_naive_ones(case, temperature):
  teacher = (case["ht"], case["wt"])
  got = _value_and_student_grads(losses.kd_loss, case, *teacher, temperature=temperature, **CHUNKS)
  want = _value_and_student_grads(losses.naive_kd_loss, case, *teacher, temperature=temperature)
  _assert_same_value_and_grads(got, want)


def test_kd_with_ce_is_the_alpha_mix_of_kl_and_ce_in_value_and_gradients(case):
  alpha, t = 0.3, 2.0

  def naive_mix(h, w, ht, wt, targets, mask):
    kl = losses.naive_kd_loss(h, w, ht, wt, mask, temperature=t)[0]
    return alpha * kl + (1 - alpha) * losses.naive_cross_entropy(h, w, targets, mask)[0], None
  teacher = (case["ht"], case["wt"], case["targets"])
  got = _value_and_student_grads(losses.kd_with_ce, case, *teacher, alpha=alpha, temperature=t, **CHUNKS)
  _assert_same_value_and_grads(got, _value_and_student_grads(naive_mix, case, *teacher))
  _, count, parts = losses.kd_with_ce(case["hs"], case["ws"], *teacher, case["mask"], alpha=alpha,
                                      temperature=t, **CHUNKS)
  _assert_close(parts["kl"], losses.kd_loss(case["hs"], case["ws"], case["ht"], case["wt"], case["mask"],
                                            temperature=t, **CHUNKS)[0])
  assert float(count) == float(case["mask"].sum())
  kl_only = losses.kd_with_ce(case["hs"], case["ws"], *teacher, case["mask"], **CHUNKS)
  assert set(kl_only[2]) == {"kl"}  # alpha = 1 (default): the CE is not computed


def test_the_kl_is_multiplied_by_t_squared_unless_told_not_to(case):
  args = (case["hs"], case["ws"], case["ht"], case["wt"], case["mask"])
  scaled = losses.kd_loss(*args, temperature=2.0, **CHUNKS)[0]
  plain = losses.kd_loss(*args, temperature=2.0, scale_by_t2=False, **CHUNKS)[0]
  _assert_close(scaled, 4.0 * plain)


def test_the_teacher_gets_zero_gradient(case):
  def grads(fn, *extra, **kw):
    f = lambda ht, wt: fn(case["hs"], case["ws"], ht, wt, *extra, case["mask"], **kw, **CHUNKS)[0]
    return jax.grad(f, argnums=(0, 1))(case["ht"], case["wt"])
  for g in (*grads(losses.kd_loss, temperature=2.0), *grads(losses.kd_with_ce, case["targets"], alpha=0.5)):
    assert float(jnp.abs(g).max()) == 0.0


def test_kl_of_a_model_with_itself_is_zero_and_every_token_kl_is_nonnegative(case):
  self_kl, _ = losses.kd_loss(case["hs"], case["ws"], case["hs"], case["ws"], case["mask"], **CHUNKS)
  assert abs(float(self_kl)) < 1e-5
  one_token_masks = jnp.eye(B * T).reshape(B * T, B, T)  # per-token KL through the public API
  per_token = jax.vmap(lambda m: losses.kd_loss(case["hs"], case["ws"], case["ht"], case["wt"], m,
                                                temperature=2.0, **CHUNKS)[0])(one_token_masks)
  assert float(per_token.min()) >= -1e-6 and float(per_token.max()) > 0.01


def test_masked_tokens_contribute_nothing(case):
  masked = case["mask"] == 0
  junk = lambda x: jnp.where(masked[..., None], 1e3, x)  # huge logits at masked positions
  changed = dict(case, hs=junk(case["hs"]), ht=junk(case["ht"]), targets=jnp.where(masked, 0, case["targets"]))
  for fn in (lambda c: _value_and_student_grads(losses.cross_entropy, c, c["targets"], **CHUNKS),
             lambda c: _value_and_student_grads(losses.kd_loss, c, c["ht"], c["wt"], **CHUNKS)):
    (v1, (dh1, dw1)), (v2, (dh2, dw2)) = fn(case), fn(changed)
    _assert_close(v1, v2)
    _assert_close(dw1, dw2)
    _assert_close(jnp.where(masked[..., None], 0.0, dh1), dh2)
    assert float(jnp.abs(jnp.where(masked[..., None], dh2, 0.0)).max()) == 0.0


def test_a_teacher_with_another_vocabulary_is_rejected(case):
  with pytest.raises(ValueError, match=r"Student vocabulary \(203\) != teacher vocabulary \(200\)"):
    losses.kd_loss(case["hs"], case["ws"], case["ht"], case["wt"][:, :200], case["mask"])


def test_bfloat16_hidden_states_give_the_naive_bfloat16_loss(case):
  hs = case["hs"].astype(jnp.bfloat16)
  got = losses.kd_loss(hs, case["ws"], case["ht"].astype(jnp.bfloat16), case["wt"], case["mask"], **CHUNKS)[0]
  want = losses.naive_kd_loss(hs, case["ws"], case["ht"].astype(jnp.bfloat16), case["wt"], case["mask"])[0]
  ce = losses.cross_entropy(hs, case["ws"], case["targets"], case["mask"], **CHUNKS)[0]
  # Same bf16 matmul inputs, fp32 accumulation and statistics: only the summation order differs.
  np.testing.assert_allclose([got, ce], [want, losses.naive_cross_entropy(hs, case["ws"], case["targets"],
                                                                           case["mask"])[0]], rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("loss", ["ce", "kd"])
def test_chunked_backward_needs_under_a_tenth_of_the_naive_temp_memory(loss, dtype):
  # bf16 hidden and head, as the trainer passes them, also guards against XLA
  # hoisting a converted fp32 copy of the whole head out of the chunk loop.
  s = jax.ShapeDtypeStruct
  hidden, head, mask = s((1, 512, 256), dtype), s((256, 32768), dtype), s((1, 512), jnp.float32)
  other = (s((1, 512), jnp.int32),) if loss == "ce" else (hidden, head)
  chunked_fn, naive_fn = ((losses.cross_entropy, losses.naive_cross_entropy) if loss == "ce"
                          else (losses.kd_loss, losses.naive_kd_loss))

  def temp_bytes(fn, **kw):
    f = jax.grad(lambda h, w, *rest: fn(h, w, *rest, **kw)[0], argnums=(0, 1))
    return jax.jit(f).lower(hidden, head, *other, mask).compile().memory_analysis().temp_size_in_bytes
  chunked, naive = temp_bytes(chunked_fn, seq_chunk=128, vocab_chunk=4096), temp_bytes(naive_fn)
  assert naive >= 512 * 32768 * 4  # at least one fp32 [seq, vocab] logits buffer
  assert chunked <= 0.1 * naive, (chunked, naive)
