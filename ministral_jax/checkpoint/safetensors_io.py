"""Streaming safetensors I/O shared by the HF and Mistral-native converters.

Both formats store the same decoder as one `[out, in]` matrix per layer and
projection; they differ only in tensor names and (for wq/wk) the row order
within each head. Everything else lives here once:

- finding the shard files and reading their JSON headers (no tensor data);
- checking every name, shape and byte range against the config and the file
  sizes BEFORE a byte of weights is read, so a wrong or truncated checkpoint
  fails in milliseconds with a precise message instead of after minutes of I/O;
- filling each stacked `[layers, ...]` leaf layer by layer into one
  preallocated array (the only host copy of that leaf), and checking each
  layer finite as it lands (a NaN in a file is named by tensor and file, not
  found later as a NaN loss);
- with shardings, reading only what this process's devices hold: each
  distinct device shard is filled layer by layer from slices of the memory
  mapped tensors, put on its devices and dropped, so a host of a pod never
  holds more than one shard plus one layer's slice, and never reads the
  parts of a tensor other hosts hold;
- writing shards one layer at a time into a temporary sibling directory
  that is renamed into place only when complete, with the permissions a
  plain `open()` would give; params spread over several processes are
  gathered a layer at a time (every process takes part) and written by
  process 0 alone.

A format is described by a list of `TensorMap`s (`decoder_maps`, plus
`vision_maps` for a multimodal model): one per param leaf, naming the
checkpoint tensor(s) and the conversions, including how a block of our leaf
maps back to rows and columns of the tensor. A stacked map knows its own
layer count (the decoder's and the vision encoder's differ).

On a multi-process job the processes agree on every error (`agree`): one
that fails while the others carry on would leave them waiting forever in
their next collective, so each step ends with all of them raising the same
error, or none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
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
from jax.sharding import NamedSharding, PartitionSpec

from ministral_jax import multihost
from ministral_jax.errors import UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ARCH_FIELDS, VISION_FIELDS, ModelConfig, check_type

Array = np.ndarray
LeafPath = tuple[str, ...]
Index = tuple[slice, ...]  # explicit [start, stop) slices, one per dimension
Read = Callable[[Index], Array]  # one checkpoint tensor's block at this index (a memory-map slice)
# (read, index into our layout of one tensor) -> our block at that index
BlockReader = Callable[[Read, Index], Array]

# safetensors header dtype codes -> numpy dtypes (the float formats checkpoints use).
_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_MAX_HEADER_BYTES = 100 << 20
_LISTED = 20  # names shown in one error message before "... and N more"
_FINITE_CHUNK = 1 << 24  # elements per isfinite call: bounds its temporary bool array
_NON_FINITE_FIX = ("use an intact checkpoint, or pass allow_non_finite=True (convert: --allow_non_finite) "
                   "to keep them")
VISION_PARAMS = ("vision_encoder", "projector")  # top-level param keys of the vision tower (vision_layers > 0)
_bytes_read = 0  # tensor bytes this process has read from safetensors files (`bytes_read`)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor as its file header describes it."""
  file: Path
  shape: tuple[int, ...]
  dtype: str  # safetensors code, e.g. "BF16"


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """A param leaf <-> its checkpoint tensor(s).

  `name` holds `{i}` for leaves stacked over `layers` layers (one tensor per
  layer; `layers` is 0 for a leaf that is not stacked); `shape` is the
  checkpoint shape of one tensor; `to_ours` / `to_theirs`
  convert one tensor (one layer) between the two layouts. `read_ours` gives
  a block of `to_ours(tensor)` while reading only the part of the tensor it
  comes from, so a sharded load reads each device's shard, not the tensor;
  without it the whole tensor is read and converted, then cut.
  """
  leaf: LeafPath
  name: str
  shape: tuple[int, ...]
  to_ours: Callable[[Array], Array]
  to_theirs: Callable[[Array], Array]
  read_ours: BlockReader | None = None
  layers: int = 0

  def __post_init__(self):
    if self.stacked != (self.layers > 0):  # a bug in a map builder, not in a checkpoint
      raise AssertionError(f"TensorMap {self.name}: a stacked name needs a layer count and only it has one.")

  @property
  def stacked(self) -> bool:
    return "{i}" in self.name

  def names(self) -> list[str]:
    return [self.name.format(i=i) for i in range(self.layers)] if self.stacked else [self.name]

  def block(self, read: Read, index: Index) -> Array:
    """`to_ours(tensor)[index]`, from as little of the tensor as `read_ours` knows how to read."""
    if self.read_ours is not None:
      return self.read_ours(read, index)
    return self.to_ours(read(tuple(slice(0, n) for n in self.shape)))[index]


# --------------------------------------------------------------------------
# The decoder layout, parametrised by tensor names and q/k row order.
# --------------------------------------------------------------------------
RowOrder = Callable[[Array, int], Array]  # (matrix [heads*head_dim, in], heads) -> reordered


def decoder_maps(cfg: ModelConfig, names: Mapping[str, str],
                 qk_to_half: RowOrder | None = None, qk_from_half: RowOrder | None = None
                 ) -> list[TensorMap]:
  """TensorMaps for every param leaf of `cfg`'s text decoder.

  `names` maps our leaf names (tok_embeddings, norm, output, attention_norm,
  ffn_norm, wq, wk, wv, wo, w1, w2, w3) to checkpoint names. `qk_to_half`
  reorders checkpoint wq/wk rows into rotate-half order (None: already are);
  `qk_from_half` is its inverse.
  """
  d, v = cfg.d_model, cfg.vocab_size
  maps = [TensorMap(("tok_embeddings",), names["tok_embeddings"], (v, d), *_SAME)]
  maps += _block_maps(("layers",), names, cfg.n_layers, d, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ffn,
                      qk_to_half, qk_from_half)
  maps.append(TensorMap(("norm", "scale"), names["norm"], (d,), *_SAME))
  if not cfg.tie_embeddings:
    maps.append(TensorMap(("output",), names["output"], (v, d), *_TRANSPOSED))
  return maps


def vision_maps(cfg: ModelConfig, names: Mapping[str, str],
                qk_to_half: RowOrder | None = None, qk_from_half: RowOrder | None = None) -> list[TensorMap]:
  """TensorMaps of the vision encoder and the projector (none for a text-only `cfg`).

  `names` maps patch_conv, ln_pre, the block names of `decoder_maps`
  (attention_norm ... w3, for the ViT's layers), projector_norm,
  merging_layer, w_in, w_out, b_in, b_out to checkpoint names. The ViT is
  multi-head (as many kv heads as heads); its q/k rows take the same
  reordering as the decoder's, per vision head.
  """
  if not cfg.vision_layers:
    return []
  dv, d, p = cfg.vision_d_model, cfg.d_model, cfg.vision_patch_size
  merged = dv * cfg.spatial_merge_size ** 2
  # Conv2d OIHW [dv, 3, p, p] <-> ours HWIO [p, p, 3, dv].
  conv = (lambda x: x.transpose(2, 3, 1, 0), lambda y: y.transpose(3, 2, 0, 1), _conv_block)
  maps = [TensorMap(("vision_encoder", "patch_conv"), names["patch_conv"], (dv, 3, p, p), *conv),
          TensorMap(("vision_encoder", "ln_pre", "scale"), names["ln_pre"], (dv,), *_SAME)]
  maps += _block_maps(("vision_encoder", "layers"), names, cfg.vision_layers, dv, cfg.vision_heads,
                      cfg.vision_heads, dv // cfg.vision_heads, cfg.vision_d_ffn, qk_to_half, qk_from_half)
  maps += [TensorMap(("projector", "norm", "scale"), names["projector_norm"], (dv,), *_SAME),
           TensorMap(("projector", "merging_layer"), names["merging_layer"], (dv, merged), *_TRANSPOSED),
           TensorMap(("projector", "w_in"), names["w_in"], (d, dv), *_TRANSPOSED)]
  if cfg.projector_bias:
    maps.append(TensorMap(("projector", "b_in"), names["b_in"], (d,), *_SAME))
  maps.append(TensorMap(("projector", "w_out"), names["w_out"], (d, d), *_TRANSPOSED))
  if cfg.projector_bias:
    maps.append(TensorMap(("projector", "b_out"), names["b_out"], (d,), *_SAME))
  return maps


def _block_maps(stack: LeafPath, names: Mapping[str, str], layers: int, d: int, heads: int, kv_heads: int,
                hd: int, f: int, qk_to_half: RowOrder | None, qk_from_half: RowOrder | None) -> list[TensorMap]:
  """The maps of one stack of `layers` pre-norm blocks under `stack` (the decoder's or the ViT's)."""

  def heads_in(n: int, rows: RowOrder | None, back: RowOrder | None) -> tuple[Callable, ...]:
    """[n*hd, d] (torch Linear) <-> [d, n, hd]."""
    rows = rows or (lambda x, _: x)
    back = back or (lambda x, _: x)
    return (lambda x: rows(x, n).T.reshape(d, n, hd),
            lambda y: back(y.reshape(d, n * hd).T, n),
            functools.partial(_heads_in_block, head_dim=hd, rows=rows))

  q_in = heads_in(heads, qk_to_half, qk_from_half)
  k_in = heads_in(kv_heads, qk_to_half, qk_from_half)
  v_in = heads_in(kv_heads, None, None)
  o_out = (lambda x: x.T.reshape(heads, hd, d), lambda y: y.reshape(heads * hd, d).T,
           functools.partial(_heads_out_block, head_dim=hd))
  leaf = lambda *p: stack + p  # noqa: E731
  stacked = lambda path, key, shape, conv: TensorMap(leaf(*path), names[key], shape, *conv, layers=layers)  # noqa: E731
  return [
      stacked(("attention_norm", "scale"), "attention_norm", (d,), _SAME),
      stacked(("attention", "wq"), "wq", (heads * hd, d), q_in),
      stacked(("attention", "wk"), "wk", (kv_heads * hd, d), k_in),
      stacked(("attention", "wv"), "wv", (kv_heads * hd, d), v_in),
      stacked(("attention", "wo"), "wo", (d, heads * hd), o_out),
      stacked(("ffn_norm", "scale"), "ffn_norm", (d,), _SAME),
      stacked(("feed_forward", "w1"), "w1", (f, d), _TRANSPOSED),
      stacked(("feed_forward", "w2"), "w2", (d, f), _TRANSPOSED),
      stacked(("feed_forward", "w3"), "w3", (f, d), _TRANSPOSED),
  ]


# Block readers: our index of one tensor -> the rows / columns of the checkpoint tensor it comes from.
def _same_block(read: Read, index: Index) -> Array:
  """Embeddings and norms: the same layout, so the same index."""
  return read(index)


def _transposed_block(read: Read, index: Index) -> Array:
  """Ours [a, b] is theirs [b, a].T: rows of theirs are our columns."""
  return read(index[::-1]).T


def _conv_block(read: Read, index: Index) -> Array:
  """Ours HWIO [h, w, i, o] is theirs OIHW [o, i, h, w].transpose(2, 3, 1, 0)."""
  h, w, i, o = index
  return read((o, i, h, w)).transpose(2, 3, 1, 0)


# (to_ours, to_theirs, read_ours) of the two layouts that need no reshaping.
_SAME = (lambda x: x, lambda x: x, _same_block)
_TRANSPOSED = (lambda x: x.T, lambda x: x.T, _transposed_block)


def _head_rows(heads: slice, head_dim: int) -> slice:
  """The rows (or columns) `[heads*head_dim]` of whole heads `heads`."""
  return slice(heads.start * head_dim, heads.stop * head_dim)


def _heads_in_block(read: Read, index: Index, head_dim: int, rows: RowOrder) -> Array:
  """Ours [d, heads, hd] from theirs [heads*hd, d]: the rows of whole heads, the columns of our `d`.

  The row order (Mistral-native q/k interleave) permutes rows within each
  head, so it applies to a block of whole heads as to the tensor. A split of
  head_dim itself (no default rule makes one) reads the whole heads and cuts
  them: under the interleave, half of a head's dims come from rows spread
  over all of the head (whole heads are the covering block); in HF order
  this reads more than needed, which only such a custom rule would cost.
  """
  d_part, heads, within = index
  n = heads.stop - heads.start
  block = rows(read((_head_rows(heads, head_dim), d_part)), n)
  return block.T.reshape(block.shape[1], n, head_dim)[:, :, within]


def _heads_out_block(read: Read, index: Index, head_dim: int) -> Array:
  """Ours [heads, hd, d] from theirs [d, heads*hd] (wo): the columns of whole heads, the rows of our `d`.

  A split of head_dim reads whole heads too, as in `_heads_in_block`.
  """
  heads, within, d_part = index
  n = heads.stop - heads.start
  block = read((d_part, _head_rows(heads, head_dim)))
  return block.T.reshape(n, head_dim, block.shape[0])[:, within, :]


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
  """Tensor names, shapes and dtypes from a safetensors header (reads no tensor data).

  Each tensor's byte range is checked against the file's size here, so a
  truncated download fails before any weight is read, naming the file.
  """
  with open(file, "rb") as fh:
    prefix = fh.read(8)
    size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
    if not 0 < size <= _MAX_HEADER_BYTES:
      raise UserError(f"{file} is not a safetensors file (bad header length).")
    try:
      header = json.loads(fh.read(size))
    except ValueError as e:
      raise UserError(f"{file} is not a safetensors file (unreadable header: {e}).") from None
  if not isinstance(header, dict):
    raise UserError(f"{file} is not a safetensors file (its header is not a JSON object).")
  header.pop("__metadata__", None)
  data_bytes = file.stat().st_size - 8 - size
  return {name: _tensor_info(file, name, h, data_bytes) for name, h in header.items()}


def _tensor_info(file: Path, name: str, entry: Any, data_bytes: int) -> TensorInfo:
  """One header entry, after checking that its bytes lie inside the file and match its shape."""
  try:
    shape, dtype = tuple(int(n) for n in entry["shape"]), str(entry["dtype"])
    begin, end = (int(n) for n in entry["data_offsets"])
  except (KeyError, TypeError, ValueError):
    raise UserError(f"{file} is damaged: the header entry of tensor '{name}' is malformed ({entry!r}). "
                    "Restore the file from a copy, or download it again.") from None
  if end > data_bytes:
    raise UserError(f"{file} is truncated: tensor '{name}' ends at byte {end} of the data, which holds only "
                    f"{data_bytes} bytes. Restore the file from a copy, or download it again.")
  if dtype in _DTYPES and end - begin != math.prod(shape) * _DTYPES[dtype].itemsize:
    raise UserError(f"{file} is damaged: tensor '{name}' ({dtype} {list(shape)}) spans {end - begin} bytes. "
                    "Restore the file from a copy, or download it again.")
  return TensorInfo(file, shape, dtype)


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
                  ignore: Callable[[str], bool], source: str, hint: str = "") -> None:
  """Every expected tensor present with the config's shape, no unknown tensor that `ignore` does not skip.

  `hint` ends the message about missing / unexpected tensors (e.g. how to load a multimodal checkpoint's
  text decoder alone).
  """
  expected = {name: m for m in maps for name in m.names()}
  missing = sorted(set(expected) - set(infos))
  unexpected = sorted(n for n in infos if n not in expected and not ignore(n))
  if missing or unexpected:
    lines = ([f"missing: {_listing(missing)}"] if missing else [])
    lines += ([f"unexpected: {_listing(unexpected)}"] if unexpected else [])
    vision = (f", {cfg.vision_layers} vision layers, projector_bias={cfg.projector_bias}"
              if cfg.vision_layers else "")
    raise UserError(f"{source} does not hold the tensors its config implies "
                     f"({cfg.n_layers} layers, tie_embeddings={cfg.tie_embeddings}{vision}):\n  "
                     + "\n  ".join(lines) + (f"\n{hint}" if hint else ""))
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
    hint = (" (or text_only=True, convert: --text_only, to load only its text decoder)"
            if found.vision_layers and not given.vision_layers else "")
    raise UserError(f"The config passed in disagrees with {source}:\n  " + "\n  ".join(diff)
                     + f"\nPass cfg=None to use the checkpoint's own config{hint}.")


def text_only_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` without its vision tower: every vision field back to its default, as a text-only checkpoint's
  config reads (so a multimodal checkpoint loaded text-only equals its decoder exported alone)."""
  return ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k not in VISION_FIELDS})


def text_only_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """The params without the vision encoder and projector (the text decoder's leaves, untouched)."""
  return {k: v for k, v in params.items() if k not in VISION_PARAMS}


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
                dtype: np.dtype, shardings: Any = None, source: str = "the checkpoint",
                allow_non_finite: bool = False) -> dict[str, Any]:
  """Streams tensors into the param tree.

  Without `shardings`, each leaf is one preallocated host array (its only
  host copy) filled a layer at a time. With `shardings` (a tree shaped like
  the params), each leaf is assembled from its devices' shards: every
  distinct shard this process's devices hold is filled layer by layer from
  slices of the tensors, put on those devices and dropped, so a process reads
  only its own parts and holds one shard plus one layer's slice at a time.
  Each layer is checked finite right after its cast (so a float16 overflow
  is caught too) while it is still in cache; `allow_non_finite` skips that.
  On a multi-process job a bad tensor in the part one process reads stops
  every process with the same message (`agree`).
  """
  abstract = transformer.abstract_params(cfg)
  agreeing = shardings is not None and any(not s.is_fully_addressable for s in jax.tree.leaves(shardings))
  params: dict[str, Any] = {}
  error = None
  with contextlib.ExitStack() as stack:
    blocks = _Blocks(infos, stack, dtype, source, allow_non_finite)
    try:
      for m in maps:
        shape = _get(abstract, m.leaf).shape
        out = (blocks.leaf_block(m, _whole(shape)) if shardings is None
               else _sharded_leaf(blocks, m, shape, _get(shardings, m.leaf)))
        _set(params, m.leaf, out)
        del out
    except UserError as e:
      if not agreeing:
        raise
      error = e
  if agreeing:
    multihost.agree(error)
  return params


def bytes_read() -> int:
  """Tensor bytes this process has read from safetensors files so far: what a sharded load saves shows
  here (each host of a pod reads about its share, not the model)."""
  return _bytes_read


class _Blocks:
  """Blocks of our leaves, read from the checkpoint's tensors (each file opened once, memory-mapped)."""

  def __init__(self, infos: Mapping[str, TensorInfo], stack: contextlib.ExitStack, dtype: np.dtype,
               source: str, allow_non_finite: bool):
    self.infos, self.stack, self.dtype = infos, stack, dtype
    self.source, self.allow_non_finite = source, allow_non_finite
    self.handles: dict[Path, Any] = {}

  def read(self, name: str, index: Index) -> Array:
    """Tensor `name` at `index` (its own layout); only those bytes leave the memory map."""
    global _bytes_read
    file = self.infos[name].file
    try:
      if file not in self.handles:
        self.handles[file] = self.stack.enter_context(safetensors.safe_open(str(file), framework="numpy"))
      value = self.handles[file].get_slice(name)[index]
    except (safetensors.SafetensorError, OSError) as e:
      raise UserError(f"{file} could not be read ({_first_line(e)}): it is damaged or truncated. Restore "
                      "it from a copy, or download it again.") from None
    _bytes_read += value.nbytes
    return value

  def leaf_block(self, m: TensorMap, index: Index) -> Array:
    """Our leaf at `index` (over `[layers, ...]` when stacked), in `dtype`, filled one layer at a time."""
    block = np.empty(tuple(s.stop - s.start for s in index), self.dtype)
    if not m.stacked:
      self._fill(block, m, m.name, index)
      return block
    first = index[0].start
    for i in range(first, index[0].stop):
      self._fill(block[i - first], m, m.name.format(i=i), index[1:])
    return block

  def _fill(self, target: Array, m: TensorMap, name: str, index: Index) -> None:
    value = m.block(lambda at: self.read(name, at), index)
    if value.shape != target.shape:  # a bug in a TensorMap, not in the checkpoint
      raise AssertionError(f"{name} -> {m.leaf}{list(index)}: {value.shape} != {target.shape}")
    target[...] = value  # casts to `dtype`; only one layer is ever held twice
    if not self.allow_non_finite and not all_finite(target):
      raise UserError(f"{self.source}: tensor '{name}' in {self.infos[name].file} holds NaN or Inf"
                      f"{_overflow_note(value, self.dtype)}; {_NON_FINITE_FIX}.")


def _whole(shape: Sequence[int]) -> Index:
  return tuple(slice(0, n) for n in shape)


def _sharded_leaf(blocks: _Blocks, m: TensorMap, shape: tuple[int, ...], sharding: Any) -> jax.Array:
  """The leaf as one (possibly multi-process) array, from this process's shards only.

  Devices holding the same block (replicas) share one read.
  """
  holders: dict[tuple[tuple[int, int], ...], list[Any]] = {}
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    holders.setdefault(tuple(s.indices(n)[:2] for s, n in zip(index, shape)), []).append(device)
  arrays = []
  for bounds, devices in holders.items():
    block = blocks.leaf_block(m, tuple(slice(a, b) for a, b in bounds))
    arrays += [jax.device_put(block, device) for device in devices]
    del block
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def all_finite(x: Array) -> bool:
  """No NaN or Inf in `x`, checked a slice at a time so the temporary mask stays small."""
  flat = x.reshape(-1)  # a view: the arrays checked here are contiguous
  return all(bool(np.isfinite(flat[k:k + _FINITE_CHUNK]).all()) for k in range(0, flat.size, _FINITE_CHUNK))


def _overflow_note(before_cast: Array, dtype: np.dtype) -> str:
  """Why a tensor is non-finite when its source values were finite: the cast overflowed."""
  if before_cast.dtype == dtype or not all_finite(before_cast):
    return ""
  return f" after the cast to {dtype.name} (its values exceed that dtype's range; use float32 or bfloat16)"


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def load_checkpoint(infos: Mapping[str, TensorInfo], found: ModelConfig, source: str,
                    make_maps: Callable[[ModelConfig], list[TensorMap]], ignore: Callable[[str], bool],
                    cfg: ModelConfig | None, dtype: Any, shardings: Any, allow_non_finite: bool = False,
                    hint: str = "") -> tuple[dict[str, Any], ModelConfig]:
  """The common import path: headers -> tying -> config check -> name/shape check -> stream.

  `found` is the config read from the checkpoint's own JSON (text-only when
  the caller loads a multimodal checkpoint's decoder alone; `ignore` then
  skips the vision tensors); `hint` ends a missing-tensor error. Embeddings are
  tied exactly when the checkpoint has no output tensor (3B ships none).
  The params get `dtype`, or the checkpoint's embedding dtype when None; the
  returned config's `param_dtype` says which. `shardings` may be a function
  of that config (e.g. `Partitioner.param_shardings`), for callers that
  learn the config only here.
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
  check_tensors(infos, maps, found, ignore, source, hint)
  embed_name = next(m.name for m in maps if m.leaf == ("tok_embeddings",))
  np_dtype = to_np_dtype(dtype) if dtype is not None else dtype_of(infos, embed_name)
  if np_dtype.name not in ("float32", "bfloat16", "float16"):
    raise UserError(f"{source} stores {np_dtype.name} weights; pass dtype='bfloat16' or 'float32'.")
  out_cfg = (cfg or found).replace(param_dtype=np_dtype.name, tie_embeddings=found.tie_embeddings)
  if callable(shardings):
    shardings = shardings(out_cfg)
  return read_params(infos, maps, out_cfg, np_dtype, shardings, source, allow_non_finite), out_cfg


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


def _write_order(maps: Sequence[TensorMap]) -> list[tuple[TensorMap, int | None]]:
  """The maps' order, each stack of layers written layer by layer: embeddings, every tensor of layer 0,
  layer 1, ..., the final norm and head; then (multimodal) the ViT's the same way, then the projector."""
  order: list[tuple[TensorMap, int | None]] = []
  run: list[TensorMap] = []  # consecutive maps of one stack

  def flush() -> None:
    if run:
      order.extend((m, i) for i in range(run[0].layers) for m in run)
      run.clear()

  for m in maps:
    if not m.stacked or (run and _stack(run[0]) != _stack(m)):
      flush()
    if m.stacked:
      run.append(m)
    else:
      order.append((m, None))
  flush()
  return order


def _stack(m: TensorMap) -> tuple[LeafPath, int]:
  """Which stack of layers a stacked map belongs to (its leaf up to the layers axis, and the count)."""
  return m.leaf[:m.leaf.index("layers") + 1], m.layers


def write_shards(path: Path | None, params: Any, maps: Sequence[TensorMap], cfg: ModelConfig,
                 shard_name: Callable[[int, int], str], max_shard_bytes: int,
                 dtype: np.dtype | None, allow_non_finite: bool = False) -> tuple[dict[str, str], int]:
  """Writes the params as safetensors shards; returns ({tensor name: file name}, total bytes).

  Shards are planned from shapes first (so files get their final names), then
  filled one layer slice at a time: at most one shard is in host memory. Each
  slice is checked finite as written (a NaN export would poison every job
  that loads it) unless `allow_non_finite`.

  Params spread over several processes (`spread_over_processes`): every
  process must call this (each layer is gathered by a collective they all
  join); only process 0 holds the gathered layer and writes, into `path`
  (None on the other processes). The processes agree on errors after each
  file, so none is left gathering for a writer that gave up.
  """
  mode = new_file_mode()
  order = _write_order(maps)
  leaf_dtype = lambda m: dtype or to_np_dtype(_get(params, m.leaf).dtype)  # noqa: E731
  sizes = [int(np.prod(m.shape)) * leaf_dtype(m).itemsize for m, _ in order]
  shard_of, used, shard = [], 0, 0
  for size in sizes:
    if used and used + size > max_shard_bytes:
      shard, used = shard + 1, 0
    shard_of.append(shard)
    used += size
  n_shards = shard + 1
  agreeing = spread_over_processes(params)
  writer = path is not None and (not agreeing or jax.process_index() == 0)
  weight_map: dict[str, str] = {}
  for k in range(n_shards):
    file = shard_name(k + 1, n_shards)
    tensors, error = {}, None
    for (m, i), s in zip(order, shard_of):
      if s != k:
        continue
      name = m.name.format(i=i) if i is not None else m.name
      weight_map[name] = file
      value = _layer_on_host(_get(params, m.leaf), i)  # None where this process does not write
      if value is None or error is not None:
        continue
      try:
        tensors[name] = _theirs_checked(m, i, name, value, leaf_dtype(m), allow_non_finite)
      except UserError as e:
        if not agreeing:
          raise
        error = e
    if writer and error is None:
      try:
        safetensors.numpy.save_file(tensors, str(path / file), metadata={"format": "pt"})
        os.chmod(path / file, mode)  # safetensors writes through a private (0600) temporary file
      except OSError as e:
        if not agreeing:
          raise
        error = e
    del tensors
    if agreeing:
      multihost.agree(error)
  return weight_map, sum(sizes)


def spread_over_processes(tree: Any) -> bool:
  """Whether some array of `tree` lies partly on other processes' devices: then saving it is a
  collective job (`write_directory`, `write_shards`) that every process must join."""
  return any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(tree))


def _theirs_checked(m: TensorMap, i: int | None, name: str, value: Array, dtype: np.dtype,
                    allow_non_finite: bool) -> Array:
  """One layer in the checkpoint's layout and dtype, refused if it holds NaN or Inf."""
  out = np.ascontiguousarray(m.to_theirs(value).astype(dtype, copy=False))
  if not allow_non_finite and not all_finite(out):
    where = "".join(f"['{key}']" for key in m.leaf) + (f"[{i}]" if i is not None else "")
    raise UserError(f"The params to save hold NaN or Inf in {where} (tensor '{name}')"
                    f"{_overflow_note(value, dtype)}; pass allow_non_finite=True (convert: "
                    "--allow_non_finite) to write them anyway.")
  return out


def _layer_on_host(leaf: Any, i: int | None) -> Array | None:
  """Layer `i` of a leaf (the whole leaf when None) as a host array, on the process that writes.

  An array spread over several processes is gathered onto every device by
  one collective all processes join; only process 0 copies it to its host
  (the others get None), so host memory holds one layer, on one host.
  """
  if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
    return np.asarray(leaf[i] if i is not None else leaf)
  sharding = leaf.sharding
  if isinstance(sharding, NamedSharding):
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    gathered = (_replicated_whole(replicated)(leaf) if i is None
                else _replicated_layer(replicated)(leaf, np.int32(i)))
  else:  # no mesh to replicate over: every process gets the layer; the others drop it at once
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(leaf[i] if i is not None else leaf, tiled=True)
  return np.asarray(gathered) if jax.process_index() == 0 else None


@functools.lru_cache(maxsize=None)
def _replicated_layer(replicated: NamedSharding) -> Callable[[jax.Array, Any], jax.Array]:
  """A jitted `x[i]` whose result every device holds (compiled once per leaf shape, not per layer)."""
  return jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), out_shardings=replicated)


@functools.lru_cache(maxsize=None)
def _replicated_whole(replicated: NamedSharding) -> Callable[[jax.Array], jax.Array]:
  return jax.jit(lambda x: x, out_shardings=replicated)


def write_directory(path: str | Path, overwrite: bool, fill: Callable[[Path | None], None],
                    collective: bool = False) -> None:
  """`atomic_directory(path, overwrite)` filled by `fill(tmp)`, by one process or, if `collective`, by
  every process of the job together.

  Collective: every process calls this and `fill` (so their collectives
  match), `tmp` being the temporary directory on process 0 and None
  elsewhere. Process 0 alone checks `path`, creates the temporary directory
  and renames it into place, once; the others wait for that at the final
  `agree`, which also hands every process the same error if any step failed
  anywhere (the temporary directory is then removed).
  """
  if not collective:
    with atomic_directory(path, overwrite) as tmp:
      fill(tmp)
    return
  with contextlib.ExitStack() as stack:
    tmp, error = None, None
    if jax.process_index() == 0:
      try:
        tmp = stack.enter_context(atomic_directory(path, overwrite))
      except Exception as e:  # noqa: BLE001 - handed to every process by agree
        error = e
    multihost.agree(error)
    try:
      fill(tmp)
      if tmp is not None:
        stack.close()  # the rename into place
    except Exception as e:  # noqa: BLE001 - handed to every process by agree
      error = e
    multihost.agree(error)


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


def new_file_mode() -> int:
  """The mode `open(..., "w")` gives a new file: 0o666 less the umask.

  Read from /proc where Linux offers it, because os.umask can only be read by
  setting it, which races with other threads creating files.
  """
  try:
    with open("/proc/self/status") as fh:
      for line in fh:
        if line.startswith("Umask:"):
          return 0o666 & ~int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  umask = os.umask(0o022)
  os.umask(umask)
  return 0o666 & ~umask


def check_vit_heads(hidden: int, heads: int, head_dim: int | None, where: str) -> None:
  """A ViT config's heads split its width evenly, and an explicit head_dim is that split (Pixtral's rule)."""
  if heads <= 0 or hidden % heads:
    raise UserError(f"{where}hidden_size={hidden} is not a multiple of num_attention_heads={heads}.")
  if head_dim is not None and head_dim != hidden // heads:
    raise UserError(f"{where}head_dim={head_dim}, but the ViT's head_dim is hidden_size / num_attention_heads "
                     f"= {hidden // heads}.")


def check_json_types(d: Mapping[str, Any], types: Mapping[str, type], where: str,
                     nullable: Sequence[str] = ()) -> None:
  """Each key of `types` that `d` holds has that type (or is null, for `nullable` keys).

  Run on a config file before any value is used, so `"n_heads": "4"` is an
  error naming the file and its own key instead of a TypeError in arithmetic
  far from it. `where` prefixes the key, e.g. "config.json: " or "params.json: yarn.".
  """
  for key, kind in types.items():
    if key in d and not (d[key] is None and key in nullable):
      check_type(d[key], kind, where + key)


def write_json(file: Path, obj: Any) -> None:
  file.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def copy_files(directory: Path, files: dict[str, str] | None) -> None:
  """Copies each source file to `directory / name` (files shipped beside the weights, e.g. a tokenizer)."""
  for name, source in (files or {}).items():
    shutil.copyfile(source, directory / name)


def read_json(file: Path, what: str) -> dict[str, Any]:
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: {what}")
  try:
    return json.loads(file.read_text())
  except ValueError as e:
    raise UserError(f"{file} is not valid JSON: {e}") from None
