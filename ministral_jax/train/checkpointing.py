"""Training checkpoints: train state + data-iterator state + the experiment's identity.

One orbax `CheckpointManager` per workdir (`<workdir>/checkpoints/<step>/`)
with three items: `state` (params, optimizer state, step; params in the
canonical layout of `model/transformer.py`), `data` (the grain iterator's
state as JSON) and `meta` (model config and task). Saves are asynchronous;
orbax writes each step under a temporary name and commits it at the end,
so a killed job never leaves a step that looks complete. A restart with the
same workdir resumes from the latest step without being asked.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

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
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state),
                                          meta=ocp.args.JsonSave(meta)), force=force)


def check_same_experiment(mngr: ocp.CheckpointManager, step: int, model_cfg: ModelConfig, task: str,
                          workdir: str) -> None:
  """A workdir holding another experiment's checkpoints is an error, not a silent restore."""
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  saved = ModelConfig.from_dict(meta["model"])
  problems = saved.mismatches(model_cfg)
  if meta.get("task") != task:
    problems.append(f"task: {meta.get('task')!r} != {task!r}")
  if problems:
    raise ValueError(f"Workdir {workdir} holds checkpoints of a different experiment (step {step}):\n  "
                     + "\n  ".join(problems) + "\nUse a new --workdir, or the config that wrote these.")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """Restores onto the shardings carried by `abstract_state` (any mesh)."""
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                        data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def latest_data_state(workdir: str) -> dict:
  """The data-iterator state saved with a run's latest checkpoint (where its stream stopped)."""
  with ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state", "data", "meta")) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise ValueError(f"{workdir} holds no training checkpoint.")
    return mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
