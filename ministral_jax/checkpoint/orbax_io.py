"""Model checkpoints: params as a plain nested dict (orbax) plus the model config (JSON).

A directory written by `save_params`:

    <dir>/params/            orbax PyTree checkpoint of the param dict
    <dir>/model_config.json  ModelConfig.to_dict()
    <dir>/metadata.json      {"format": ..., "layout": "stacked_layers/v1", "param_count": ...}

The whole directory is written under a temporary sibling name and renamed
into place when complete, so a crash never leaves a directory that looks
like a valid checkpoint. Restoring builds the target shardings from a
`Partitioner`, so a checkpoint saved on one mesh restores onto any other.
Training checkpoints (with optimizer and data-iterator state) are written by
the trainer's CheckpointManager; they store params in this same layout.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ministral_jax.errors import UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ARCH_FIELDS, ModelConfig, param_count

FORMAT = "ministral_jax/params/v1"
CONFIG_FILE = "model_config.json"
METADATA_FILE = "metadata.json"


def save_params(path: str | epath.Path, params: Any, cfg: ModelConfig, overwrite: bool = False,
                extra_metadata: dict[str, Any] | None = None,
                write_extra: Callable[[epath.Path], None] | None = None) -> epath.Path:
  """Writes params + config atomically; refuses to replace an existing checkpoint by default.

  `write_extra(tmp_dir)` may add files (e.g. a pruning report) that then appear
  together with the checkpoint, or not at all.
  """
  path = epath.Path(path)
  _check_tree_matches_config(params, cfg, where="the params to save")
  if path.exists() and not overwrite:
    raise FileExistsError(f"Checkpoint directory {path} already exists. Pass overwrite=True or choose "
                          "another path.")
  # The same hidden name on every host of a pod (orbax writes the arrays from all of them); a leftover of a
  # crashed save never looks like a checkpoint and is cleared here.
  tmp = path.parent / f".{path.name}.tmp"
  primary = jax.process_index() == 0
  if primary:
    if tmp.exists():
      tmp.rmtree()
    tmp.mkdir(parents=True)
  _sync_hosts("save_params:start")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / "params", params)
      ckptr.wait_until_finished()
    if primary:
      _write_json(tmp / CONFIG_FILE, cfg.to_dict())
      _write_json(tmp / METADATA_FILE, {"format": FORMAT, "layout": transformer.LAYOUT,
                                        "param_count": param_count(cfg), **(extra_metadata or {})})
      if write_extra is not None:
        write_extra(tmp)
      if path.exists():
        path.rmtree() if path.is_dir() else path.unlink()
      tmp.rename(path)
    _sync_hosts("save_params:done")
  except BaseException:
    if primary and tmp.exists():
      tmp.rmtree()
    raise
  return path


def _sync_hosts(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _write_json(path: epath.Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2))


def load_config(path: str | epath.Path, **exec_overrides: Any) -> ModelConfig:
  """The checkpoint's ModelConfig; execution fields (dtype, remat, ...) may be overridden."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No checkpoint at {path}.")
  for name in (CONFIG_FILE, METADATA_FILE):
    if not (path / name).exists():
      raise UserError(f"{path} is not a complete ministral_jax checkpoint: {name} is missing. It may be "
                       "an interrupted write or another format (use checkpoint.convert for HF/native).")
  meta = json.loads((path / METADATA_FILE).read_text())
  if meta.get("layout") != transformer.LAYOUT:
    raise UserError(f"{path} has parameter layout {meta.get('layout')!r}; this code reads "
                     f"{transformer.LAYOUT!r}.")
  cfg_dict = json.loads((path / CONFIG_FILE).read_text())
  arch = sorted(set(exec_overrides) & set(ARCH_FIELDS))
  if arch:
    raise UserError(f"Cannot override architecture fields {arch} when loading {path}; only execution "
                     "fields (dtype, param_dtype, remat_policy, scan_layers, attention_impl, ...) may change.")
  return ModelConfig.from_dict({**cfg_dict, **exec_overrides})


def load_params(path: str | epath.Path, partitioner=None, **exec_overrides: Any
                ) -> tuple[Any, ModelConfig]:
  """Restores params (sharded by `partitioner`'s rules if given, else on one device)."""
  path = epath.Path(path)
  cfg = load_config(path, **exec_overrides)
  abstract = transformer.abstract_params(cfg)
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(path / "params").item_metadata
    _check_tree_matches_config(stored, cfg, where=f"checkpoint {path}")
    shardings = (partitioner.param_shardings(cfg) if partitioner is not None
                 else jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = ckptr.restore(path / "params", target)
  return params, cfg


def _check_tree_matches_config(tree: Any, cfg: ModelConfig, where: str) -> None:
  """One error listing every missing, unexpected or misshapen tensor."""
  expected = {jax.tree_util.keystr(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(transformer.abstract_params(cfg))[0]}
  got = {jax.tree_util.keystr(p): tuple(np.shape(x) if not hasattr(x, "shape") else x.shape)
         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  problems = [f"missing {k}" for k in expected if k not in got]
  problems += [f"unexpected {k}" for k in got if k not in expected]
  problems += [f"{k}: shape {got[k]} but the config implies {expected[k]}"
               for k in expected if k in got and got[k] != expected[k]]
  if problems:
    raise UserError(f"{where} does not match its model config:\n  " + "\n  ".join(problems))
