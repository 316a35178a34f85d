"""Task `prune`: a parent checkpoint, calibration data and a target config -> a child checkpoint.

    python -m ministral_jax.main --config=configs/prune_tiny.py --workdir=DIR --config.prune.parent=PARENT

The parent (`prune.parent`: orbax params, or a Hugging Face or Mistral-native
directory read directly) is never modified. The target is the experiment's
`model` block. Calibration batches come from the experiment's `data` block
(the trainers' pipeline, a seeded sample of the train split). Written to
`<workdir>/params/`, atomically and all together:

    params/, model_config.json, metadata.json   the child, an orbax params checkpoint
    prune_report.json   parent and child configs, per-layer scores, layers removed, the PCA
                        explained variance at the kept width, FFN channels kept per layer
    prune_scores.npz    every score and the whole explained-variance curve (for plots)

Everything that can be wrong (the parent, the target, the mesh, the data) is
checked before the parent's weights are read. Run it again with the same
workdir and config and it finds the child and stops; a workdir holding a
different child is an error.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import time
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np
from etils import epath

from ministral_jax import faults, sharding, workdir_lock
from ministral_jax.checkpoint import convert, orbax_io
from ministral_jax.data import pipeline, tokenizers
from ministral_jax.errors import UserError
from ministral_jax.model.config import ModelConfig, param_count
from ministral_jax.prune import pruner

REPORT_FILE = "prune_report.json"
SCORES_FILE = "prune_scores.npz"


@dataclasses.dataclass
class Job:
  """A checked prune job: everything but the parent's weights."""
  parent_cfg: ModelConfig
  target: ModelConfig
  partitioner: sharding.Partitioner
  tokenizer: tokenizers.Tokenizer
  batches: Callable[[], Iterable[dict]]
  identity: dict[str, Any]


def calibration_batches(cfg: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
                        partitioner: sharding.Partitioner) -> Callable[[], Iterable[dict]]:
  """The same seeded sample of the train split at every call (re-calibration reads it again); each
  process reads its rows of every global calibration batch."""
  pcfg = cfg.prune
  rows = partitioner.process_rows(pcfg.calibration_batch_size)

  def batches() -> Iterable[dict]:
    it = pipeline.train_iterator(cfg.data, tokenizer, pcfg.calibration_batch_size, seed=pcfg.seed, rows=rows)
    return itertools.islice(it, pcfg.calibration_batches)
  return batches


def prepare(cfg: ml_collections.ConfigDict, workdir: str, partitioner: sharding.Partitioner | None = None) -> Job:
  """Every check, before any weight is read."""
  path = cfg.prune.parent
  if not path or not epath.Path(path).exists():
    raise UserError(f"prune.parent={path!r} does not exist. Point it at an orbax params, HF or "
                     "Mistral-native checkpoint directory (e.g. a pretraining run's <workdir>/params).")
  parent_cfg = convert.load_config_any(path)
  target = ModelConfig.from_dict(cfg.model)
  pruner.check(parent_cfg, target, cfg.prune)
  partitioner = partitioner or sharding.Partitioner.from_config(cfg.mesh)
  partitioner.param_shardings(parent_cfg)  # the mesh must divide both models
  partitioner.param_shardings(target)
  partitioner.check_batch(cfg.prune.calibration_batch_size)
  tokenizer = pipeline.build_tokenizer(cfg.data, workdir)
  tokenizers.check_vocab_fits(tokenizer, parent_cfg.vocab_size)
  tokenizers.check_same(convert.recorded_tokenizer(path), tokenizer.identity(), f"prune.parent={path}",
                        "the calibration data (data.tokenizer)")
  batches = calibration_batches(cfg, tokenizer, partitioner)
  first = next(iter(batches()), None)
  if first is None or not np.any(first["segment_ids"] != 0):
    raise UserError("The calibration data is empty: config.data gave no tokens. Point it at a non-empty corpus.")
  identity = {"parent": str(path), "target": target.arch_dict(), "prune": cfg.prune.to_dict(),
              "data": cfg.data.to_dict()}
  return Job(parent_cfg, target, partitioner, tokenizer, batches, identity)


def _existing(out: epath.Path, identity: dict) -> dict | None:
  """The report of a finished job in this workdir (None if there is none); another job's is an error."""
  if not out.exists():
    return None
  if not (out / REPORT_FILE).exists():
    raise UserError(f"{out} exists but holds no {REPORT_FILE}: it is not a prune result. Use a new --workdir.")
  report = json.loads((out / REPORT_FILE).read_text())
  diff = sorted(k for k in identity if json.loads(json.dumps(identity[k])) != report.get("job", {}).get(k))
  if diff:
    raise UserError(f"{out} holds the child of a different prune job (differs in: {', '.join(diff)}). "
                     "Use a new --workdir, or the config that wrote it.")
  return report


def _writer(report: dict, arrays: dict[str, np.ndarray]) -> Callable[[epath.Path], None]:
  def write(tmp: epath.Path) -> None:
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (tmp / SCORES_FILE).write_bytes(buf.getvalue())
  return write


def summary(report: dict) -> str:
  """A few Markdown lines a researcher reads at a glance."""
  rows = ["| step | scorer | change | note |", "|---|---|---|---|"]
  layers, hidden, ffn = (report.get(k) for k in ("layers", "hidden", "ffn"))
  if layers:
    rows.append(f"| layers | {layers['scorer']} | {len(layers['scores'])} -> {len(layers['kept'])} | "
                f"removed {layers['removed']} |")
  if hidden:
    notes = [f"{label} {hidden[key]:.6f}" for key, label in (("explained_variance", "explained variance"),
                                                              ("energy_kept", "raw energy kept")) if hidden.get(key) is not None]
    note = ", ".join(notes)
    rows.append(f"| hidden | {hidden['scorer']} | {hidden['d_model'][0]} -> {hidden['d_model'][1]} | {note} |")
  if ffn:
    rows.append(f"| ffn | {ffn['scorer']} | {ffn['d_ffn'][0]} -> {ffn['d_ffn'][1]} | score kept "
                f"{np.mean(ffn['score_fraction_kept']):.4f} (mean over layers) |")
  counts = report["param_count"]
  rows.append(f"\nParameters {counts['parent']:,} -> {counts['child']:,}; "
              f"{report['calibration_tokens']:,} calibration tokens.")
  return "\n".join(rows)


def run(cfg: ml_collections.ConfigDict, workdir: str, partitioner: sharding.Partitioner | None = None) -> dict:
  with workdir_lock.hold(workdir):
    return _run(cfg, workdir, partitioner)


def _run(cfg: ml_collections.ConfigDict, workdir: str, partitioner: sharding.Partitioner | None) -> dict:
  out = epath.Path(workdir) / "params"
  job = prepare(cfg, workdir, partitioner)
  done = _existing(out, job.identity)
  if done is not None:
    print(f"{out} already holds this job's child; nothing to do.\n" + summary(done))
    return done
  start = time.time()
  params, parent_cfg = convert.load_any(cfg.prune.parent, job.partitioner)
  loaded = time.time()
  result = pruner.prune(params, parent_cfg, job.target, cfg.prune, job.batches, job.partitioner)
  jax.block_until_ready(result.params)
  faults.point("prune.after_calibration")
  pruned = time.time()
  report = {"job": job.identity, "parent_config": parent_cfg.to_dict(), "child_config": job.target.to_dict(),
            "param_count": {"parent": param_count(parent_cfg), "child": param_count(job.target)},
            **result.report, "seconds": {"load": loaded - start, "prune": pruned - loaded}}
  orbax_io.save_params(out, result.params, result.cfg,
                       extra_metadata={"task": "prune", "tokenizer": job.tokenizer.identity()},
                       write_extra=_writer(report, result.arrays))
  print(summary(report) + f"\nWrote {out} (prune {pruned - loaded:.1f}s, load {loaded - start:.1f}s).")
  return report
