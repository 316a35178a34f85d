"""Mistral-native checkpoints (params.json + consolidated*.safetensors) <-> our params.

Mistral's own releases (and mistral-inference / vLLM's native path) apply
RoPE to interleaved pairs: within each head, rows (2j, 2j+1) of wq/wk rotate
together. Our model (like HF) rotates pairs (j, j + head_dim/2), so wq/wk
rows are permuted per head on import (HF row j = native row 2j, HF row
d/2 + j = native row 2j + 1) and back on export. Everything else is the HF
layout under other names; the streaming and checks are shared
(`safetensors_io`).

YaRN's attention factor follows transformers' converter (mscale =
mscale_all_dim = 1, i.e. factor 1.0) unless `yarn.apply_scale` is
explicitly true, which gives the YaRN paper's 1 + 0.1 ln(factor).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ministral_jax.checkpoint import safetensors_io as io
from ministral_jax.errors import UserError
from ministral_jax.model import rope
from ministral_jax.model.config import ModelConfig

PARAMS_FILE = "params.json"
INDEX_FILE = "consolidated.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
NO_YARN_MAX_SEQ_LEN = 131_072  # Mistral Small 3.1's context, when params.json gives none
_IGNORED_PREFIXES = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")
# The JSON type of every params.json key we read (null where we fall back to a default).
_TYPES = dict(dim=int, n_layers=int, hidden_dim=int, n_heads=int, vocab_size=int, n_kv_heads=int, head_dim=int,
              norm_eps=float, rope_theta=float, tied_embeddings=bool, max_position_embeddings=int,
              max_seq_len=int, yarn=dict, llama_4_scaling=dict)
_NULLABLE = ("n_kv_heads", "head_dim", "rope_theta", "max_position_embeddings", "max_seq_len", "yarn",
             "llama_4_scaling")
_YARN_TYPES = dict(factor=float, original_max_position_embeddings=int, beta=float, alpha=float, apply_scale=bool)
_L4_TYPES = dict(beta=float, original_max_position_embeddings=int)


# --------------------------------------------------------------------------
# Row order of wq / wk.
# --------------------------------------------------------------------------
def interleaved_to_half(w: np.ndarray, heads: int) -> np.ndarray:
  """Native rows `[heads*d, in]` (pairs 2j, 2j+1) -> rotate-half rows (pairs j, j+d/2)."""
  d = w.shape[0] // heads
  return w.reshape(heads, d // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def half_to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of `interleaved_to_half`."""
  d = w.shape[0] // heads
  return w.reshape(heads, 2, d // 2, -1).swapaxes(1, 2).reshape(w.shape)


def native_names() -> dict[str, str]:
  """Our leaf names -> consolidated tensor names (`{i}` = layer)."""
  layer = "layers.{i}."
  return dict(
      tok_embeddings="tok_embeddings.weight", norm="norm.weight", output="output.weight",
      attention_norm=layer + "attention_norm.weight", ffn_norm=layer + "ffn_norm.weight",
      wq=layer + "attention.wq.weight", wk=layer + "attention.wk.weight",
      wv=layer + "attention.wv.weight", wo=layer + "attention.wo.weight",
      w1=layer + "feed_forward.w1.weight", w2=layer + "feed_forward.w2.weight",
      w3=layer + "feed_forward.w3.weight")


def _maps(cfg: ModelConfig) -> list[io.TensorMap]:
  return io.decoder_maps(cfg, native_names(), interleaved_to_half, half_to_interleaved)


# --------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------
def config_from_params_json(d: Mapping[str, Any], source: str = PARAMS_FILE) -> ModelConfig:
  """params.json -> ModelConfig (text decoder; `vision_encoder` is ignored).

  `source` names the file in errors about a value's type or a missing key.
  """
  missing = [k for k in ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size") if k not in d]
  if missing:
    raise UserError(f"{source} lacks required field(s) {missing}.")
  _check_types(d, source)
  if d.get("sliding_window") is not None:
    raise UserError(f"params.json sets sliding_window={d['sliding_window']}; sliding-window attention "
                     "is not supported.")
  if d.get("quantization"):
    raise UserError("Quantized (FP8) native checkpoints are not supported; use a BF16 release.")
  yarn, l4 = d.get("yarn"), d.get("llama_4_scaling")
  fields: dict[str, Any] = dict(
      vocab_size=d["vocab_size"], d_model=d["dim"], n_layers=d["n_layers"], d_ffn=d["hidden_dim"],
      n_heads=d["n_heads"], n_kv_heads=d.get("n_kv_heads") or d["n_heads"],
      head_dim=d.get("head_dim") or d["dim"] // d["n_heads"], norm_eps=d.get("norm_eps", 1e-5),
      rope_theta=float(d.get("rope_theta") or 1e6), tie_embeddings=bool(d.get("tied_embeddings", False)),
      rope_scaling="none", query_temperature_beta=0.0)
  if yarn:
    scale = 0.0 if yarn.get("apply_scale") is True else 1.0  # 0: falsy -> 1 + 0.1 ln(factor)
    fields.update(rope_scaling="yarn", yarn_factor=float(yarn["factor"]),
                  yarn_original_max_len=int(yarn["original_max_position_embeddings"]),
                  yarn_beta_fast=float(yarn.get("beta", 32.0)), yarn_beta_slow=float(yarn.get("alpha", 1.0)),
                  yarn_mscale=scale, yarn_mscale_all_dim=scale)
  if l4 and l4.get("beta"):
    if l4.get("original_max_position_embeddings") is None:
      raise UserError(f"{source}: llama_4_scaling sets beta but lacks original_max_position_embeddings.")
    fields.update(query_temperature_beta=float(l4["beta"]),
                  query_temperature_len=int(l4["original_max_position_embeddings"]))
  default_len = (int(yarn["factor"] * yarn["original_max_position_embeddings"]) if yarn
                 else NO_YARN_MAX_SEQ_LEN)
  fields["max_seq_len"] = int(d.get("max_position_embeddings") or d.get("max_seq_len") or default_len)
  return ModelConfig.from_dict(fields)


def _check_types(d: Mapping[str, Any], source: str) -> None:
  """Every key we read has its JSON type, so a "4" fails here naming the file and key, not in arithmetic."""
  io.check_json_types(d, _TYPES, f"{source}: ", _NULLABLE)
  io.check_json_types(d.get("yarn") or {}, _YARN_TYPES, f"{source}: yarn.")
  io.check_json_types(d.get("llama_4_scaling") or {}, _L4_TYPES, f"{source}: llama_4_scaling.")
  absent = [k for k in ("factor", "original_max_position_embeddings") if d.get("yarn") and k not in d["yarn"]]
  if absent:
    raise UserError(f"{source}: yarn lacks required field(s) {absent}.")


def config_to_params_json(cfg: ModelConfig) -> dict[str, Any]:
  """ModelConfig -> params.json; native YaRN can only express factor 1 or 1 + 0.1 ln(s)."""
  out: dict[str, Any] = dict(
      dim=cfg.d_model, n_layers=cfg.n_layers, head_dim=cfg.head_dim, hidden_dim=cfg.d_ffn,
      n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, norm_eps=cfg.norm_eps, vocab_size=cfg.vocab_size,
      rope_theta=cfg.rope_theta, tied_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_seq_len)
  if cfg.rope_scaling == "yarn":
    factor = rope.inverse_frequencies(cfg)[1]
    paper = 1.0 + 0.1 * math.log(cfg.yarn_factor) if cfg.yarn_factor > 1 else 1.0
    if not (math.isclose(factor, 1.0) or math.isclose(factor, paper)):
      raise UserError(f"YaRN attention factor {factor} cannot be written to params.json "
                       f"(only 1.0 or {paper}).")
    out["yarn"] = dict(factor=cfg.yarn_factor, original_max_position_embeddings=cfg.yarn_original_max_len,
                       beta=cfg.yarn_beta_fast, alpha=cfg.yarn_beta_slow,
                       apply_scale=not math.isclose(factor, 1.0))
  if cfg.query_temperature_beta:
    out["llama_4_scaling"] = dict(original_max_position_embeddings=cfg.query_temperature_len,
                                  beta=cfg.query_temperature_beta)
  return out


# --------------------------------------------------------------------------
# Load / save.
# --------------------------------------------------------------------------
def load_native(path: str | Path, cfg: ModelConfig | None = None, dtype: Any = None,
                shardings: Any = None, allow_non_finite: bool = False) -> tuple[dict[str, Any], ModelConfig]:
  """Imports a native checkpoint directory; arguments as `hf.load_hf` (with `shardings`, each process reads
  only its slices: the q/k row interleave is undone per head, on blocks of whole heads)."""
  path = Path(path)
  found = config_from_params_json(io.read_json(path / PARAMS_FILE, "a native checkpoint needs params.json."),
                                  str(path / PARAMS_FILE))
  files = io.find_shards(path, INDEX_FILE, "consolidated.safetensors", "consolidated*.safetensors")
  return io.load_checkpoint(io.read_headers(files), found, f"native checkpoint {path}", _maps,
                            lambda n: n.startswith(_IGNORED_PREFIXES), cfg, dtype, shardings, allow_non_finite)


def _shard_name(k: int, n: int) -> str:
  return "consolidated.safetensors" if n == 1 else f"consolidated-{k:05d}-of-{n:05d}.safetensors"


def save_native(params: Any, cfg: ModelConfig, path: str | Path,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: Any = None,
                overwrite: bool = False, allow_non_finite: bool = False) -> Path:
  """Exports params.json + consolidated*.safetensors (atomically, checked finite and streamed from params
  spread over several processes, like `hf.save_hf`)."""
  io.check_params(params, cfg)
  np_dtype = io.to_np_dtype(dtype) if dtype is not None else None

  def fill(tmp: Path | None) -> None:
    io.write_shards(tmp, params, _maps(cfg), cfg, _shard_name, max_shard_bytes, np_dtype, allow_non_finite)
    if tmp is not None:
      io.write_json(tmp / PARAMS_FILE, config_to_params_json(cfg))
  io.write_directory(path, overwrite, fill, collective=io.spread_over_processes(params))
  return Path(path)
