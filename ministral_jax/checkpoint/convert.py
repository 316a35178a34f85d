"""Command line: convert checkpoints between HF, Mistral-native and our orbax format.

    python -m ministral_jax.checkpoint.convert --from=hf --to=orbax --src=DIR --dst=DIR [--dtype=bfloat16]

Every path goes through our param tree, so any source converts to any target
(`--to=native` also works). Orbax is imported only when used, so HF/native
conversions need no orbax install. The destination is written atomically
and never overwritten without `--overwrite`.

A multimodal source (HF Mistral3ForConditionalGeneration, a native
params.json with a `vision_encoder` block, or our orbax checkpoint of a
vision model) converts with its vision encoder and projector; `--text_only`
keeps only its text decoder (exactly what a text-only export of that decoder
holds).

Weights holding NaN or Inf (a damaged file, a diverged run) stop the
conversion with the tensor named and nothing written, unless
`--allow_non_finite`: a converted checkpoint should never be the place where
damage becomes invisible.

On a pod slice, run it on every host (one process each, as `launch.tpu run`
or `launch.local_pod` start them): the processes join first, load onto a mesh
over all their devices (`--mesh`, default fsdp over all of them) with each
host reading only its own slices of an HF / native source, and write the
destination once (HF / native: streamed a layer at a time to process 0;
orbax: every host writes its shards). Only process 0 prints its result; a
bad input is the same error on every process, which all exit with status 2.
One process keeps its params on the host unless `--mesh` is given, so a
model larger than one accelerator converts on a machine that has one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from etils import epath

from ministral_jax import sharding
from ministral_jax.checkpoint import hf, native, safetensors_io
from ministral_jax.errors import EXIT_USER_ERROR, UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ARCH_FIELDS, ModelConfig

log = logging.getLogger(__name__)

FORMATS = ("hf", "native", "orbax")
Params = dict[str, Any]


def _load_orbax(path: str, dtype: str | None, allow_non_finite: bool, partitioner: Any = None,
                text_only: bool = False) -> tuple[Params, ModelConfig]:
  from ministral_jax.checkpoint import orbax_io  # lazy: orbax is heavy and optional here
  params, cfg = _text_only(*orbax_io.load_params(path, partitioner, allow_non_finite=allow_non_finite),
                           text_only)
  if dtype is None:
    return params, cfg
  params = _cast(params, dtype)
  return params, cfg.replace(param_dtype=dtype)


def _text_only(params: Params, cfg: ModelConfig, text_only: bool) -> tuple[Params, ModelConfig]:
  """An orbax checkpoint's params and config without the vision tower when `text_only` (which the
  safetensors loaders do while reading; orbax restores the whole tree, verified, first)."""
  if not text_only:
    return params, cfg
  return safetensors_io.text_only_params(params), safetensors_io.text_only_config(cfg)


def _cast(params: Params, dtype: str) -> Params:
  """Leaf by leaf, so at most one leaf exists in both dtypes. Arrays spread over several processes are cast
  where they lie (no host holds them whole); the rest on the host, as they always were."""
  target = safetensors_io.to_np_dtype(dtype)

  def cast(x: Any) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x.astype(target)
    return np.asarray(x).astype(target)
  return {k: _cast(v, dtype) if isinstance(v, dict) else cast(v) for k, v in params.items()}


def _save_orbax(params: Params, cfg: ModelConfig, path: str, overwrite: bool, max_shard_bytes: int,
                allow_non_finite: bool, extra_metadata: dict[str, Any] | None = None) -> None:
  del max_shard_bytes  # orbax chunks on its own
  from ministral_jax.checkpoint import orbax_io
  orbax_io.save_params(path, params, cfg, overwrite=overwrite, allow_non_finite=allow_non_finite,
                       extra_metadata=extra_metadata)


def _shardings(partitioner: Any) -> Any:
  """What the safetensors loaders take: the partitioner's shardings as a function of the checkpoint's
  config (known only once its files are read), or None for host arrays."""
  return partitioner.param_shardings if partitioner is not None else None


# (path, dtype, allow_non_finite, partitioner or None, text_only) -> (params, config)
LOADERS: dict[str, Callable[[str, str | None, bool, Any, bool], tuple[Params, ModelConfig]]] = {
    "hf": lambda path, dtype, nf, part, text_only=False: hf.load_hf(
        path, dtype=dtype, allow_non_finite=nf, shardings=_shardings(part), text_only=text_only),
    "native": lambda path, dtype, nf, part, text_only=False: native.load_native(
        path, dtype=dtype, allow_non_finite=nf, shardings=_shardings(part), text_only=text_only),
    "orbax": _load_orbax,
}
# (params, config, path, overwrite, max_shard_bytes, allow_non_finite, files to ship beside the weights)
SAVERS: dict[str, Callable[[Params, ModelConfig, str, bool, int, bool, dict[str, str]], Any]] = {
    "hf": lambda p, c, path, ow, shard, nf, extra: hf.save_hf(p, c, path, max_shard_bytes=shard, overwrite=ow,
                                                              allow_non_finite=nf, extra_files=extra),
    "native": lambda p, c, path, ow, shard, nf, extra: native.save_native(
        p, c, path, max_shard_bytes=shard, overwrite=ow, allow_non_finite=nf, extra_files=extra),
    "orbax": _save_orbax,
}


def detect_format(path: str) -> str:
  """orbax (model_config.json), hf (config.json) or native (params.json).

  Orbax checkpoints may live on gs:// (epath); HF and native directories are read with safetensors'
  memory maps, so they must be local (copy them down, or convert once to orbax).
  """
  markers = {"orbax": "model_config.json", "hf": "config.json", "native": "params.json"}
  for fmt, marker in markers.items():
    if (epath.Path(path) / marker).exists():
      if fmt != "orbax" and "://" in str(path):
        raise UserError(f"{path} is a {fmt} directory on remote storage; copy it to a local disk first (or "
                         "convert it once to orbax, which reads gs:// directly).")
      return fmt
  raise UserError(f"{path} is not a checkpoint directory: none of {sorted(markers.values())} is in it.")


def load_config_any(path: str, text_only: bool = False) -> ModelConfig:
  """The model config of an orbax, HF or Mistral-native checkpoint, without reading weights (with
  `text_only`, its text decoder's alone)."""
  fmt = detect_format(path)
  if fmt == "orbax":
    from ministral_jax.checkpoint import orbax_io
    saved = orbax_io.load_config(path)
    return safetensors_io.text_only_config(saved) if text_only else saved
  if fmt == "hf":
    file = Path(path) / hf.CONFIG_FILE
    return hf.config_from_hf(safetensors_io.read_json(file, "config.json"), str(file), text_only)
  file = Path(path) / native.PARAMS_FILE
  return native.config_from_params_json(safetensors_io.read_json(file, "params.json"), str(file), text_only)


def load_any(path: str, partitioner: Any = None, cfg: ModelConfig | None = None,
             text_only: bool | None = None) -> tuple[Params, ModelConfig]:
  """Loads an orbax, HF or Mistral-native checkpoint, sharded by `partitioner` if given.

  `cfg`, if given, must agree with the checkpoint's architecture; its execution
  fields (dtype, remat, ...) are kept. `text_only`: load only the text decoder
  of a multimodal checkpoint (no effect on a text-only one); None (default):
  exactly when `cfg` is given and has no vision tower, so a text model's job
  loads the decoder of a multimodal release as it always did.
  """
  if text_only is None:
    text_only = cfg is not None and not cfg.vision_layers
  fmt = detect_format(path)
  if fmt == "orbax":
    from ministral_jax.checkpoint import orbax_io
    saved = orbax_io.load_config(path)
    if cfg is not None:
      safetensors_io.check_same_architecture(
          cfg, safetensors_io.text_only_config(saved) if text_only else saved, f"orbax checkpoint {path}")
    exec_fields = {k: v for k, v in (cfg or saved).to_dict().items() if k not in ARCH_FIELDS}
    return _text_only(*orbax_io.load_params(path, partitioner, **exec_fields), text_only)
  loader = hf.load_hf if fmt == "hf" else native.load_native
  return loader(path, cfg=cfg, shardings=_shardings(partitioner), text_only=text_only)


# Tokenizer files a Hugging Face or Mistral-native release ships beside its weights, in order of preference.
TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v3", "tokenizer.model")


def recorded_tokenizer(path: str) -> dict[str, Any] | None:
  """The identity (`Tokenizer.identity()`) of the tokenizer a checkpoint was made with: what an orbax
  checkpoint of ours recorded, or the tokenizer file a HF / native directory ships. None when neither
  says (a checkpoint from before these records): it cannot be checked."""
  root = epath.Path(path)
  if (root / "metadata.json").exists():
    from ministral_jax.checkpoint import orbax_io
    return orbax_io.read_metadata(root).get("tokenizer")
  if "://" in str(path):
    return None
  for name in TOKENIZER_FILES:
    if (root / name).exists():
      from ministral_jax.data import tokenizers
      return tokenizers.load_tokenizer(str(root / name)).identity()
  return None


SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ffn", "tie_embeddings")
VISION_SHAPE_FIELDS = ("vision_layers", "vision_d_model", "vision_heads", "vision_d_ffn", "vision_patch_size",
                       "spatial_merge_size", "projector_bias")


def load_or_init(init_from: str, cfg: ModelConfig, partitioner: Any, seed: int, allow_rope_change: bool = False
                 ) -> tuple[Params, ModelConfig]:
  """The starting params of a job: `init_from` (any format) if given, else a random init
  made directly in its shards (never whole on one device).

  `allow_rope_change`: the checkpoint only has to agree with `cfg` on the
  shapes; RoPE, YaRN, the query temperature and the context length are
  `cfg`'s (training a long-context stage from a short-context model).
  A text-only `cfg` takes the text decoder of a multimodal checkpoint.
  """
  if init_from and allow_rope_change:
    saved = load_config_any(init_from, text_only=not cfg.vision_layers)
    fields = SHAPE_FIELDS + (VISION_SHAPE_FIELDS if cfg.vision_layers or saved.vision_layers else ())
    diff = [f"{k}: {getattr(saved, k)!r} in {init_from}, {getattr(cfg, k)!r} in the config"
            for k in fields if getattr(saved, k) != getattr(cfg, k)]
    if diff:
      raise UserError("init_from has other shapes than the model config:\n  " + "\n  ".join(diff))
    exec_fields = {k: v for k, v in cfg.to_dict().items() if k not in ARCH_FIELDS}
    params, _ = load_any(init_from, partitioner, saved.replace(**exec_fields))
    return params, cfg
  if init_from:
    return load_any(init_from, partitioner, cfg)
  init = jax.jit(lambda rng: transformer.init_params(cfg, rng), out_shardings=partitioner.param_shardings(cfg))
  return init(jax.random.key(seed)), cfg


def convert(src_format: str, dst_format: str, src: str, dst: str, dtype: str | None = None,
            overwrite: bool = False, max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
            allow_non_finite: bool = False, partitioner: Any = None, text_only: bool = False) -> ModelConfig:
  """Loads `src` in `src_format` and writes it to `dst` in `dst_format`; returns the config.

  Weights holding NaN or Inf are an error (nothing is written) unless `allow_non_finite`.
  `text_only`: keep only the text decoder of a multimodal source.
  `partitioner`: load onto its mesh (each process reading only its shards) instead of the host; needed
  on a multi-process job, where every process calls this with the same arguments.
  """
  for name, fmt in (("source", src_format), ("destination", dst_format)):
    if fmt not in FORMATS:
      raise UserError(f"Unknown {name} format {fmt!r}; choose from {FORMATS}.")
  tokenizer = recorded_tokenizer(src)
  params, cfg = LOADERS[src_format](src, dtype, allow_non_finite, partitioner, text_only)
  if dst_format == "orbax":  # the orbax checkpoint records the tokenizer its source shipped with
    _save_orbax(params, cfg, dst, overwrite, max_shard_bytes, allow_non_finite,
                extra_metadata={"tokenizer": tokenizer} if tokenizer else None)
  else:
    SAVERS[dst_format](params, cfg, dst, overwrite, max_shard_bytes, allow_non_finite, tokenizer_files(tokenizer))
  return cfg


def tokenizer_files(identity: dict[str, Any] | None) -> dict[str, str]:
  """The tokenizer file an export ships (`tekken.json` or `tokenizer.model`, the names Mistral's HF and
  native releases use, so `AutoTokenizer` and mistral-common load it): the file the source records, if it is
  still there unchanged. Otherwise none, with a warning."""
  if not identity:
    return {}
  from ministral_jax.data import tokenizers
  source = str(identity.get("source", ""))
  if not os.path.isfile(source) or tokenizers.file_sha256(source) != identity.get("sha256"):
    log.warning("The export ships no tokenizer: the source's tokenizer %s is gone or changed.", source)
    return {}
  return {"tekken.json" if identity.get("kind") == "tekken" else "tokenizer.model": source}


def parse_mesh(text: str) -> dict[str, int]:
  """`--mesh` ("fsdp=-1", "data=1,fsdp=-1,tensor=2") -> mesh sizes; axes not named are 1."""
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    axis, _, value = part.partition("=")
    try:
      sizes[axis.strip()] = int(value)
    except ValueError:
      raise UserError(f"--mesh={text}: '{part}' is not <axis>=<size> with an integer size (-1: the rest); "
                      f"axes: {list(sharding.MESH_AXES)}.") from None
  if not sizes:
    raise UserError(f"--mesh={text!r} names no axis; e.g. --mesh=fsdp=-1 or --mesh=data=1,fsdp=-1,tensor=1.")
  return sizes


def _partitioner(mesh: str | None) -> Any:
  """The mesh to load onto: --mesh if given; fsdp over all devices on a multi-process job (no device of
  one process can hold what the others read); none (host arrays) for one process by default."""
  if mesh is None and jax.process_count() == 1:
    return None
  return sharding.Partitioner.from_config(parse_mesh(mesh or "fsdp=-1"))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="src_format", choices=FORMATS, required=True)
  parser.add_argument("--to", dest="dst_format", choices=FORMATS, required=True)
  parser.add_argument("--src", required=True, help="source checkpoint directory")
  parser.add_argument("--dst", required=True, help="destination directory (must not exist or be empty)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="cast the weights (default: keep the source dtype)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
  parser.add_argument("--max_shard_gb", type=float, default=hf.DEFAULT_MAX_SHARD_BYTES / 1e9,
                      help="largest safetensors shard written (hf/native targets)")
  parser.add_argument("--allow_non_finite", action="store_true",
                      help="convert weights holding NaN or Inf (default: an error naming the tensor)")
  parser.add_argument("--text_only", action="store_true",
                      help="keep only the text decoder of a multimodal source (drop the vision encoder and "
                           "projector)")
  parser.add_argument("--mesh", default=None,
                      help="mesh to load onto, e.g. fsdp=-1 or data=1,fsdp=-1,tensor=1 (default: fsdp over "
                           "all devices on a multi-process job, host memory on one process)")
  args = parser.parse_args(argv)
  start = time.time()
  try:
    if not jax.distributed.is_initialized():  # a program calling main() may have joined already
      sharding.initialize_distributed()  # before anything touches a device
    cfg = convert(args.src_format, args.dst_format, args.src, args.dst, args.dtype, args.overwrite,
                  int(args.max_shard_gb * 1e9), args.allow_non_finite, _partitioner(args.mesh), args.text_only)
  except (UserError, FileExistsError, FileNotFoundError) as e:  # bad input: a message, not a traceback
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR) from None
  if jax.process_index() == 0:
    vision = f", vision encoder {cfg.vision_layers} layers" if cfg.vision_layers else ""
    print(f"Wrote {args.dst_format} checkpoint {args.dst} ({cfg.n_layers} layers, d_model {cfg.d_model}{vision}, "
          f"{cfg.param_dtype}) in {time.time() - start:.1f}s")


if __name__ == "__main__":
  main()
