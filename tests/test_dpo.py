"""Offline DPO: preference pairs (reading, validation, rows), the rule pairs, the trainer's loss, bad input."""

import json
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ministral_jax import configs
from ministral_jax.data import pipeline, preference
from ministral_jax.errors import UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ModelConfig
from ministral_jax.rewards import tasks as task_suite
from ministral_jax.train import dpo, sft

QUICK = "configs/dpo_tiny.py:quick"


def _write(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


GOOD = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": {"content": "5", "thinking": "2 + 2 = 5"}, "p": 0.8}


def test_pairs_are_read_with_their_probability_and_every_bad_line_is_listed_in_one_error(tmp_path):
  pairs = preference.read_pairs(_write(tmp_path / "ok.jsonl", [GOOD, {**GOOD, "p": 1}]))
  assert [p.p for p in pairs] == [0.8, 1.0]
  assert pairs[0].prompt[0].role == "user" and pairs[0].second.thinking == "2 + 2 = 5"
  bad = [GOOD, {**GOOD, "chosen": " "}, {**GOOD, "rejected": GOOD["chosen"]}, {**GOOD, "p": 1.5},
         {"prompt": "x", "chosen": "a"}, "{not json", {**GOOD, "prompt": [{"role": "assistant", "content": "hi"}]}]
  with pytest.raises(UserError) as err:
    preference.read_pairs(_write(tmp_path / "bad.jsonl", bad))
  message = str(err.value)
  assert message.startswith("6 bad preference record(s)")
  for line, words in ((2, '"chosen" is empty'), (3, "the same response"), (4, "not a probability"),
                      (5, "has no rejected"), (6, "not valid JSON"), (7, "bad.jsonl:7")):
    assert f"bad.jsonl:{line}" in message and words in message, (line, message)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Rule pairs over the task suite, a SentencePiece with the chat control tokens, a random quick policy."""
  root = tmp_path_factory.mktemp("dpo")
  cfg = configs.load(QUICK)
  train, evals = dpo.write_task_pairs(dpo.pairs_config(train=24, eval_=6), root / "pairs")
  chat_train, _ = sft.write_task_data(sft.tasks_config(level=1, train=64, eval_=8, style="short"), root / "chat")
  cfg.data.update(source="chat", paths=chat_train, eval_paths="", tokenizer="spm_train", spm_vocab_size=400)
  tokenizer = pipeline.build_tokenizer(cfg.data, str(root))
  cfg.data.update(source="preference", paths=train, eval_paths=evals)
  model_cfg = ModelConfig.from_dict(cfg.model)
  return cfg, tokenizer, model_cfg, transformer.init_params(model_cfg, jax.random.key(0))


def test_a_pair_is_two_adjacent_rows_with_the_mask_on_its_final_response_only(tiny):
  _, tokenizer, *_ = tiny
  prompt = [{"role": "user", "content": "Compute 1 + 1."}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "And 2 + 2?"}]
  pair = preference.parse_pair({"prompt": prompt, "chosen": "4", "rejected": "5", "p": 0.25}, "here")
  rows = preference.batch_rows([pair], tokenizer, 64)
  assert rows["inputs"].shape == (2, 64) and rows["label"].tolist() == [[0.25], [0.25]]
  for row, answer in enumerate(("4", "5")):
    masked = rows["targets"][row][rows["loss_mask"][row] == 1]
    assert tokenizer.decode(masked.tolist()).strip() == answer  # the earlier assistant turn "2" is prompt
    n = int(rows["segment_ids"][row].sum())
    assert rows["positions"][row, :n].tolist() == list(range(n))


def test_rule_pairs_prefer_the_right_the_concise_and_the_non_looping_answer():
  problem = task_suite.generate("arithmetic", 1, "train", 1, seed=5)[0]
  rng = random.Random(0)
  wrong, verbose, loop = (dpo.rule_pair(problem, kind, rng) for kind in dpo.RULE_KINDS)
  assert f"\\boxed{{{problem.answer}}}" in wrong["chosen"]["content"]
  assert f"\\boxed{{{problem.answer}}}" not in wrong["rejected"]["content"]
  assert verbose["rejected"]["content"] == verbose["chosen"]["content"]  # both right, one longer
  assert len(verbose["rejected"]["thinking"]) > 2 * len(verbose["chosen"]["thinking"])
  assert "boxed" not in loop["rejected"]["content"] and len(set(loop["rejected"]["thinking"].splitlines())) == 1
  assert all(p["p"] == 1.0 for p in (wrong, verbose, loop))


def test_the_pair_iterator_resumes_from_its_state_and_each_process_gets_its_share(tiny):
  cfg, tokenizer, *_ = tiny
  first = preference.train_iterator(cfg.data, tokenizer, 4, seed=1, rows=(0, 4))
  batches = [next(first) for _ in range(8)]  # 32 pair-views of 24 pairs: into the second epoch
  again = preference.train_iterator(cfg.data, tokenizer, 4, seed=1, rows=(0, 4))
  again.set_state(json.loads(json.dumps({"taken": 5})))
  np.testing.assert_array_equal(next(again)["inputs"], batches[5]["inputs"])
  half = preference.train_iterator(cfg.data, tokenizer, 4, seed=1, rows=(2, 4))
  np.testing.assert_array_equal(next(half)["inputs"], batches[0]["inputs"][4:])


def test_dpo_steps_raise_the_chosen_responses_over_the_rejected_ones(tiny):
  """Eight Adam steps on one batch of rule pairs: the loss falls from log 2 and the policy ranks them right.
  (Soft labels read each pair's p; the rule pairs' p is 1, so here they are the hard-label loss.)"""
  cfg, tokenizer, model_cfg, params = tiny
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.dpo.labels = "soft"
  batch = {k: jnp.asarray(v) for k, v in next(preference.train_iterator(cfg.data, tokenizer, 6, 0, (0, 6))).items()}
  loss_fn = dpo.make_loss(model_cfg, cfg.dpo, cfg.loss.seq_chunk)
  reference = jax.tree.map(jnp.copy, params)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(p, opt):
    (loss, (n, stats)), grads = jax.value_and_grad(lambda q: (lambda r: (r[0] / r[1], r[1:]))(
        loss_fn(q, batch, reference, None)), has_aux=True)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss, stats["ranking_accuracy"] / n

  opt, losses = tx.init(params), []
  for _ in range(8):
    params, opt, loss, _ = step(params, opt)
    losses.append(float(loss))
  assert abs(losses[0] - np.log(2)) < 1e-5  # the policy starts as its reference: delta = 0
  assert losses[-1] < 0.5 * losses[0]
  assert float(step(params, opt)[3]) == 1.0  # every pair ranked as its label says


def _bad(tiny, tmp_path, **changes):
  cfg = ml_collections.ConfigDict(tiny[0].to_dict())
  cfg.init_from = str(tmp_path / "nowhere")
  for key, value in changes.items():
    block, field = key.split("__")
    cfg[block][field] = value
  return cfg


@pytest.mark.parametrize("changes,message", [
    ({"dpo__beta": 0.0}, r"dpo\.beta=0\.0: a positive scale"),
    ({"dpo__labels": "binary"}, r"dpo\.labels='binary'"),
    ({"data__source": "chat"}, r"data\.source='chat': DPO reads preference pairs"),
    ({"dpo__label_smoothing": 0.6}, r"label_smoothing=0\.6"),
], ids=["beta", "labels", "source", "smoothing"])
def test_bad_dpo_config_is_one_error_before_any_work(tiny, tmp_path, changes, message):
  with pytest.raises(UserError, match=message):
    dpo.run(_bad(tiny, tmp_path, **changes), str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_a_pair_longer_than_seq_len_is_named_before_any_step(tiny):
  cfg, tokenizer, *_ = tiny
  data = ml_collections.ConfigDict(cfg.data.to_dict())
  data.seq_len = 16
  with pytest.raises(UserError, match=r"train\.jsonl:1: prompt \+ response is \d+ tokens, more than data\.seq_len=16"):
    preference.train_iterator(data, tokenizer, 4, 0, (0, 4))
