"""The SFT trainer: the loss counts the assistant's tokens only (CE and KD alike), a run resumes exactly,
the SFT config's bad input is one error before any work, and eval_generate scores answers."""

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
from ministral_jax.data import chat, pipeline
from ministral_jax.errors import UserError
from ministral_jax.eval import generate
from ministral_jax.model import config, transformer
from ministral_jax.train import sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": "The answer is \\boxed{5}."}]},
    {"messages": [{"role": "user", "content": "Compute 7 - 4."},
                  {"role": "assistant", "content": "So \\boxed{3}.", "thinking": "7 - 4 = 3"},
                  {"role": "user", "content": "And 3 * 3?"}, {"role": "assistant", "content": "\\boxed{9}"}]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Two conversations packed into one row, a tiny student and a tiny teacher with the same vocabulary."""
  root = tmp_path_factory.mktemp("sft")
  (root / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
  data = pipeline.data_config()
  data.update(source="chat", paths=str(root / "train.jsonl"), eval_paths=str(root / "train.jsonl"), seq_len=96,
              tokenizer="spm_train", spm_vocab_size=400, epochs=1)  # the project's own SentencePiece: [THINK] is a control id
  tokenizer = pipeline.build_tokenizer(data, str(root))
  batch = next(chat.chat_iterator(data, tokenizer, 1, seed=0))
  student_cfg = config.preset("tiny", vocab_size=tokenizer.vocab_size, n_layers=1)
  teacher_cfg = config.preset("tiny", vocab_size=tokenizer.vocab_size, n_layers=2)
  student = transformer.init_params(student_cfg, jax.random.key(0))
  teacher_path = root / "teacher"
  orbax_io.save_params(teacher_path, transformer.init_params(teacher_cfg, jax.random.key(1)), teacher_cfg,
                       extra_metadata={"tokenizer": tokenizer.identity()})
  return root, data, tokenizer, batch, student_cfg, student, str(teacher_path)


def _one_device() -> sharding.Partitioner:
  return sharding.Partitioner(sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))


def _cfg(data, teacher="", kd_weight=0.0):
  """The quick config on `data`, from random weights (no parent) on one device."""
  cfg = configs.load(os.path.join(REPO, "configs", "sft_tiny.py") + ":quick")
  cfg.data = data
  cfg.parent.steps = 0
  cfg.sft = sft.sft_config(teacher, kd_weight)
  cfg.loss.seq_chunk, cfg.loss.vocab_chunk = 16, 4096
  return cfg


def _log_probs(cfg, params, batch):
  logits, _ = transformer.Transformer(cfg).apply({"params": params}, batch["inputs"], batch["positions"],
                                                 batch["segment_ids"])
  return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))[0]


def test_the_batch_packs_both_conversations_and_masks_only_assistant_tokens(setup):
  _, _, tokenizer, batch, *_ = setup
  assert int(batch["segment_ids"].max()) == 2  # both conversations in one row
  mask = batch["loss_mask"][0].astype(bool)
  predicted = tokenizer.decode(batch["targets"][0][mask].tolist(), keep_special=True)
  assert "The answer is" in predicted and "7 - 4 = 3" in predicted and "\\boxed{9}" in predicted
  assert "Be brief" not in predicted and "What is" not in predicted and "And 3 * 3" not in predicted
  assert predicted.count("</s>") == 3  # each assistant turn's closing EOS counts


def test_a_packed_conversation_attends_only_to_itself(setup):
  """The second conversation's logits in the packed row equal its logits alone in a row (float32, same
  ops on fewer keys: agreement to rounding)."""
  _, _, _, batch, student_cfg, student, _ = setup
  packed = _log_probs(student_cfg, student, batch)
  at = np.flatnonzero(batch["segment_ids"][0] == 2)
  alone = {k: batch[k][:, at] for k in ("inputs", "positions")}
  alone["segment_ids"] = np.ones_like(alone["inputs"])
  np.testing.assert_allclose(_log_probs(student_cfg, student, alone), packed[at], atol=1e-5)


def test_sft_loss_equals_a_hand_computation_on_a_two_conversation_batch(setup):
  _, data, _, batch, student_cfg, student, _ = setup
  task = sft.make_task(_cfg(data), student_cfg, _one_device())
  loss_sum, count, _ = task.loss_fn(student, jax.tree.map(jnp.asarray, batch), None, jax.random.key(0))
  logp = _log_probs(student_cfg, student, batch)
  mask = batch["loss_mask"][0].astype(bool)
  nll = -logp[np.arange(logp.shape[0]), batch["targets"][0]]
  assert float(count) == mask.sum()
  np.testing.assert_allclose(float(loss_sum), nll[mask].sum(), rtol=2e-5)


def test_distillation_in_sft_is_masked_like_the_next_token_loss(setup):
  _, data, _, batch, student_cfg, student, teacher = setup
  part = _one_device()
  task = sft.make_task(_cfg(data, teacher, kd_weight=0.5), student_cfg, part)
  loss_sum, count, _ = task.loss_fn(student, jax.tree.map(jnp.asarray, batch), task.frozen, jax.random.key(0))
  teacher_cfg = orbax_io.load_config(teacher)
  p_s, p_t = _log_probs(student_cfg, student, batch), _log_probs(teacher_cfg, task.frozen, batch)
  mask = batch["loss_mask"][0].astype(bool)
  kl = (np.exp(p_t) * (p_t - p_s)).sum(-1)
  nll = -p_s[np.arange(p_s.shape[0]), batch["targets"][0]]
  assert float(count) == mask.sum()
  np.testing.assert_allclose(float(loss_sum), 0.5 * kl[mask].sum() + 0.5 * nll[mask].sum(), rtol=2e-5)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.data.update(source="builtin"), r"SFT reads conversations; set data.source='chat'"),
    (lambda c: c.sft.update(kd_weight=0.5), r"sft.kd_weight=0.5 needs a teacher"),
    (lambda c: c.sft.update(kd_weight=1.5, teacher="x"), r"sft.kd_weight=1.5"),
    (lambda c: (c.data.update(tokenizer="spm_v1"), c.model.update(vocab_size=32000)), r"needs a v13\+ instruct tokenizer \(\[THINK\]"),  # no [THINK]
], ids=["not_chat_data", "kd_without_teacher", "kd_weight_out_of_range", "tokenizer_without_control_tokens"])
def test_bad_sft_input_is_one_error_before_any_step(setup, tmp_path, change, message):
  _, data, *_ = setup
  cfg = _cfg(ml_collections.ConfigDict(data.to_dict()))
  cfg.model.vocab_size = data.spm_vocab_size  # room for the SentencePiece it trains
  change(cfg)
  with pytest.raises(UserError, match=message):
    sft.run(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_teacher_with_another_vocabulary_is_refused(setup, tmp_path):
  _, data, *_ = setup
  other = config.preset("tiny", vocab_size=data.spm_vocab_size + 8, n_layers=1)
  orbax_io.save_params(tmp_path / "t", transformer.init_params(other, jax.random.key(0)), other)
  cfg = _cfg(ml_collections.ConfigDict(data.to_dict()), str(tmp_path / "t"), kd_weight=1.0)
  cfg.model.vocab_size = data.spm_vocab_size
  with pytest.raises(UserError, match="teacher's vocabulary"):
    sft.run(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def _main(workdir, *extra, env=None):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
         **(env or {})}
  return subprocess.run([sys.executable, "-m", "ministral_jax.main", "--config=configs/sft_tiny.py:quick",
                         f"--workdir={workdir}", *extra], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)


def _history(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: r[k] for k in ("step", "loss", "grad_norm", "eval_loss") if k in r} for r in rows]


def test_the_quick_sft_job_runs_from_nothing_resumes_exactly_and_eval_generate_scores_it(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  result = _main(straight)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (straight / "parent" / "params").exists() and (straight / "data" / "train.jsonl").exists()
  result = _main(killed, env={"MINISTRAL_JAX_FAULT": "loop.after_step:42"})  # the parent.s 30 steps, then SFT step 12
  assert result.returncode == -9, result.stderr[-3000:]
  result = _main(killed)
  assert result.returncode == 0 and "resumed from step 10 of 20" in result.stdout, result.stderr[-3000:]
  assert _history(killed) == _history(straight)
  a, _ = orbax_io.load_params(straight / "params")
  b, _ = orbax_io.load_params(killed / "params")
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  result = _main(straight, "--config.task=eval_generate", "--config.generate.n=8")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((straight / generate.RESULT_FILE).read_text())
  for key in ("accuracy", "mean_length", "truncated", "looping", "format_ok"):
    assert 0.0 <= report[key] <= (64 if key == "mean_length" else 1.0)
  assert report["problems"] == 8 and len(report["examples"]) == 8


def test_pass_at_k_is_the_unbiased_estimator():
  correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  np.testing.assert_allclose(generate.pass_at_k(correct, 1), (0.25 + 0 + 1) / 3)
  np.testing.assert_allclose(generate.pass_at_k(correct, 4), (1 + 0 + 1) / 3)
  np.testing.assert_allclose(generate.pass_at_k(correct, 2), (0.5 + 0 + 1) / 3)
