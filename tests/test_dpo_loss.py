"""DPO's loss against a hand computation and against tunix's `dpo_loss_fn` (hard labels, label smoothing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ministral_jax.train import dpo_loss


def _log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def test_the_soft_label_loss_and_its_gradient_equal_a_hand_computation():
  pi1, ref1 = np.array([-12.0, -30.5, -7.25]), np.array([-12.5, -29.0, -7.25])
  pi2, ref2 = np.array([-15.0, -28.0, -9.0]), np.array([-14.0, -28.5, -8.0])
  p, beta = np.array([0.9, 0.3, 0.5]), 0.1
  delta = beta * ((pi1 - ref1) - (pi2 - ref2))  # 0.15, -0.2, 0.1
  np.testing.assert_allclose(delta, [0.15, -0.2, 0.1], atol=1e-12)
  want = -(p * _log_sigmoid(delta) + (1 - p) * _log_sigmoid(-delta))
  ours = dpo_loss.margin(*(jnp.asarray(x, jnp.float32) for x in (pi1, ref1, pi2, ref2)), beta)
  np.testing.assert_allclose(np.asarray(ours), delta, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(dpo_loss.pair_losses(ours, jnp.asarray(p, jnp.float32))), want, rtol=1e-6)
  # d loss / d delta = sigmoid(delta) - p, so d loss / d log pi(y1) = beta * (sigmoid(delta) - p)
  grad = jax.grad(lambda x: jnp.sum(dpo_loss.pair_losses(dpo_loss.margin(x, ref1, pi2, ref2, beta), p)))(
      jnp.asarray(pi1, jnp.float32))
  np.testing.assert_allclose(np.asarray(grad), beta * (1 / (1 + np.exp(-delta)) - p), rtol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.99])
def test_the_soft_label_loss_is_minimised_at_delta_equal_logit_p(p):
  best = float(np.log(p / (1 - p)))
  loss = lambda d: float(dpo_loss.pair_losses(jnp.float32(d), p))
  grad = float(jax.grad(lambda d: dpo_loss.pair_losses(d, p))(jnp.float32(best)))
  assert abs(grad) < 1e-6
  assert loss(best) < loss(best - 0.05) and loss(best) < loss(best + 0.05)


def test_label_one_is_sigmoid_dpo_and_a_coin_flip_label_has_no_gradient_at_zero():
  delta = jnp.linspace(-3.0, 3.0, 7)
  np.testing.assert_allclose(np.asarray(dpo_loss.pair_losses(delta, 1.0)), -np.asarray(jax.nn.log_sigmoid(delta)),
                             rtol=1e-6)
  assert float(jax.grad(lambda d: dpo_loss.pair_losses(d, 0.5))(jnp.float32(0.0))) == 0.0


def test_stats_count_pairs_the_policy_ranks_as_the_label_does():
  delta, label = jnp.array([0.5, -0.2, 0.3, -1.0]), jnp.array([1.0, 1.0, 0.2, 0.4])
  zeros = jnp.zeros(4)
  stats = dpo_loss.pair_stats(delta, label, 0.1, zeros + 1.0, zeros, zeros, zeros)
  assert float(stats["ranking_accuracy"]) == 2.0  # pair 0 (first preferred, delta > 0) and pair 3 (second, delta < 0)
  np.testing.assert_allclose(float(stats["reward_first"]), 0.4)
  np.testing.assert_allclose(float(stats["label_mean"]), 2.6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["hard", "smoothed"])
def test_the_loss_and_its_gradient_equal_tunix_dpo_loss_fn(smoothing):
  """tunix's `dpo_loss_fn` on a stub model that returns fixed logits for the chosen rows then the rejected ones;
  ours on log_softmax of the same logits. Its scalar `label_smoothing` eps is our label 1 - eps on every pair."""
  from tunix.sft.dpo import dpo_trainer

  from tunix_stub import FixedLogits

  pairs, p, c, v, beta = 3, 4, 5, 13, 0.2
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2 * pairs, p + c, v)), jnp.float32)
  completion = jnp.asarray(rng.integers(0, v, size=(2 * pairs, c)), jnp.int32)
  mask = jnp.asarray(np.arange(c)[None, :] < np.array([5, 3, 4, 2, 5, 1])[:, None], jnp.float32)
  ref = jnp.asarray(rng.normal(size=(2 * pairs,)) * 2 - 9, jnp.float32)
  ids = jnp.concatenate([jnp.ones((2 * pairs, p), jnp.int32), completion], axis=1)

  def theirs(lg):
    ex = dpo_trainer.TrainExample(input_ids=ids, positions=jnp.broadcast_to(jnp.arange(p + c), ids.shape),
                                  attention_mask=jnp.ones((2 * pairs, p + c, p + c), bool),
                                  ref_chosen_logps=ref[:pairs], ref_rejected_logps=ref[pairs:],
                                  completion_mask=mask, logits_to_keep=c)
    return dpo_trainer.dpo_loss_fn(FixedLogits(lg), ex, beta=beta, label_smoothing=smoothing)[0]

  def ours(lg):
    lp = jax.nn.log_softmax(lg, axis=-1)[:, p - 1:p + c - 1]
    seq = dpo_loss.sequence_log_probs(jnp.take_along_axis(lp, completion[..., None], -1)[..., 0], mask)
    delta = dpo_loss.margin(seq[:pairs], ref[:pairs], seq[pairs:], ref[pairs:], beta)
    return jnp.mean(dpo_loss.pair_losses(delta, 1.0 - smoothing))

  np.testing.assert_allclose(float(ours(logits)), float(theirs(logits)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(ours)(logits)), np.asarray(jax.grad(theirs)(logits)), atol=1e-7)
