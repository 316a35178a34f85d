"""GRPO: the loss equals a hand computation and tunix's, the trainer scores exactly what the sampler drew,
Magistral's switches do what they say, a killed run resumes bitwise, and bad input is one error first."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ministral_jax import configs, sharding
from ministral_jax.checkpoint import orbax_io
from ministral_jax.data import pipeline
from ministral_jax.errors import UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ModelConfig
from ministral_jax.rewards import registry
from ministral_jax.sample import sampler
from ministral_jax.train import grpo, grpo_loss, grpo_report, sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "grpo_tiny.py") + ":quick"


# ----------------------------------------------------------------------------- the loss, by hand


def _case():
  rng = np.random.default_rng(0)
  logp = rng.normal(size=(4, 5)).astype(np.float32) * 0.5 - 2.0
  old = logp + rng.normal(size=(4, 5)).astype(np.float32) * 0.3  # ratios both inside and outside the clip
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.float32)
  return logp, old, mask


def _hand(logp, old, adv, mask, eps_low, eps_high, token_sum):
  """The loss and d loss / d logp written out per token, in float64."""
  logp, old, adv, mask = (np.asarray(x, np.float64) for x in (logp, old, adv, mask))
  loss_t, grad_t = np.zeros_like(logp), np.zeros_like(logp)
  for i in range(logp.shape[0]):
    for t in range(logp.shape[1]):
      r, a = np.exp(logp[i, t] - old[i, t]), adv[i]
      clipped = min(max(r, 1 - eps_low), 1 + eps_high)
      if r * a <= clipped * a:  # the unclipped branch is the min: gradient -a * r
        loss_t[i, t], grad_t[i, t] = -r * a, -a * r
      else:  # the clipped branch: constant in logp
        loss_t[i, t] = -clipped * a
  if token_sum:
    weight = mask / mask.sum()
  else:
    weight = mask / mask.sum(1, keepdims=True) / mask.shape[0]
  return (loss_t * weight).sum(), grad_t * weight


@pytest.mark.parametrize("token_sum", [True, False], ids=["token_sum", "sequence_mean"])
def test_the_clipped_surrogate_and_its_gradient_equal_a_hand_computation(token_sum):
  logp, old, mask = _case()
  adv = np.array([1.0, -0.5, 2.0, -1.5], np.float32)
  s = grpo_loss.Settings(token_sum=token_sum, minibatch_advantage=False)
  ours = lambda lp: grpo_loss.minibatch_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.ones(4), jnp.asarray(mask), s)
  (loss, stats), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logp))
  want_loss, want_grad = _hand(logp, old, adv, mask, 0.2, 0.28, token_sum)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-6)
  assert 0.0 < float(stats["clip_fraction"]) < 1.0  # the case exercises both branches


def test_advantages_are_centred_per_group_normalised_per_minibatch_and_flat_groups_dropped():
  rewards = jnp.asarray([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.5, 0.0, 0.0]])
  adv, kept = grpo_loss.group_advantages(rewards, grpo_loss.Settings())
  np.testing.assert_allclose(np.asarray(adv), [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.125, 0.375, -0.125, -0.125]])
  np.testing.assert_array_equal(np.asarray(kept), [[1] * 4, [0] * 4, [1] * 4])
  a, k = np.asarray(adv).ravel(), np.asarray(kept).ravel()
  normed = np.asarray(grpo_loss.normalize_minibatch(jnp.asarray(a), jnp.asarray(k), grpo_loss.Settings()))
  live = a[k == 1]
  np.testing.assert_allclose(normed[k == 1], (live - live.mean()) / (live.std() + grpo_loss.EPS), rtol=1e-5)
  _, kept_all = grpo_loss.group_advantages(rewards, grpo_loss.Settings(drop_flat_groups=False))
  assert float(kept_all.min()) == 1.0
  classic, _ = grpo_loss.group_advantages(rewards, grpo_loss.Settings(minibatch_advantage=False))
  np.testing.assert_allclose(np.asarray(classic)[0], np.array([0.5, -0.5, -0.5, 0.5]) / (np.std([1, 0, 0, 1], ddof=1)
                                                                                          + grpo_loss.EPS), rtol=1e-6)


def test_clip_higher_lets_a_positive_advantage_ratio_rise_to_1_28_not_1_2():
  logp, old = jnp.log(jnp.asarray([[1.25]])), jnp.zeros((1, 1))  # ratio 1.25
  grad = lambda s: jax.grad(lambda lp: grpo_loss.minibatch_loss(lp, old, jnp.ones(1), jnp.ones(1), jnp.ones((1, 1)),
                                                                s)[0])(logp)
  assert float(grad(grpo_loss.Settings(minibatch_advantage=False))[0, 0]) < 0  # still pushed up under 1.28
  assert float(grad(grpo_loss.Settings(minibatch_advantage=False, eps_high=0.2))[0, 0]) == 0  # clipped at 1.2


# ----------------------------------------------------------------------------- the peer: tunix


def test_the_loss_and_its_gradient_equal_tunix_grpo_loss_where_the_settings_are_shared():
  """tunix's `grpo_loss_fn` on a stub model that returns fixed logits; ours on log_softmax of the same logits.
  Shared: given advantages (tunix has no minibatch normalisation and no group dropping), eps 0.2 / 0.28,
  token-mean <-> token_sum, sequence-mean-token-mean <-> per-sequence mean, and the k3 KL (low_var_kl)."""
  from tunix.rl import algo_core, common
  from tunix.rl.grpo import grpo_learner

  from tunix_stub import FixedLogits

  b, p, c, v, temperature = 4, 3, 5, 11, 0.9
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(b, p + c, v)), jnp.float32)
  completion = jnp.asarray(rng.integers(2, v, size=(b, c)), jnp.int32)
  _, _, mask = _case()
  old = jnp.asarray(rng.normal(size=(b, c)) * 0.3 - 2.4, jnp.float32)
  ref = jnp.asarray(rng.normal(size=(b, c)) * 0.3 - 2.4, jnp.float32)
  adv = jnp.asarray(algo_core.compute_advantages(np.array([1.0, 0.0, 0.5, 0.5]), 2), jnp.float32)
  ours_adv, _ = grpo_loss.group_advantages(jnp.asarray([[1.0, 0.0], [0.5, 0.5]]), grpo_loss.Settings(
      minibatch_advantage=False))
  np.testing.assert_allclose(np.asarray(ours_adv).ravel(), np.asarray(adv), rtol=1e-6)

  for mode, token_sum in (("token-mean", True), ("sequence-mean-token-mean", False)):
    for beta in (0.0, 0.04):
      tcfg = grpo_learner.GRPOConfig(beta=beta, epsilon=0.2, loss_agg_mode=mode, kl_loss_mode="low_var_kl")
      tcfg.epsilon_high, tcfg.temperature = 0.28, temperature

      def theirs(lg):
        ex = common.TrainExample(prompt_ids=jnp.ones((b, p), jnp.int32), prompt_mask=jnp.ones((b, p), jnp.int32),
                                 completion_ids=completion, completion_mask=jnp.asarray(mask), advantages=adv,
                                 ref_per_token_logps=ref if beta else None, old_per_token_logps=old)
        return algo_core.grpo_loss_fn(FixedLogits(lg), ex, tcfg, pad_id=0, eos_id=1)[0]

      def ours(lg):
        lp = jax.nn.log_softmax(lg / temperature, axis=-1)[:, p - 1:p + c - 1]
        lp = jnp.take_along_axis(lp, completion[..., None], -1)[..., 0]
        s = grpo_loss.Settings(kl_beta=beta, token_sum=token_sum, minibatch_advantage=False)
        return grpo_loss.minibatch_loss(lp, old, adv, jnp.ones(b), jnp.asarray(mask), s, ref if beta else None)[0]

      np.testing.assert_allclose(float(ours(logits)), float(theirs(logits)), rtol=1e-5, err_msg=f"{mode} {beta}")
      np.testing.assert_allclose(np.asarray(jax.grad(ours)(logits)), np.asarray(jax.grad(theirs)(logits)),
                                 atol=1e-7, err_msg=f"{mode} beta={beta}")


# ----------------------------------------------------------------------------- the trainer's pieces


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Task-suite prompts, their SentencePiece (with the chat control tokens), a random quick-size policy."""
  root = tmp_path_factory.mktemp("grpo")
  cfg = configs.load(QUICK)
  train, evals = sft.write_task_data(sft.tasks_config(level=1, train=64, eval_=16, style="short"), root / "data")
  cfg.data.update(paths=train, eval_paths=evals, tokenizer="spm_train", spm_vocab_size=400)
  tokenizer = pipeline.build_tokenizer(cfg.data, str(root))
  model_cfg = ModelConfig.from_dict(cfg.model)
  params = transformer.init_params(model_cfg, jax.random.key(0))
  orbax_io.save_params(root / "policy", params, model_cfg, extra_metadata={"tokenizer": tokenizer.identity()})
  return root, cfg, tokenizer, model_cfg, params


def test_split_minibatches_keeps_groups_whole_and_interleaves_prompts():
  x = jnp.arange(6 * 2)  # 6 prompts x G=2, row = prompt * 2 + sample
  minis = np.asarray(grpo.split_minibatches(x, 3, 2))
  np.testing.assert_array_equal(minis, [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]])


def test_the_trainer_recomputes_exactly_the_log_probs_the_sampler_drew_with(tiny):
  """The first importance ratio of every update is 1: same tokens, same positions, same temperature."""
  _, cfg, tokenizer, model_cfg, params = tiny
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.grpo.sampling.temperature = 0.7
  task = grpo.GRPO(cfg, model_cfg, None)
  prompts = [list(p.ids) for p in grpo.prompts(cfg.data, tokenizer, "train", 16, 256)[:3]]
  out = sampler.rollout(params, model_cfg, prompts, task.sampling, jax.random.key(3), samples=2,
                        stop_ids=[tokenizer.eos_id])
  rows = grpo.training_rows(prompts, out, 2, sampler.bucket(max(map(len, prompts))) + 32, model_cfg.pad_id)
  live = rows["loss_mask"] == 1
  np.testing.assert_array_equal(rows["targets"][live], np.concatenate([t[:n] for t, n in zip(out.tokens, out.lengths)]))
  logp, entropy = task.policy_log_probs(params, {k: jnp.asarray(v) for k, v in rows.items()})
  np.testing.assert_allclose(np.asarray(logp)[live], rows["old_logp"][live], atol=2e-5)
  assert np.all(np.asarray(entropy)[live] > 0)


def test_rewards_are_gated_by_the_format_and_penalised_near_the_length_limit(tiny):
  _, cfg, *_ = tiny
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.grpo.update(rewards=("math", "format"), reward_weights=(1.0, 0.5), length_penalty_buffer=8)
  task = grpo.GRPO(cfg, ModelConfig.from_dict(cfg.model), None)
  texts = ["[THINK]2+2=4[/THINK]\\boxed{4}</s>", "\\boxed{4}</s>", "[THINK]x[/THINK]\\boxed{5}</s>"]
  try:
    out = task.rewards(texts, ["4", "4", "4"], np.array([10, 10, 30]))
  finally:
    task.verifiers.close()
  np.testing.assert_allclose(out["correct"], [1, 1, 0])
  np.testing.assert_allclose(out["format_ok"], [1, 0, 1])
  # 1 + 0.5 format; gated to 0 without the format; 0.5 for the format minus (30 - 24) / 8 of the penalty
  np.testing.assert_allclose(out["reward"], [1.5, 0.0, 0.5 - 0.75])
  np.testing.assert_allclose(registry.length_penalty(np.array([24, 28, 32]), 32, 8), [0, -0.5, -1])


def test_the_eval_reports_greedy_accuracy_sampled_pass_at_1_and_pass_at_k(tiny, monkeypatch):
  """4 held-out problems, k = 2 samples each: the greedy score and the sampled scores are aggregated apart."""
  _, cfg, tokenizer, model_cfg, params = tiny
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.grpo.update(eval_problems=4, eval_batch=4, eval_samples=2)
  cfg.grpo.sampling.max_new_tokens = 8
  task = grpo.GRPO(cfg, model_cfg, None)
  graded = iter([np.array([1, 0, 0, 0.0]), np.array([1, 0, 0, 0, 1, 1, 0, 1.0])])  # greedy, then the samples
  monkeypatch.setattr(task, "rewards", lambda texts, refs, lengths: {
      "correct": next(graded)[:len(texts)], "reward": np.zeros(len(texts)), "format_ok": np.ones(len(texts))})
  out = task.evaluate(params, tokenizer)
  assert out["eval_accuracy"] == 0.25
  assert out["eval_sampled_accuracy"] == 0.5  # 4 of 8 samples
  assert out["eval_pass@2"] == 0.75  # problems 0, 2 and 3 have a right sample


# ----------------------------------------------------------------------------- the job


def _job(root, workdir, *extra, env=None):
  """The quick GRPO job with the `digits` reward (tests/grpo_digits_main.py), from the random policy."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.path.join(REPO, "tests"), **(env or {})}
  return subprocess.run([sys.executable, "-m", "grpo_digits_main", f"--config={QUICK}", f"--workdir={workdir}",
                         f"--config.init_from={root / 'policy'}", "--config.data.tokenizer=init_from",
                         f"--config.data.paths={root / 'data' / 'train.jsonl'}",
                         f"--config.data.eval_paths={root / 'data' / 'eval.jsonl'}",
                         "--config.grpo.rewards=('digits',)", "--config.grpo.format_gate=False",
                         "--config.train.async_checkpoints=False",  # the kill below finds step 2 saved
                         "--config.train.eval_every=0", *extra],  # the held-out eval: test_multiprocess
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _history(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_grpo_run_killed_mid_run_resumes_to_the_bitwise_same_params_and_metrics(tiny, tmp_path):
  root = tiny[0]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  result = _job(root, straight)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = _history(straight)
  logged = {k for r in rows for k in r}
  for key in ("reward_mean", "reward_std", "accuracy", "groups_dropped", "mean_length", "max_length", "truncated",
              "clip_fraction", "entropy", "kl_sampling", "loss", "grad_norm"):
    assert key in logged, key
  assert any(r.get("update_norm", 0) > 0 for r in rows)  # the policy moved
  assert (straight / grpo_report.PLOT_FILE).stat().st_size > 1000
  result = _job(root, killed, env={"MINISTRAL_JAX_FAULT": "loop.after_step:3"})  # after the step-2 checkpoint
  assert result.returncode == -9, result.stderr[-3000:]
  result = _job(root, killed)
  assert result.returncode == 0 and "resumed from step 2 of 4" in result.stdout, result.stderr[-3000:]
  strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "eta_min", "mfu")} for r in rs]
  assert strip(_history(killed)) == strip(rows)
  a, _ = orbax_io.load_params(straight / "params")
  b, _ = orbax_io.load_params(killed / "params")
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _bad_cfg(tiny):
  root, cfg, *_ = tiny
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.init_from, cfg.data.tokenizer = str(root / "policy"), "init_from"
  cfg.mesh = sharding.mesh_config(data=-1)
  return cfg


@pytest.mark.parametrize("change,message", [
    (lambda c: c.grpo.update(rewards=("math", "nope")), r"reward 'nope' does not exist"),
    (lambda c: c.grpo.update(samples=1), r"grpo.samples=1: .* at least 2"),
    (lambda c: c.train.update(global_batch=6), r"Global batch 6 cannot be split over the 8 batch shards"),
    (lambda c: c.grpo.sampling.update(max_new_tokens=c.model.max_seq_len - 8),
     r"prompt of \d+ tokens \+ grpo.sampling.max_new_tokens=\d+ exceeds the model's max_seq_len="),
    (lambda c: (c.update(init_from=""), c.sft_stage.update(task=""), c.data.update(tokenizer="spm_v1"),
                c.model.update(vocab_size=32000)),
     r"needs a v13\+ instruct tokenizer \(\[THINK\]"),
], ids=["unknown_reward", "one_sample", "batch_not_dividing_the_mesh", "prompt_past_the_limit",
        "tokenizer_without_control_tokens"])
def test_bad_grpo_input_is_one_error_before_any_rollout(tiny, tmp_path, monkeypatch, change, message):
  cfg = _bad_cfg(tiny)
  change(cfg)
  monkeypatch.setattr(sampler, "rollout", lambda *a, **k: pytest.fail("a rollout ran before the error"))
  with pytest.raises(UserError, match=message):
    grpo.run(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
