"""Model checkpoints: params as a plain nested dict (orbax) plus the model config (JSON).

A directory written by `save_params`:

    <dir>/params/            orbax PyTree checkpoint of the param dict
    <dir>/model_config.json  ModelConfig.to_dict()
    <dir>/metadata.json      {"format": ..., "layout": "stacked_layers/v1", "param_count": ...,
                              "fingerprints": {tensor name: fingerprint}, ...what the writer added}

The whole directory is written under a temporary sibling name and renamed
into place when complete, so a crash never leaves a directory that looks
like a valid checkpoint. Restoring builds the target shardings from a
`Partitioner`, so a checkpoint saved on one mesh restores onto any other.

A restore hands out only weights that are finite and bit-identical to what
was saved (`integrity`): a file damaged on disk or in transit otherwise
loads silently (orbax/zstd do not checksum the tensor data) and shows up,
if ever, as a strange loss curve. Any failure to read a checkpoint becomes
one `damaged(...)` error naming it, not an orbax/tensorstore traceback.
Params holding NaN or Inf are refused at save time unless asked for.

Training checkpoints (with optimizer and data-iterator state) are written by
the trainer's CheckpointManager; they store params in this same layout and
may reuse `read_metadata`, `reading` and `damaged`.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ministral_jax import faults
from ministral_jax.checkpoint import integrity
from ministral_jax.errors import UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ARCH_FIELDS, ModelConfig, param_count

FORMAT = "ministral_jax/params/v1"
CONFIG_FILE = "model_config.json"
METADATA_FILE = "metadata.json"
_SHOWN = 8  # tensor names listed in one message


def save_params(path: str | epath.Path, params: Any, cfg: ModelConfig, overwrite: bool = False,
                extra_metadata: dict[str, Any] | None = None,
                write_extra: Callable[[epath.Path], None] | None = None,
                allow_non_finite: bool = False) -> epath.Path:
  """Writes params + config atomically; refuses to replace an existing checkpoint by default.

  `write_extra(tmp_dir)` may add files (e.g. a pruning report) that then appear
  together with the checkpoint, or not at all. Every process must call this
  (the fingerprints are one jitted pass over the global arrays). Params holding
  NaN or Inf are refused before anything is written, unless `allow_non_finite`.
  """
  path = epath.Path(path)
  _check_tree_matches_config(params, cfg, where="the params to save")
  if path.exists() and not overwrite:
    raise FileExistsError(f"Checkpoint directory {path} already exists. Pass overwrite=True or choose "
                          "another path.")
  fingerprints, non_finite = _summarize(params)
  if non_finite and not allow_non_finite:
    raise UserError(f"The params to save to {path} hold NaN or Inf in {len(non_finite)} tensor(s): "
                    f"{_names(non_finite)}. The model diverged (or its source is damaged); pass "
                    "allow_non_finite=True (convert: --allow_non_finite) to save them anyway.")
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
                                        "param_count": param_count(cfg), **(extra_metadata or {}),
                                        "fingerprints": fingerprints})
      if write_extra is not None:
        write_extra(tmp)
      faults.point("params.before_commit")
      if path.exists():
        path.rmtree() if path.is_dir() else path.unlink()
      tmp.rename(path)
    _sync_hosts("save_params:done")
  except BaseException:
    if primary and tmp.exists():
      tmp.rmtree()
    raise
  return path


def _summarize(params: Any) -> tuple[dict[str, str], list[str]]:
  """`integrity.summarize`; params that are all host arrays (a converter's) are summarized on the CPU
  backend, so a whole model is never copied onto one accelerator just to be fingerprinted."""
  if any(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
    return integrity.summarize(params)
  try:
    cpu = jax.devices("cpu")[0]
  except RuntimeError:  # a platform list without the CPU backend
    return integrity.summarize(params)
  with jax.default_device(cpu):
    return integrity.summarize(params)


def _names(names: list[str]) -> str:
  return ", ".join(names[:_SHOWN]) + (f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _sync_hosts(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _write_json(path: epath.Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2))


# --------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------
def damaged(path: str | epath.Path, cause: BaseException | str) -> UserError:
  """The one error for a checkpoint that cannot be read back: it, the first line of the cause, the fix."""
  return UserError(f"checkpoint {path} is damaged or incomplete: {_first_line(cause)}. Restore it from a "
                   "copy, or use another checkpoint.")


@contextlib.contextmanager
def reading(path: str | epath.Path) -> Iterator[None]:
  """Turns any failure inside the block into `damaged(path, ...)`.

  orbax and tensorstore raise bare Exception, ValueError, JSONDecodeError or
  FileNotFoundError for a damaged file, so everything is caught, except our
  own UserErrors and running out of memory (which is not the checkpoint's fault).
  """
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - see the docstring
    if _out_of_memory(e):
      raise
    raise damaged(path, e) from e


def read_metadata(path: str | epath.Path) -> dict[str, Any]:
  """A params checkpoint's metadata.json (format, layout, fingerprints, and what its writer added)."""
  return _read_json(epath.Path(path), METADATA_FILE)


def _read_json(path: epath.Path, name: str) -> dict[str, Any]:
  if not (path / name).exists():
    raise UserError(f"{path} is not a complete ministral_jax checkpoint: {name} is missing. It may be "
                    "an interrupted write or another format (use checkpoint.convert for HF/native).")
  try:
    obj = json.loads((path / name).read_text())
  except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8
    raise damaged(path, f"{name}: {_first_line(e)}") from None
  if not isinstance(obj, dict):
    raise damaged(path, f"{name} holds a JSON {type(obj).__name__}, not an object")
  return obj


def _chain(e: BaseException) -> list[BaseException]:
  """`e` and its causes, outermost first (orbax wraps tensorstore's precise error in a generic one)."""
  chain = [e]
  while True:
    inner = chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)
    if inner is None or any(inner is seen for seen in chain):
      return chain
    chain.append(inner)


def _first_line(cause: BaseException | str) -> str:
  """One short line of the innermost cause, without the JSON spec tensorstore appends.

  A long line keeps its start (the status code, the file) and its end
  (tensorstore nests "context: context: what went wrong").
  """
  if isinstance(cause, BaseException):
    root = _chain(cause)[-1]
    cause = str(root).strip() or type(root).__name__
  line = cause.strip().splitlines()[0].split(" [tensorstore_spec=")[0].strip().rstrip(".")
  return line if len(line) <= 300 else f"{line[:100]} ... {line[-190:]}"


def _out_of_memory(e: BaseException) -> bool:
  return any(isinstance(x, MemoryError) or "RESOURCE_EXHAUSTED" in str(x) for x in _chain(e))


def load_config(path: str | epath.Path, **exec_overrides: Any) -> ModelConfig:
  """The checkpoint's ModelConfig; execution fields (dtype, remat, ...) may be overridden."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No checkpoint at {path}.")
  cfg_dict = _read_json(path, CONFIG_FILE)
  meta = read_metadata(path)
  if meta.get("layout") != transformer.LAYOUT:
    raise UserError(f"{path} has parameter layout {meta.get('layout')!r}; this code reads "
                     f"{transformer.LAYOUT!r}.")
  arch = sorted(set(exec_overrides) & set(ARCH_FIELDS))
  if arch:
    raise UserError(f"Cannot override architecture fields {arch} when loading {path}; only execution "
                     "fields (dtype, param_dtype, remat_policy, scan_layers, attention_impl, ...) may change.")
  try:
    saved = ModelConfig.from_dict(cfg_dict)
  except UserError as e:
    raise UserError(f"{path / CONFIG_FILE}: {e}") from None
  return saved.replace(**exec_overrides)


def load_params(path: str | epath.Path, partitioner=None, *, allow_non_finite: bool = False,
                **exec_overrides: Any) -> tuple[Any, ModelConfig]:
  """Restores params (sharded by `partitioner`'s rules if given, else on one device), verified.

  On a multi-process job without a partitioner the params are sharded fsdp
  over all devices (`default_partitioner`): one device of process 0 cannot
  be the default there, since the other processes could not address it.
  Every process must call this. The arrays are restored in their saved dtype
  so that their fingerprints can be checked, then cast leaf by leaf when
  `param_dtype` was overridden. `allow_non_finite` accepts NaN/Inf (a
  checkpoint saved with it); the fingerprints are still checked.
  """
  path = epath.Path(path)
  cfg = load_config(path, **exec_overrides)
  expected = read_metadata(path).get("fingerprints")
  stored = _stored_arrays(path)
  _check_tree_matches_config(stored, cfg, where=f"checkpoint {path}")
  abstract = transformer.abstract_params(cfg)
  shardings = _target_shardings(partitioner, cfg, abstract)
  saved_dtype = {jax.tree_util.keystr(p): m.dtype for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
  target = jax.tree_util.tree_map_with_path(
      lambda p, a, s: jax.ShapeDtypeStruct(a.shape, saved_dtype[jax.tree_util.keystr(p)], sharding=s),
      abstract, shardings)
  with reading(path), ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(path / "params", target)
  integrity.verify(params, expected, f"checkpoint {path}", allow_non_finite)
  leaves, treedef = jax.tree.flatten(params)
  del params  # so that each saved-dtype leaf is freed as soon as its cast exists
  return jax.tree.unflatten(treedef, _cast_each(leaves, jnp.dtype(cfg.param_dtype))), cfg


def _target_shardings(partitioner: Any, cfg: ModelConfig, abstract: Any) -> Any:
  """The partitioner's shardings; without one, one device (one process) or `default_partitioner`'s."""
  if partitioner is not None:
    return partitioner.param_shardings(cfg)
  if jax.process_count() == 1:
    return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  try:
    return default_partitioner().param_shardings(cfg)
  except UserError as e:
    raise UserError(f"{e}\nNo partitioner was given, so load_params sharded fsdp over all {jax.device_count()} "
                    "devices of the job; pass a partitioner whose mesh divides these dimensions.") from None


def default_partitioner() -> Any:
  """fsdp over every device of the job: the layout that spreads any model's params evenly over all hosts
  with nothing to configure (what `load_params` and `convert` use on a pod when not told otherwise)."""
  from ministral_jax import sharding
  return sharding.Partitioner.from_config(sharding.mesh_config(data=1, fsdp=-1, tensor=1))


def _stored_arrays(path: epath.Path) -> Any:
  """The saved tree of array metadata (shapes, dtypes).

  Read through the handler, not `Checkpointer.metadata`, which logs a damaged
  manifest's error and returns no tree, which would read as "every tensor missing".
  """
  handler = ocp.StandardCheckpointHandler()
  try:
    with reading(path):
      stored = handler.metadata(path / "params")
  finally:
    handler.close()
  if not jax.tree.leaves(stored):
    raise damaged(path, "params/ lists no tensors")
  return stored


def _cast_each(leaves: list[Any], dtype: Any) -> list[Any]:
  """Casts in place, one leaf at a time, so the peak is the saved tree plus one leaf, not two trees."""
  for k, x in enumerate(leaves):
    if x.dtype != dtype:
      leaves[k] = x.astype(dtype)
  return leaves


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
