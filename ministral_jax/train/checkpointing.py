"""Training checkpoints: train state + data-iterator state + the experiment's identity.

One orbax `CheckpointManager` per workdir (`<workdir>/checkpoints/<step>/`)
with three items: `state` (params, optimizer state, step; params in the
canonical layout of `model/transformer.py`), `data` (every process's grain
iterator state as JSON: orbax writes JSON from the primary host only, so the
states are gathered there first and each process restores its own) and
`meta` (model config and task). Saves are asynchronous;
orbax writes each step under a temporary name and commits it at the end,
so a killed job never leaves a step that looks complete. A restart with the
same workdir resumes from the latest step without being asked.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ministral_jax.errors import UserError
from ministral_jax.model.config import ModelConfig


def checkpoint_dir(workdir: str) -> epath.Path:
  """`<workdir>/checkpoints`; a gs:// workdir stays a gs:// URL (epath, never pathlib)."""
  return epath.Path(workdir) / "checkpoints"


def manager(workdir: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state", "data", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, meta: dict,
         force: bool = False) -> None:
  data = {"processes": _gather_json(data_state)}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                          meta=ocp.args.JsonSave(meta)), force=force)


def _gather_json(obj: Any) -> list[Any]:
  """Every process's `obj`, in process order, on every process (as padded bytes through the devices)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))  # [processes, longest]
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


def _own(data: dict) -> dict:
  """This process's iterator state out of a `data` item."""
  states = data["processes"]
  if len(states) != jax.process_count():
    raise UserError(f"The checkpoint holds the data streams of {len(states)} processes, this job has "
                     f"{jax.process_count()}; the input pipeline cannot resume on another process count.")
  return states[jax.process_index()]


def check_same_experiment(mngr: ocp.CheckpointManager, step: int, model_cfg: ModelConfig, task: str,
                          workdir: str) -> None:
  """A workdir holding another experiment's checkpoints is an error, not a silent restore."""
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  saved = ModelConfig.from_dict(meta["model"])
  problems = saved.mismatches(model_cfg)
  if meta.get("task") != task:
    problems.append(f"task: {meta.get('task')!r} != {task!r}")
  if problems:
    raise UserError(f"Workdir {workdir} holds checkpoints of a different experiment (step {step}):\n  "
                     + "\n  ".join(problems) + "\nUse a new --workdir, or the config that wrote these.")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """Restores onto the shardings carried by `abstract_state` (any mesh)."""
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                        data=ocp.args.JsonRestore()))
  return restored["state"], _own(restored["data"])


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def latest_data_state(workdir: str) -> dict:
  """The data-iterator state saved with a run's latest checkpoint (where its stream stopped)."""
  with ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state", "data", "meta")) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise UserError(f"{workdir} holds no training checkpoint.")
    return _own(mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"])
