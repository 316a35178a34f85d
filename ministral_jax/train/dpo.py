"""Trainer `dpo`: offline Direct Preference Optimization on pairs from files, against a frozen reference.

Each step takes `train.global_batch` pairs (`data/preference.py`: a prompt, two responses, P(first > second)),
scores both responses under the policy and under the reference (the starting checkpoint, frozen on the same
mesh, passed to the step as an argument), and minimises `dpo_loss.pair_losses` of the margin

    delta = beta * [(log pi(y1) - log pi_ref(y1)) - (log pi(y2) - log pi_ref(y2))]

with the label `dpo.labels` names: "hard" (1: sigmoid DPO; `dpo.label_smoothing` eps makes it 1 - eps, cDPO)
or "soft" (the pair's own p, the form Online DPO trains with). Log-probabilities are sums over each response's
tokens. The loss is a mean over pairs; the eval reports it on held-out pairs with the ranking accuracy (the
share of pairs where the policy's implicit reward orders the responses as the label does) and the margin.

Everything else (resume, SIGTERM, the non-finite stop, metrics, checkpoints) is the shared loop's; the pair
iterator's position is in every checkpoint.
"""

from __future__ import annotations

import copy
import json
import random
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from ministral_jax import files, multihost
from ministral_jax.checkpoint import convert
from ministral_jax.data import preference
from ministral_jax.errors import UserError
from ministral_jax.model.config import ModelConfig, flops_per_token
from ministral_jax.rewards import tasks as task_suite
from ministral_jax.train import dpo_loss, loop, pretrain, sft
from ministral_jax.train.losses import token_log_probs

LABELS = ("hard", "soft")


def dpo_config(beta: float = 0.1, labels: str = "hard") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(beta=beta, labels=labels, label_smoothing=0.0))


def loss_problems(d: ml_collections.ConfigDict, block: str) -> list[str]:
  """What is wrong with a DPO loss's beta and labels (the `dpo` or `odpo` block)."""
  problems = []
  if not d.beta > 0:
    problems.append(f"{block}.beta={d.beta!r}: a positive scale of the log-ratio margin (0.1 is usual)")
  if d.labels not in LABELS:
    problems.append(f"{block}.labels={d.labels!r}: one of {LABELS}")
  return problems


def check(cfg: ml_collections.ConfigDict) -> None:
  d, problems = cfg.dpo, []
  if cfg.data.source != "preference":
    problems.append(f"data.source={cfg.data.source!r}: DPO reads preference pairs; set data.source='preference' "
                    "and data.paths to JSONL files of {\"prompt\", \"chosen\", \"rejected\"[, \"p\"]}")
  problems += loss_problems(d, "dpo")
  if not 0.0 <= d.label_smoothing < 0.5:
    problems.append(f"dpo.label_smoothing={d.label_smoothing!r}: in [0, 0.5)")
  if d.labels == "soft" and d.label_smoothing:
    problems.append("dpo.label_smoothing applies to hard labels; soft labels carry their own probability")
  problems += sft.start_problems(cfg, "DPO")
  if problems:
    raise UserError("The DPO config has problems:\n  " + "\n  ".join(problems))


def sequence_log_probs(model_cfg: ModelConfig, params: Any, batch: dict, seq_chunk: int) -> jax.Array:
  """`[rows]` log pi(response) of each row: the sum over its masked target tokens."""
  hidden, head = pretrain.hidden_and_head(model_cfg, params, batch)
  logp, _ = token_log_probs(hidden, head, batch["targets"], seq_chunk=seq_chunk)
  return dpo_loss.sequence_log_probs(logp, pretrain.token_mask(batch))


def make_loss(model_cfg: ModelConfig, d: ml_collections.ConfigDict, seq_chunk: int,
              labels_from_batch: bool = False) -> loop.LossFn:
  """The DPO loss of `dpo_loss` on a batch of pairs (rows 2i, 2i + 1), shared by offline and Online DPO.

  The label is the batch's `label` with soft labels (or `labels_from_batch`: Online DPO makes its labels in
  the rollout), else 1 - `d.label_smoothing`. A batch's `pair_weight` (0 or 1 per pair) drops pairs.
  `d.beta_rescale` "length" makes beta per pair beta * beta_tokens / (the pair's mean response length in
  tokens): the margin is then a difference of per-token log-ratios, on one scale whatever the lengths."""
  def loss_fn(params, batch, reference, rng):
    del rng
    policy = sequence_log_probs(model_cfg, params, batch, seq_chunk).reshape(-1, 2)  # [pairs, 2]
    ref = jax.lax.stop_gradient(sequence_log_probs(model_cfg, reference, batch, seq_chunk)).reshape(-1, 2)
    pair_col = lambda x: x[:, 0].reshape(-1, 2)[:, 0]  # [rows, 1] -> [pairs]
    label = pair_col(batch["label"]) if labels_from_batch or d.labels == "soft" else 1.0 - d.label_smoothing
    tokens = pretrain.token_mask(batch).sum(axis=-1).reshape(-1, 2)
    real = jnp.all(tokens > 0, axis=1).astype(jnp.float32)  # eval batches end with empty filler pairs
    if "pair_weight" in batch:
      real = real * pair_col(batch["pair_weight"])
    beta = d.beta
    if d.get("beta_rescale", "none") == "length":
      beta = d.beta * d.beta_tokens / jnp.maximum(tokens.mean(axis=1), 1.0)
    delta = dpo_loss.margin(policy[:, 0], ref[:, 0], policy[:, 1], ref[:, 1], beta)
    stats = dpo_loss.pair_stats(delta * real, label * real, beta, policy[:, 0] * real, ref[:, 0] * real,
                                policy[:, 1] * real, ref[:, 1] * real)
    return jnp.sum(dpo_loss.pair_losses(delta, label) * real), jnp.sum(real), stats
  return loss_fn


RULE_KINDS = ("wrong", "verbose", "loop")
STYLES = ("reasoning", "answer")


def pairs_config(family: str = "arithmetic", level: int = 1, train: int = 2000, eval_: int = 128,
                 kinds: tuple[str, ...] = RULE_KINDS, seed: int = 0, style: str = "reasoning"
                 ) -> ml_collections.ConfigDict:
  """Pairs the job makes from the task suite by stated rules (`rule_pair`), the kinds taken in turn."""
  return ml_collections.ConfigDict(dict(family=family, level=level, train=train, eval=eval_, kinds=kinds,
                                        seed=seed, style=style))


def rule_pair(problem: task_suite.Problem, kind: str, rng: random.Random, style: str = "reasoning") -> dict:
  """One pair by a stated rule, p = 1; the chosen side is always the suite's short worked solution.
    wrong:   a correct solution beats the same solution with its result (every whole-number occurrence) changed;
    verbose: among correct solutions the concise one wins: the short chain of thought beats the long one;
    loop:    a looping response always loses: its first line repeated, never reaching an answer.
  `style` "reasoning": responses are [THINK] chain of thought [/THINK] answer; "answer": the answer alone
  (the instruct format, and what a PWRM reads once the thinking is stripped), the long chain of thought
  written out as the verbose answer."""
  if style not in STYLES:
    raise UserError(f"pairs.style={style!r}: one of {STYLES}")
  short = task_suite.to_conversation(problem, "short")["messages"]
  strip = lambda m: {k: v for k, v in m.items() if k != "role"}
  chosen = strip(short[-1]) if style == "reasoning" else strip(task_suite.to_conversation(problem, "instruct")["messages"][-1])
  if kind == "wrong":
    result = re.compile(rf"(?<![\d.]){re.escape(problem.answer)}(?![\d.])")
    wrong = str(int(problem.answer) + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11]))
    rejected = {k: result.sub(wrong, v) for k, v in chosen.items()}
  elif kind == "verbose":
    rejected = strip(task_suite.to_conversation(problem, "long")["messages"][-1])
    if style == "answer":
      rejected = {"content": rejected["thinking"]}
  elif kind == "loop":
    line = (chosen.get("thinking") or chosen["content"]).splitlines()[0]
    rejected = ({"content": line, "thinking": "\n".join([line] * 6)} if style == "reasoning"
                else {"content": "\n".join([line] * 6)})
  else:
    raise UserError(f"pairs.kinds has {kind!r}; use any of {RULE_KINDS}")
  return {"prompt": short[:-1], "chosen": chosen, "rejected": rejected, "p": 1.0}


def write_task_pairs(p: ml_collections.ConfigDict, root) -> tuple[str, str]:
  """<root>/train.jsonl and eval.jsonl of rule pairs (`rule_pair`, kind i % len(kinds) for problem i) over the
  suite's integer-answer problems, written once (atomically); their paths."""
  train, evals = root / "train.jsonl", root / "eval.jsonl"
  if not (train.exists() and evals.exists()):
    root.mkdir(parents=True, exist_ok=True)
    for path, split, n in ((train, "train", p.train), (evals, "eval", p.eval)):
      problems = [q for q in task_suite.generate(p.family, p.level, split, n, p.seed)
                  if re.fullmatch(r"-?\d+", q.answer)]
      if not problems:
        raise UserError(f"pairs.family={p.family!r} level {p.level} has no integer answers to corrupt; use "
                        "arithmetic, or give data.paths")
      rng = random.Random(f"pairs:{p.seed}:{split}")
      pairs = [rule_pair(q, p.kinds[i % len(p.kinds)], rng, p.get("style", "reasoning"))
               for i, q in enumerate(problems)]
      files.write_text(path, "".join(json.dumps(pair) + "\n" for pair in pairs))
  multihost.sync(f"pairs:{root}")  # process 0 writes them; the others read them after this
  return str(train), str(evals)


def make_task(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, partitioner) -> loop.Task:
  shardings = partitioner.param_shardings(model_cfg)
  reference, _ = convert.load_or_init(cfg.init_from, model_cfg, partitioner, cfg.seed)
  pair_tokens = 2 * cfg.data.seq_len
  loss_fn = make_loss(model_cfg, cfg.dpo, cfg.loss.seq_chunk)
  return loop.Task("dpo", loss_fn, frozen=reference, frozen_shardings=shardings, row_group=2,
                   train_data=preference.train_iterator, eval_data=preference.eval_batches, perplexity=False,
                   tokens_per_step=cfg.train.global_batch * pair_tokens,
                   extra_flops_per_token=flops_per_token(model_cfg, cfg.data.seq_len, backward=False))


def prepare(cfg: ml_collections.ConfigDict, workdir: str, job: str = "dpo") -> ml_collections.ConfigDict:
  """A job on preference pairs with what it makes itself made first: its SFT starting point, its rule pairs
  (`pairs`)."""
  cfg = copy.deepcopy(cfg)
  with cfg.unlocked():
    if not cfg.data.paths and cfg.get("pairs"):
      cfg.data.paths, cfg.data.eval_paths = write_task_pairs(cfg.pairs, epath.Path(workdir) / "pairs")
  return sft.prepare_after_stage(cfg, workdir, job)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  check(cfg)
  cfg = prepare(cfg, workdir)
  return loop.run(cfg, workdir, make_task)
