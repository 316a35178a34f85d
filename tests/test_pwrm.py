"""The pairwise reward model: its symmetric score, what it reads, calibration, training, bad input."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ministral_jax import configs
from ministral_jax.checkpoint import orbax_io
from ministral_jax.data import chat, pipeline, preference, tokenizers
from ministral_jax.errors import UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ModelConfig
from ministral_jax.rewards import pwrm
from ministral_jax.train import dpo, odpo, sft
from ministral_jax.train import pwrm as pwrm_job

QUICK = "configs/pwrm_tiny.py:quick"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Answer-style rule pairs, a SentencePiece with the chat control tokens, a random quick decoder."""
  root = tmp_path_factory.mktemp("pwrm")
  cfg = configs.load(QUICK)
  train, evals = dpo.write_task_pairs(dpo.pairs_config(train=24, eval_=12, style="answer"), root / "pairs")
  chat_train, _ = sft.write_task_data(sft.tasks_config(level=1, train=64, eval_=8, style="short"), root / "chat")
  cfg.data.update(source="chat", paths=chat_train, eval_paths="", tokenizer="spm_train", spm_vocab_size=400)
  tokenizer = pipeline.build_tokenizer(cfg.data, str(root))
  cfg.data.update(source="preference", paths=train, eval_paths=evals, tokenizer=str(tokenizer.path))
  model_cfg = ModelConfig.from_dict(cfg.model)
  return cfg, tokenizer, model_cfg, transformer.init_params(model_cfg, jax.random.key(0)), root


def _judgments(cfg, n=4):
  return pwrm_job.judgments(preference.read_pairs(cfg.data.paths)[:n], strip_thinking=True)


def test_swapping_the_responses_negates_the_score_so_both_orders_sum_to_one_exactly(tiny):
  cfg, tokenizer, model_cfg, params, _ = tiny
  js = _judgments(cfg)
  swapped = [pwrm.Judgment(j.prompt, j.second, j.first, 1 - j.p) for j in js]
  choice = pwrm.choice(tokenizer)
  d = np.asarray(pwrm.pair_logits(model_cfg, params, pwrm.rows(js, tokenizer, 384), choice))
  d_swapped = np.asarray(pwrm.pair_logits(model_cfg, params, pwrm.rows(swapped, tokenizer, 384), choice))
  assert np.all(d != 0)
  np.testing.assert_array_equal(d_swapped, -d)  # (s1 - s2) / 2 against (s2 - s1) / 2: the same floats
  p = lambda x: 1 / (1 + np.exp(-x.astype(np.float64) / 0.37))
  np.testing.assert_allclose(p(d) + p(d_swapped), 1.0, rtol=0, atol=1e-15)


def test_the_score_is_the_logit_of_answering_a_minus_that_of_b_at_the_scoring_position(tiny):
  cfg, tokenizer, model_cfg, params, _ = tiny
  js = _judgments(cfg, 2)
  rows = pwrm.rows(js, tokenizer, 384)
  choice = pwrm.choice(tokenizer)
  logits, _ = transformer.Transformer(model_cfg).apply({"params": params}, jnp.asarray(rows["inputs"]),
                                                       jnp.asarray(rows["positions"]), jnp.asarray(rows["segment_ids"]))
  at = np.argmax(rows["loss_mask"], axis=1)  # the last judgment token: where the answer's deciding token is predicted
  s = np.asarray([logits[r, at[r], choice.a] - logits[r, at[r], choice.b] for r in range(len(at))])
  np.testing.assert_allclose(np.asarray(pwrm.pair_logits(model_cfg, params, rows, choice)), (s[0::2] - s[1::2]) / 2,
                             rtol=1e-5, atol=1e-5)
  # The judgment asks which response is better, then the answer's shared prefix; A and B differ after it.
  text = tokenizer.decode(rows["inputs"][0, :at[0] + 1].tolist(), keep_special=True)
  assert "[Response A]" in text and "[Response B]" in text and pwrm.QUESTION in text
  assert choice.a != choice.b


def test_the_pwrm_reads_the_answer_alone_when_thinking_is_stripped():
  message = chat.Message("assistant", "The answer is 4.", thinking="2 + 2 = 4")
  assert pwrm.response_text(message, True) == "The answer is 4."
  assert pwrm.response_text(message, False) == "[THINK]2 + 2 = 4[/THINK]The answer is 4."
  assert pwrm.response_text("[THINK]2 + 2 = 4[/THINK]The answer is 4.</s>", True) == "The answer is 4."
  assert pwrm.response_text("The answer is 4.</s>", False) == "The answer is 4."


def test_the_fitted_temperature_recovers_the_one_the_labels_were_drawn_with():
  """20,000 pairs with P(first > second) = sigmoid(d / 2.5): the fit is within 3% (the NLL's curvature gives a
  standard error under 1% here), the log-loss falls, and the calibration error with it."""
  rng = np.random.default_rng(0)
  d = rng.normal(0, 4, 20_000)
  labels = (rng.random(d.size) < 1 / (1 + np.exp(-d / 2.5))).astype(np.float64)
  t = pwrm.fit_temperature(d, labels)
  assert t == pytest.approx(2.5, rel=0.03)
  assert pwrm.nll(d, labels, t) < pwrm.nll(d, labels, 1.0)
  before = pwrm.expected_calibration_error(1 / (1 + np.exp(-d)), labels)
  after = pwrm.expected_calibration_error(1 / (1 + np.exp(-d / t)), labels)
  assert after < 0.02 < 0.05 < before


def test_the_calibration_error_is_the_count_weighted_gap_per_bin_over_both_orders():
  prob, labels = np.array([0.95, 0.85, 0.15]), np.array([1.0, 0.0, 0.0])
  # Both orders: P = .95 .85 .15 .05 .15 .85 with labels 1 0 0 0 1 1. Bins (10): [.9,1): .95|1; [.8,.9): .85,.85|0,1;
  # [.1,.2): .15,.15|0,1; [0,.1): .05|0. Gaps: .05, |.85-.5|=.35 x2, |.15-.5|=.35 x2, .05 -> (0.05+0.7+0.7+0.05)/6.
  assert pwrm.expected_calibration_error(prob, labels) == pytest.approx(1.5 / 6)


def test_a_few_steps_teach_the_pwrm_the_concise_and_the_non_looping_answer(tiny):
  """The verbose and loop pairs (kinds 1 and 2 of every 3); the wrong-result pairs differ in a digit or two and
  take a trained decoder, not 24 steps from random."""
  cfg, tokenizer, model_cfg, params, _ = tiny
  pairs = [p for i, p in enumerate(preference.read_pairs(cfg.data.paths)[:9]) if i % 3]
  rows = pwrm_job.batch_fn(tokenizer, 384, True)(pairs)
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  loss_fn = pwrm_job.make_loss(model_cfg, pwrm.choice(tokenizer))
  tx = optax.adam(1e-3)

  @jax.jit
  def step(p, opt):
    (loss, (n, stats)), grads = jax.value_and_grad(lambda q: (lambda r: (r[0] / r[1], r[1:]))(
        loss_fn(q, batch, None, None)), has_aux=True)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss, stats["accuracy"] / n

  opt, losses = tx.init(params), []
  for _ in range(24):
    params, opt, loss, _ = step(params, opt)
    losses.append(float(loss))
  assert abs(losses[0] - np.log(2)) < 0.05  # a random decoder: d near 0
  assert losses[-1] < 0.2 * losses[0] and float(step(params, opt)[3]) == 1.0


def test_pairs_the_stripped_pwrm_reads_as_the_same_response_are_named(tiny):
  pair = preference.parse_pair({"prompt": "q", "chosen": {"content": "4", "thinking": "short"},
                                "rejected": {"content": "4", "thinking": "a much longer thought"}}, "f.jsonl:3")
  with pytest.raises(UserError, match=r"f\.jsonl:3: the two responses read the same to the PWRM"):
    pwrm_job.judgments([pair], strip_thinking=True)
  assert len(pwrm_job.judgments([pair], strip_thinking=False)) == 1


def test_a_pwrm_made_with_another_vocabulary_is_one_error_before_online_dpo_starts(tiny, tmp_path):
  cfg, tokenizer, model_cfg, params, root = tiny
  other = tokenizers.load_tokenizer(tokenizers.bundled_tokenizer_path("spm_v3"))
  orbax_io.save_params(tmp_path / "pwrm", params, model_cfg,
                       extra_metadata={"task": "train_pwrm", "tokenizer": other.identity()})
  c = configs.load("configs/odpo_tiny.py:quick")
  chat_train, chat_eval = sft.write_task_data(sft.tasks_config(level=1, train=16, eval_=4), root / "odpo_chat")
  orbax_io.save_params(tmp_path / "policy", params, model_cfg,
                       extra_metadata={"task": "sft", "tokenizer": tokenizer.identity()})
  c.init_from, c.odpo.pwrm = str(tmp_path / "policy"), str(tmp_path / "pwrm")
  c.data.update(paths=chat_train, eval_paths=chat_eval, tokenizer=str(tokenizer.path))
  with pytest.raises(UserError, match=r"tokenizer mismatch: odpo\.pwrm=.*pwrm was made with"):
    odpo.run(c, str(tmp_path / "work"))
  assert not (tmp_path / "work" / "checkpoints").exists()


@pytest.mark.parametrize("changes,message", [
    ({"odpo.beta": 0.0}, r"odpo\.beta=0\.0: a positive scale"),
    ({"odpo.beta": -1.0}, r"odpo\.beta=-1\.0: a positive scale"),
    ({"odpo.labels": "binary"}, r"odpo\.labels='binary'"),
    ({"odpo.beta_rescale": "sqrt"}, r"odpo\.beta_rescale='sqrt'"),
    ({"odpo.sampling.temperature": 0.0}, r"temperature must be positive"),
    ({"data.source": "preference"}, r"data\.source='preference': Online DPO samples"),
], ids=["beta0", "beta_negative", "labels", "rescale", "greedy", "source"])
def test_bad_online_dpo_config_is_one_error_before_any_work(tmp_path, changes, message):
  c = configs.load("configs/odpo_tiny.py:quick")
  for key, value in changes.items():
    *blocks, field = key.split(".")
    node = c
    for block in blocks:
      node = node[block]
    node[field] = value
  with pytest.raises(UserError, match=message):
    odpo.run(c, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_a_bundled_tokenizer_reads_the_answers_a_and_b_as_different_tokens():
  tokenizer = tokenizers.load_tokenizer(tokenizers.bundled_tokenizer_path("tekken_240911"))
  choice = pwrm.choice(tokenizer)
  assert choice.a != choice.b
  assert tokenizer.decode([choice.a]).strip() == "A" and tokenizer.decode([choice.b]).strip() == "B"


def test_odpo_config_is_valid_and_the_quick_pwrm_config_names_its_task():
  assert configs.load(QUICK).task == "train_pwrm"
  c = ml_collections.ConfigDict(configs.load("configs/odpo_tiny.py:quick").to_dict())
  odpo.check(c)
