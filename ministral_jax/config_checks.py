"""Range checks on experiment config blocks, run before a job does any work.

Each function returns the problems it finds as `block.field=value: what is
expected` lines, so a job reports every bad field in one error instead of
the first one it happens to touch (and never a ZeroDivisionError at step 50).
`require(problems)` raises the single UserError. The checks that need the
model, the mesh or the data (a batch the mesh cannot split, `seq_len` past
`max_seq_len`, an empty eval split) live with the code that has those.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import ml_collections
from etils import epath

from ministral_jax.errors import UserError

Check = tuple[str, Callable[[Any], bool], str]  # (field, predicate, what is expected)


def _run(block: ml_collections.ConfigDict | None, name: str, checks: Iterable[Check]) -> list[str]:
  if block is None:
    return []
  problems = []
  for field, ok, expected in checks:
    if field in block and not ok(block[field]):
      problems.append(f"{name}.{field}={block[field]!r}: {expected}")
  return problems


def _at_least(n: int) -> Callable[[Any], bool]:
  return lambda v: v >= n


def train(block: ml_collections.ConfigDict) -> list[str]:
  return _run(block, "train", [
      ("steps", _at_least(1), "train for at least 1 step"),
      ("global_batch", _at_least(1), "at least 1 sequence per step"),
      ("grad_accum", _at_least(1), "at least 1 microbatch (1 = no accumulation)"),
      ("log_every", _at_least(1), "log at least every N >= 1 steps"),
      ("checkpoint_every", _at_least(1), "checkpoint at least every N >= 1 steps"),
      ("keep_checkpoints", _at_least(1), "keep at least 1 checkpoint (0 would delete each one after saving it)"),
      ("eval_every", _at_least(0), "0 (no periodic eval) or a positive interval"),
      ("eval_batches", _at_least(0), "0 (the whole eval split) or a positive count"),
      ("peak_flops_per_device", _at_least(0.0), "0 (look it up) or the device's peak FLOP/s"),
  ])


def optimizer(block: ml_collections.ConfigDict) -> list[str]:
  return _run(block, "optimizer", [
      ("lr", lambda v: v > 0, "a positive learning rate"),
      ("schedule", lambda v: v in ("cosine", "wsd", "constant"), "'cosine', 'wsd' or 'constant'"),
      ("warmup_steps", _at_least(0), "0 or more steps"),
      ("min_lr_ratio", lambda v: 0 <= v <= 1, "a fraction of lr in [0, 1]"),
      ("wsd_decay_fraction", lambda v: 0 < v <= 1, "a fraction of training in (0, 1]"),
      ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
      ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
      ("eps", lambda v: v > 0, "positive"),
      ("weight_decay", _at_least(0.0), "0 or more"),
      ("clip_norm", _at_least(0.0), "0 (off) or a positive norm"),
  ])


def data(block: ml_collections.ConfigDict) -> list[str]:
  from ministral_jax.data import pipeline, sources  # the data stack is heavy; import on use
  return _run(block, "data", [
      ("source", lambda v: v in pipeline.SOURCES, f"one of {pipeline.SOURCES}"),
      ("seq_len", _at_least(2), "at least 2 tokens (an input and its target)"),
      ("text_unit", lambda v: v in sources.TEXT_UNITS, f"one of {sources.TEXT_UNITS}"),
      ("max_documents", _at_least(0), "0 (all) or a positive count"),
      ("start_document", _at_least(0), "0 or more"),
      ("epochs", _at_least(0), "0 (repeat forever) or a positive count"),
      ("tokenizer", bool, "a bundled name, a file path, or 'spm_train'"),
      ("paths", lambda v: block.source not in ("text", "jsonl", "chat", "preference") or bool(v.strip()),
       "comma-separated files or globs (required for source='text', 'jsonl', 'chat' or 'preference')"),
      ("chat_pack_bins", _at_least(1), "at least 1 row being filled at a time"),
      ("tfds_name", lambda v: block.source != "tfds" or bool(v), "a TFDS dataset name (required for source='tfds')"),
  ])


def loss(block: ml_collections.ConfigDict) -> list[str]:
  return _run(block, "loss", [
      ("seq_chunk", _at_least(1), "a positive chunk length"),
      ("vocab_chunk", _at_least(1), "a positive chunk width"),
  ])


def distill(block: ml_collections.ConfigDict) -> list[str]:
  return _run(block, "distill", [
      ("temperature", lambda v: v > 0, "a positive temperature"),
      ("ce_weight", lambda v: 0 <= v <= 1, "a weight in [0, 1]"),
      ("teacher_context", lambda v: v in ("own", "student"), "'own' or 'student'"),
  ])


def training_job(cfg: ml_collections.ConfigDict) -> list[str]:
  """Every block a training job reads."""
  return (train(cfg.train) + optimizer(cfg.optimizer) + data(cfg.data) + loss(cfg.get("loss"))
          + distill(cfg.get("distill")))


def workdir(path: str | None) -> list[str]:
  """The workdir must be named, and must be a directory (or not exist yet)."""
  if not path or not str(path).strip():
    return ["--workdir is empty: name a directory for this job's checkpoints and results"]
  p = epath.Path(path)
  if p.exists() and not p.is_dir():
    return [f"--workdir={path} is a file, not a directory"]
  if "://" not in str(path):
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
      return [f"--workdir={path}: {parent} is not writable"]
  return []


def require(problems: list[str], what: str = "The config") -> None:
  if problems:
    raise UserError(f"{what} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
