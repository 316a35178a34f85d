"""Online DPO's parts: labels from the PWRM and the loop rule, the rule judge, the shared loss with beta
rescaling, microbatches that keep a pair's rows together."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ministral_jax import configs
from ministral_jax.eval import responses
from ministral_jax.model import transformer
from ministral_jax.model.config import ModelConfig
from ministral_jax.rewards import judge
from ministral_jax.train import dpo, loop, odpo, pretrain
from ministral_jax.train.losses import token_log_probs


def test_a_looping_response_always_loses_and_two_looping_responses_drop_the_pair():
  p = np.array([0.9, 0.2, 0.7, 0.5])
  loops_1, loops_2 = np.array([True, False, True, False]), np.array([False, True, True, False])
  label, weight = odpo.labels(p, loops_1, loops_2, hard=False)
  np.testing.assert_array_equal(label, np.float32([0.0, 1.0, 0.7, 0.5]))  # the PWRM is overruled by the loop rule
  np.testing.assert_array_equal(weight, [1, 1, 0, 1])


def test_hard_labels_binarise_the_pwrm_probability_and_drop_exact_ties():
  label, weight = odpo.labels(np.array([0.9, 0.2, 0.5, 0.51]), np.zeros(4, bool), np.zeros(4, bool), hard=True)
  np.testing.assert_array_equal(label, [1, 0, 0, 1])
  np.testing.assert_array_equal(weight, [1, 1, 0, 1])


def test_the_rule_judge_puts_loops_first_then_correctness_then_concision():
  # columns: (correct, loops, length) of a, then of b; P(a > b)
  cases = [((1, 0, 50), (1, 1, 10), 1.0),  # b loops
           ((1, 1, 10), (0, 1, 50), 0.5),  # both loop: a tie, whatever else
           ((0, 0, 10), (1, 0, 90), 0.0),  # correct beats wrong, even when longer
           ((1, 0, 30), (1, 0, 40), 1.0),  # both right: 30 <= 0.9 * 40
           ((1, 0, 38), (1, 0, 40), 0.5),  # within 10%: a tie
           ((0, 0, 60), (0, 0, 20), 0.0)]  # both wrong: the concise one
  a, b, want = zip(*cases)
  got = judge.prefer(*np.asarray(a).T, *np.asarray(b).T)
  np.testing.assert_array_equal(got, want)


def test_a_response_without_eos_or_with_a_repeating_tail_is_looping():
  loop = responses.loop_config()
  assert responses.looping([5, 6, 7], stopped=False, loop=loop)
  assert responses.looping([1, 2, 3] + [9, 8] * 20, stopped=True, loop=loop)
  assert not responses.looping(list(range(60)), stopped=True, loop=loop)
  loop.truncated_loses = False
  assert not responses.looping([5, 6, 7], stopped=False, loop=loop)


@pytest.fixture(scope="module")
def pairs():
  """Two pairs of random token rows (rows 2i, 2i + 1) of unequal response lengths, a quick model and a reference."""
  cfg = configs.load("configs/odpo_tiny.py:quick")
  model_cfg = ModelConfig.from_dict(cfg.model)
  rng = np.random.default_rng(0)
  width, prompt = 24, 6
  lengths = [4, 12, 7, 3]  # response tokens of each row
  batch = {"inputs": rng.integers(3, model_cfg.vocab_size, (4, width)).astype(np.int32),
           "positions": np.tile(np.arange(width, dtype=np.int32), (4, 1)),
           "segment_ids": np.ones((4, width), np.int32), "loss_mask": np.zeros((4, width), np.float32)}
  batch["targets"] = np.roll(batch["inputs"], -1, axis=1)
  for r, n in enumerate(lengths):
    batch["loss_mask"][r, prompt:prompt + n] = 1
  batch["label"] = np.float32([[0.8], [0.8], [0.3], [0.3]])
  batch["pair_weight"] = np.ones((4, 1), np.float32)
  params = transformer.init_params(model_cfg, jax.random.key(1))
  reference = transformer.init_params(model_cfg, jax.random.key(2))
  return cfg, model_cfg, {k: jnp.asarray(v) for k, v in batch.items()}, params, reference, lengths


def _sums(model_cfg, params, batch):
  hidden, head = pretrain.hidden_and_head(model_cfg, params, batch)
  logp, _ = token_log_probs(hidden, head, batch["targets"])
  return np.asarray(jnp.sum(logp * batch["loss_mask"], axis=1), np.float64)


@pytest.mark.parametrize("rescale", ["length", "none"])
def test_the_soft_label_loss_is_the_cross_entropy_of_sigmoid_delta_against_the_pwrm_probability(pairs, rescale):
  cfg, model_cfg, batch, params, reference, lengths = pairs
  o = cfg.odpo
  o.beta_rescale, o.beta, o.beta_tokens = rescale, 0.3, 32
  loss_sum, count, _ = dpo.make_loss(model_cfg, o, cfg.loss.seq_chunk, labels_from_batch=True)(params, batch, reference, None)
  pi, ref = _sums(model_cfg, params, batch), _sums(model_cfg, reference, batch)
  want = 0.0
  for i, p in enumerate((0.8, 0.3)):
    mean_length = (lengths[2 * i] + lengths[2 * i + 1]) / 2
    beta = 0.3 * 32 / mean_length if rescale == "length" else 0.3
    delta = beta * ((pi[2 * i] - ref[2 * i]) - (pi[2 * i + 1] - ref[2 * i + 1]))
    want += -(p * np.log(1 / (1 + np.exp(-delta))) + (1 - p) * np.log(1 / (1 + np.exp(delta))))
  assert float(count) == 2.0
  np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)


def test_a_dropped_pair_counts_nothing(pairs):
  cfg, model_cfg, batch, params, reference, _ = pairs
  loss_fn = jax.jit(dpo.make_loss(model_cfg, cfg.odpo, cfg.loss.seq_chunk, labels_from_batch=True))
  full, _, _ = loss_fn(params, batch, reference, None)
  dropped = {**batch, "pair_weight": jnp.float32([[1], [1], [0], [0]])}
  first_only, count, _ = loss_fn(params, dropped, reference, None)
  just_first = {k: v[:2] for k, v in batch.items()}
  np.testing.assert_allclose(float(first_only), float(loss_fn(params, just_first, reference, None)[0]), rtol=1e-6)
  assert float(count) == 1.0 and float(first_only) < float(full)


def test_gradient_accumulation_keeps_each_pairs_rows_in_one_microbatch(pairs):
  """Two microbatches of one pair each give the one-pass loss and gradient; splitting rows one by one (as
  for documents) would pair row 0 with row 2 and does not."""
  cfg, model_cfg, batch, params, reference, _ = pairs
  loss_fn = dpo.make_loss(model_cfg, cfg.odpo, cfg.loss.seq_chunk, labels_from_batch=True)
  grad_fn = jax.value_and_grad(lambda p, b: (lambda r: (r[0], (r[1], r[2])))(loss_fn(p, b, reference, None)),
                               has_aux=True)
  accumulate = jax.jit(lambda p, parts, group: loop.accumulate_gradients(grad_fn, p, batch, parts, group),
                       static_argnums=(1, 2))
  one = accumulate(params, 1, 1)
  two = accumulate(params, 2, 2)
  np.testing.assert_allclose(float(two[0]), float(one[0]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(two[3]), jax.tree.leaves(one[3])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # fp32 sums in another order, grads of ~0.1
  split = accumulate(params, 2, 1)
  assert abs(float(split[0]) - float(one[0])) > 1e-3
