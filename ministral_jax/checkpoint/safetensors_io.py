"""Streaming safetensors I/O shared by the HF and Mistral-native converters.

Both formats store the same decoder as one `[out, in]` matrix per layer and
projection; they differ only in tensor names and (for wq/wk) the row order
within each head. Everything else lives here once:

- finding the shard files and reading their JSON headers (no tensor data);
- checking every name and shape against the config BEFORE a byte of weights
  is read, so a wrong checkpoint fails in milliseconds with a precise message
  instead of after minutes of I/O;
- filling each stacked `[layers, ...]` leaf layer by layer into one
  preallocated array (the only host copy of that leaf), optionally moving it
  to its device sharding right away;
- writing shards one layer at a time into a temporary sibling directory
  that is renamed into place only when complete.

A format is described by a list of `TensorMap`s (`decoder_maps`): one per
param leaf, naming the checkpoint tensor(s) and the two conversions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from ministral_jax.errors import UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ARCH_FIELDS, ModelConfig

Array = np.ndarray
LeafPath = tuple[str, ...]

# safetensors header dtype codes -> numpy dtypes (the float formats checkpoints use).
_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_MAX_HEADER_BYTES = 100 << 20
_LISTED = 20  # names shown in one error message before "... and N more"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor as its file header describes it."""
  file: Path
  shape: tuple[int, ...]
  dtype: str  # safetensors code, e.g. "BF16"


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """A param leaf <-> its checkpoint tensor(s).

  `name` holds `{i}` for leaves stacked over layers (one tensor per layer);
  `shape` is the checkpoint shape of one tensor; `to_ours` / `to_theirs`
  convert one tensor (one layer) between the two layouts.
  """
  leaf: LeafPath
  name: str
  shape: tuple[int, ...]
  to_ours: Callable[[Array], Array]
  to_theirs: Callable[[Array], Array]

  @property
  def stacked(self) -> bool:
    return "{i}" in self.name

  def names(self, n_layers: int) -> list[str]:
    return [self.name.format(i=i) for i in range(n_layers)] if self.stacked else [self.name]


# --------------------------------------------------------------------------
# The decoder layout, parametrised by tensor names and q/k row order.
# --------------------------------------------------------------------------
RowOrder = Callable[[Array, int], Array]  # (matrix [heads*head_dim, in], heads) -> reordered


def decoder_maps(cfg: ModelConfig, names: Mapping[str, str],
                 qk_to_half: RowOrder | None = None, qk_from_half: RowOrder | None = None
                 ) -> list[TensorMap]:
  """TensorMaps for every param leaf of `cfg`.

  `names` maps our leaf names (tok_embeddings, norm, output, attention_norm,
  ffn_norm, wq, wk, wv, wo, w1, w2, w3) to checkpoint names. `qk_to_half`
  reorders checkpoint wq/wk rows into rotate-half order (None: already are);
  `qk_from_half` is its inverse.
  """
  d, hd, f, v = cfg.d_model, cfg.head_dim, cfg.d_ffn, cfg.vocab_size
  same = lambda x: x  # noqa: E731
  t = lambda x: x.T  # noqa: E731

  def heads_in(heads: int, rows: RowOrder | None, back: RowOrder | None) -> tuple[Callable, Callable]:
    """[heads*hd, d] (torch Linear) <-> [d, heads, hd]."""
    rows = rows or (lambda x, _: x)
    back = back or (lambda x, _: x)
    return (lambda x: rows(x, heads).T.reshape(d, heads, hd),
            lambda y: back(y.reshape(d, heads * hd).T, heads))

  q_in = heads_in(cfg.n_heads, qk_to_half, qk_from_half)
  k_in = heads_in(cfg.n_kv_heads, qk_to_half, qk_from_half)
  v_in = heads_in(cfg.n_kv_heads, None, None)
  o_out = (lambda x: x.T.reshape(cfg.n_heads, hd, d), lambda y: y.reshape(cfg.n_heads * hd, d).T)
  layer = lambda *p: ("layers",) + p  # noqa: E731
  maps = [
      TensorMap(("tok_embeddings",), names["tok_embeddings"], (v, d), same, same),
      TensorMap(layer("attention_norm", "scale"), names["attention_norm"], (d,), same, same),
      TensorMap(layer("attention", "wq"), names["wq"], (cfg.n_heads * hd, d), *q_in),
      TensorMap(layer("attention", "wk"), names["wk"], (cfg.n_kv_heads * hd, d), *k_in),
      TensorMap(layer("attention", "wv"), names["wv"], (cfg.n_kv_heads * hd, d), *v_in),
      TensorMap(layer("attention", "wo"), names["wo"], (d, cfg.n_heads * hd), *o_out),
      TensorMap(layer("ffn_norm", "scale"), names["ffn_norm"], (d,), same, same),
      TensorMap(layer("feed_forward", "w1"), names["w1"], (f, d), t, t),
      TensorMap(layer("feed_forward", "w2"), names["w2"], (d, f), t, t),
      TensorMap(layer("feed_forward", "w3"), names["w3"], (f, d), t, t),
      TensorMap(("norm", "scale"), names["norm"], (d,), same, same),
  ]
  if not cfg.tie_embeddings:
    maps.append(TensorMap(("output",), names["output"], (v, d), t, t))
  return maps


# --------------------------------------------------------------------------
# Finding files and reading headers.
# --------------------------------------------------------------------------
def find_shards(path: Path, index_name: str, single_name: str, pattern: str) -> list[Path]:
  """The safetensors files of a checkpoint: from its index, the single file, or a glob.

  An index that names files which do not exist is an error listing them all.
  """
  index = path / index_name
  if index.exists():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
      raise UserError(f"{index} has no 'weight_map' object.")
    files = sorted({path / name for name in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
      raise FileNotFoundError(f"{index} names shard file(s) that do not exist in {path}: {missing}")
    return files
  if (path / single_name).is_file():
    return [path / single_name]
  files = sorted(path.glob(pattern))
  if not files:
    raise FileNotFoundError(f"No {single_name}, {index_name} or {pattern} in {path}.")
  return files


def read_header(file: Path) -> dict[str, TensorInfo]:
  """Tensor names, shapes and dtypes from a safetensors header (reads no tensor data)."""
  with open(file, "rb") as fh:
    prefix = fh.read(8)
    size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
    if not 0 < size <= _MAX_HEADER_BYTES:
      raise UserError(f"{file} is not a safetensors file (bad header length).")
    try:
      header = json.loads(fh.read(size))
    except ValueError as e:
      raise UserError(f"{file} is not a safetensors file (unreadable header: {e}).") from None
  header.pop("__metadata__", None)
  return {name: TensorInfo(file, tuple(h["shape"]), h["dtype"]) for name, h in header.items()}


def read_headers(files: Sequence[Path]) -> dict[str, TensorInfo]:
  infos: dict[str, TensorInfo] = {}
  for file in files:
    for name, info in read_header(file).items():
      if name in infos:
        raise UserError(f"Tensor '{name}' is stored twice: in {infos[name].file.name} and {file.name}.")
      infos[name] = info
  return infos


# --------------------------------------------------------------------------
# Validation (headers only).
# --------------------------------------------------------------------------
def _listing(items: Sequence[str]) -> str:
  shown = ", ".join(items[:_LISTED])
  return shown + (f" ... and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def check_tensors(infos: Mapping[str, TensorInfo], maps: Sequence[TensorMap], cfg: ModelConfig,
                  ignore: Callable[[str], bool], source: str) -> None:
  """Every expected tensor present with the config's shape, no unknown text tensor."""
  expected = {name: m for m in maps for name in m.names(cfg.n_layers)}
  missing = sorted(set(expected) - set(infos))
  unexpected = sorted(n for n in infos if n not in expected and not ignore(n))
  if missing or unexpected:
    lines = ([f"missing: {_listing(missing)}"] if missing else [])
    lines += ([f"unexpected: {_listing(unexpected)}"] if unexpected else [])
    raise UserError(f"{source} does not hold the tensors its config implies "
                     f"({cfg.n_layers} layers, tie_embeddings={cfg.tie_embeddings}):\n  "
                     + "\n  ".join(lines))
  bad = [f"tensor '{n}' has shape {list(infos[n].shape)} but the config implies {list(m.shape)}"
         for n, m in expected.items() if infos[n].shape != m.shape]
  if bad:
    raise UserError(f"{source}: shapes disagree with the config:\n  " + "\n  ".join(bad))
  unknown = sorted({infos[n].dtype for n in expected} - set(_DTYPES))
  if unknown:
    raise UserError(f"{source}: unsupported tensor dtype(s) {unknown}; supported: {sorted(_DTYPES)}.")


def check_same_architecture(given: ModelConfig, found: ModelConfig, source: str) -> None:
  """A caller's config must describe the checkpoint's model (fields that matter only)."""
  a, b = relevant_arch(given), relevant_arch(found)
  diff = [f"{k}: given {a.get(k)!r}, checkpoint {b.get(k)!r}" for k in ARCH_FIELDS if a.get(k) != b.get(k)]
  if diff:
    raise UserError(f"The config passed in disagrees with {source}:\n  " + "\n  ".join(diff)
                     + "\nPass cfg=None to use the checkpoint's own config.")


def relevant_arch(cfg: ModelConfig) -> dict[str, Any]:
  """Architecture fields, without those the config switches off (YaRN / temperature)."""
  d = cfg.arch_dict()
  if cfg.rope_scaling == "none":
    d = {k: v for k, v in d.items() if not k.startswith("yarn_")}
  if not cfg.query_temperature_beta:
    d.pop("query_temperature_len")
  return d


# --------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------
def to_np_dtype(dtype: Any) -> np.dtype:
  return np.dtype(jnp.dtype(dtype))


def dtype_of(infos: Mapping[str, TensorInfo], name: str) -> np.dtype:
  return _DTYPES[infos[name].dtype]


def read_params(infos: Mapping[str, TensorInfo], maps: Sequence[TensorMap], cfg: ModelConfig,
                dtype: np.dtype, shardings: Any = None) -> dict[str, Any]:
  """Streams tensors into the param tree: one preallocated array per leaf.

  With `shardings` (a tree shaped like the params), each finished leaf is put
  on its devices and the host array is dropped before the next leaf is read.
  """
  abstract = transformer.abstract_params(cfg)
  params: dict[str, Any] = {}
  with contextlib.ExitStack() as stack:
    handles: dict[Path, Any] = {}

    def tensor(name: str) -> Array:
      file = infos[name].file
      if file not in handles:
        handles[file] = stack.enter_context(safetensors.safe_open(str(file), framework="numpy"))
      return handles[file].get_tensor(name)

    for m in maps:
      out = np.empty(_get(abstract, m.leaf).shape, dtype)  # [layers, ...] or unstacked
      for i, name in enumerate(m.names(cfg.n_layers)):
        value = m.to_ours(tensor(name))
        target = out[i] if m.stacked else out
        if value.shape != target.shape:  # a bug in a TensorMap, not in the checkpoint
          raise AssertionError(f"{name} -> {m.leaf}: {value.shape} != {target.shape}")
        target[...] = value  # casts to `dtype`; only one layer is ever held twice
      if shardings is not None:
        out = jax.device_put(out, _get(shardings, m.leaf))
      _set(params, m.leaf, out)
      del out
  return params


def load_checkpoint(infos: Mapping[str, TensorInfo], found: ModelConfig, source: str,
                    make_maps: Callable[[ModelConfig], list[TensorMap]], ignore: Callable[[str], bool],
                    cfg: ModelConfig | None, dtype: Any, shardings: Any
                    ) -> tuple[dict[str, Any], ModelConfig]:
  """The common import path: headers -> tying -> config check -> name/shape check -> stream.

  `found` is the config read from the checkpoint's own JSON. Embeddings are
  tied exactly when the checkpoint has no output tensor (3B ships none).
  The params get `dtype`, or the checkpoint's embedding dtype when None; the
  returned config's `param_dtype` says which.
  """
  untied_maps = make_maps(found.replace(tie_embeddings=False))
  output_name = next(m.name for m in untied_maps if m.leaf == ("output",))
  has_output = output_name in infos
  if not has_output and not found.tie_embeddings:
    raise UserError(f"{source}: the config says the embeddings are not tied, but there is no "
                     f"'{output_name}' tensor.")
  found = found.replace(tie_embeddings=not has_output)
  if cfg is not None:
    check_same_architecture(cfg, found, source)
  maps = make_maps(found)
  check_tensors(infos, maps, found, ignore, source)
  embed_name = next(m.name for m in maps if m.leaf == ("tok_embeddings",))
  np_dtype = to_np_dtype(dtype) if dtype is not None else dtype_of(infos, embed_name)
  if np_dtype.name not in ("float32", "bfloat16", "float16"):
    raise UserError(f"{source} stores {np_dtype.name} weights; pass dtype='bfloat16' or 'float32'.")
  out_cfg = (cfg or found).replace(param_dtype=np_dtype.name, tie_embeddings=found.tie_embeddings)
  return read_params(infos, maps, out_cfg, np_dtype, shardings), out_cfg


def _get(tree: Any, path: LeafPath) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict[str, Any], path: LeafPath, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


# --------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------
def check_params(params: Any, cfg: ModelConfig) -> None:
  """The params to save have exactly the leaves and shapes `cfg` implies."""
  want = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(transformer.abstract_params(cfg))[0]}
  got = {jax.tree_util.keystr(p): tuple(np.shape(x))
         for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  bad = [f"missing {k}" for k in want if k not in got] + [f"unexpected {k}" for k in got if k not in want]
  bad += [f"{k}: shape {got[k]}, config implies {want[k]}" for k in want if k in got and got[k] != want[k]]
  if bad:
    raise UserError("The params do not match their config:\n  " + "\n  ".join(bad))


def _write_order(maps: Sequence[TensorMap], n_layers: int) -> list[tuple[TensorMap, int | None]]:
  """Embeddings, then every tensor of layer 0, layer 1, ..., then the rest."""
  head = [(m, None) for m in maps if not m.stacked and m.leaf == ("tok_embeddings",)]
  tail = [(m, None) for m in maps if not m.stacked and m.leaf != ("tok_embeddings",)]
  body = [(m, i) for i in range(n_layers) for m in maps if m.stacked]
  return head + body + tail


def write_shards(path: Path, params: Any, maps: Sequence[TensorMap], cfg: ModelConfig,
                 shard_name: Callable[[int, int], str], max_shard_bytes: int,
                 dtype: np.dtype | None) -> tuple[dict[str, str], int]:
  """Writes the params as safetensors shards; returns ({tensor name: file name}, total bytes).

  Shards are planned from shapes first (so files get their final names), then
  filled one layer slice at a time: at most one shard is in host memory.
  """
  order = _write_order(maps, cfg.n_layers)
  leaf_dtype = lambda m: dtype or to_np_dtype(_get(params, m.leaf).dtype)  # noqa: E731
  sizes = [int(np.prod(m.shape)) * leaf_dtype(m).itemsize for m, _ in order]
  shard_of, used, shard = [], 0, 0
  for size in sizes:
    if used and used + size > max_shard_bytes:
      shard, used = shard + 1, 0
    shard_of.append(shard)
    used += size
  n_shards = shard + 1
  weight_map: dict[str, str] = {}
  for k in range(n_shards):
    tensors = {}
    for (m, i), s in zip(order, shard_of):
      if s != k:
        continue
      leaf = _get(params, m.leaf)
      value = np.asarray(leaf[i] if i is not None else leaf)  # one layer, gathered to host
      name = m.name.format(i=i) if i is not None else m.name
      tensors[name] = np.ascontiguousarray(m.to_theirs(value).astype(leaf_dtype(m), copy=False))
    file = shard_name(k + 1, n_shards)
    safetensors.numpy.save_file(tensors, str(path / file), metadata={"format": "pt"})
    weight_map.update({name: file for name in tensors})
    del tensors
  return weight_map, sum(sizes)


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
  """Yields a temporary sibling directory that becomes `path` only on success.

  An existing non-empty `path` is refused unless `overwrite`; it is then
  replaced by two renames, so `path` is never half-written.
  """
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise FileExistsError(f"{path} exists and is not a directory.")
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (convert: --overwrite) "
                          "to replace it.")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    yield tmp
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    if path.exists():
      path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_json(file: Path, obj: Any) -> None:
  file.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(file: Path, what: str) -> dict[str, Any]:
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: {what}")
  try:
    return json.loads(file.read_text())
  except ValueError as e:
    raise UserError(f"{file} is not valid JSON: {e}") from None
