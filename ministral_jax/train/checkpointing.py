"""Training checkpoints: train state + data-iterator state + the experiment's identity.

One orbax `CheckpointManager` per workdir (`<workdir>/checkpoints/<step>/`)
with three items: `state` (params, optimizer state, step; params in the
canonical layout of `model/transformer.py`), `data` (every process's grain
iterator state as JSON: orbax writes JSON from the primary host only, so the
states are gathered there first; on restore they are merged and each process
takes its rows, so a run resumes on any process count) and
`meta`: the model config, the task, the training settings, the tokenizer and
a fingerprint of every tensor of the state (`checkpoint/integrity.py`).

Saves are asynchronous; orbax writes each step under a temporary name and
commits it at the end, so a killed job never leaves a step that looks
complete. A restart with the same workdir resumes from the newest step that
restores and verifies: a damaged step (unreadable, or fingerprints that
differ from what was saved) is moved to `<workdir>/damaged_checkpoints/` with
a warning naming it, and the step before it is tried. Resuming with other
training settings than the checkpoint's is an error naming the fields
(`train.allow_resume_changes=True` accepts them); how a job runs, logs and
evaluates (`RESUMABLE`) may always change.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from ministral_jax import faults, multihost
from ministral_jax.checkpoint import integrity
from ministral_jax.data import pipeline, tokenizers
from ministral_jax.errors import UserError
from ministral_jax.model.config import ModelConfig

ITEMS = ("state", "data", "meta")
DAMAGED_DIR = "damaged_checkpoints"
# Config fields that may differ between the run that saved a checkpoint and the one that resumes it:
# the mesh, logging, evaluation and checkpoint cadence change how a job runs, not what it computes. The
# model is compared by architecture and the tokenizer by identity, separately.
RESUMABLE = ("mesh", "eval", "model", "task", "data.tokenizer", "train.log_every", "train.eval_every",
             "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoints",
             "train.peak_flops_per_device", "train.log_prefix", "train.allow_resume_changes",
             "train.flops_after")


def checkpoint_dir(workdir: str) -> epath.Path:
  """`<workdir>/checkpoints`; a gs:// workdir stays a gs:// URL (epath, never pathlib)."""
  return epath.Path(workdir) / "checkpoints"


def manager(workdir: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, meta: dict,
         force: bool = False) -> None:
  """Starts an async save; the fingerprints are taken from `state` now, on the devices."""
  data = {"processes": multihost.gather_json(data_state)}
  meta = {**meta, "fingerprints": integrity.fingerprints(state)}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                          meta=ocp.args.JsonSave(meta)), force=force)
  faults.point("checkpoint.save_started")


def settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as dotted fields, without the `RESUMABLE` ones: what a resumed run must agree on."""
  flat: dict[str, Any] = {}

  def walk(prefix: str, value: Any) -> None:
    if prefix in RESUMABLE:
      return
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f"{prefix}.{k}" if prefix else k, v)
    else:
      flat[prefix] = value
  walk("", json.loads(cfg.to_json()))
  return flat


def _all_processes(data: dict) -> dict:
  """Every process's iterator state in a `data` item, as one state of all slots (any process count
  restores from it: each process takes its own rows). An iterator without row slots (GRPO's prompts)
  keeps one state that every process shares."""
  states = data["processes"]
  if states and "slots" not in states[0]:
    if any(st != states[0] for st in states):
      raise UserError(f"The processes saved different data-iterator states: {states[:2]}...")
    return states[0]
  return pipeline.merge_states(states)


def check_resume(meta: dict, expected: dict, workdir: str, step: int, allow_changes: bool) -> None:
  """The checkpoint's experiment against this job's: another model or task is always an error (a
  different experiment); other settings or tokenizer are an error unless `allow_changes`."""
  problems = ModelConfig.from_dict(meta["model"]).mismatches(ModelConfig.from_dict(expected["model"]))
  if meta.get("task") != expected["task"]:
    problems.append(f"task: {meta.get('task')!r} != {expected['task']!r}")
  if problems:
    raise UserError(f"Workdir {workdir} holds checkpoints of a different experiment (step {step}):\n  "
                    + "\n  ".join(problems) + "\nUse a new --workdir, or the config that wrote these.")
  tokenizers.check_same(meta.get("tokenizer"), expected["tokenizer"], f"the checkpoint in {workdir} (step {step})",
                        "this job")
  saved, now = meta.get("settings"), expected["settings"]
  if saved is None or allow_changes:
    return
  changed = [f"{k}: {saved.get(k, '<absent>')!r} in the checkpoint, {now.get(k, '<absent>')!r} now"
             for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]
  if changed:
    raise UserError(f"Workdir {workdir} was trained to step {step} with other settings than this job's:\n  "
                    + "\n  ".join(changed) + "\nRun it with the settings it started with, use a new --workdir, or "
                    "pass --config.train.allow_resume_changes=True to continue with the new ones.")


def restore_intact(mngr: ocp.CheckpointManager, workdir: str, abstract_state: Any, expected: dict,
                   allow_changes: bool) -> tuple[int, Any, dict] | None:
  """(step, state, this process's data state) of the newest checkpoint that restores and verifies, or
  None when there is none. Damaged steps are moved aside with a warning; a checkpoint of another
  experiment is an error, never skipped."""
  for step in sorted(mngr.all_steps(), reverse=True):
    where = f"training checkpoint {checkpoint_dir(workdir) / str(step)}"
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any failure to read it is damage
      quarantine(mngr, workdir, step, f"its metadata cannot be read ({_first_line(e)})")
      continue
    check_resume(meta, expected, workdir, step, allow_changes)
    try:  # each process reads its own shards: one may fail where the others do not, so they agree first
      restored, failed = None, None
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                              data=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001
        failed = e
      multihost.agree(failed)
      integrity.verify(restored["state"], meta.get("fingerprints"), where)  # one collective pass, one answer
    except Exception as e:  # noqa: BLE001
      quarantine(mngr, workdir, step, _first_line(e))
      continue
    return step, restored["state"], _all_processes(restored["data"])
  return None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def quarantine(mngr: ocp.CheckpointManager, workdir: str, step: int, reason: str) -> None:
  """Moves a damaged step out of the manager's sight (kept for inspection, never deleted)."""
  src = checkpoint_dir(workdir) / str(step)
  dst = epath.Path(workdir) / DAMAGED_DIR / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
  if jax.process_index() == 0:
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
  multihost.sync(f"quarantine:{step}")
  mngr.reload()
  logging.warning("Training checkpoint step %d of %s is damaged (%s); moved it to %s and falling back to the "
                  "step before it.", step, workdir, reason, dst)


def latest_data_state(workdir: str) -> dict:
  """The data-iterator state saved with a run's latest checkpoint, all processes merged (its
  `next_document` and `skip_documents` say where the whole stream stopped)."""
  with ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise UserError(f"{workdir} holds no training checkpoint.")
    return _all_processes(mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"])


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
