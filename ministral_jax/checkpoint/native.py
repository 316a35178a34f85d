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

Multimodal checkpoints (a `vision_encoder` block in params.json) hold the
Pixtral ViT under `vision_encoder.*` (its wq/wk interleaved the same way,
per vision head), the projector as `pre_mm_projector_norm`,
`patch_merger.merging_layer` and `vision_language_adapter.w_in/w_out`
(biases iff `adapter_bias`). They import with the vision tower, or with
`text_only=True` as the text model alone (the block then unread).
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
_VISION_PREFIXES = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")
_TEXT_ONLY_HINT = ("This is a multimodal checkpoint: pass text_only=True (convert: --text_only) to load its "
                   "text decoder alone.")
# The JSON type of every params.json key we read (null where we fall back to a default).
_TYPES = dict(dim=int, n_layers=int, hidden_dim=int, n_heads=int, vocab_size=int, n_kv_heads=int, head_dim=int,
              norm_eps=float, rope_theta=float, tied_embeddings=bool, max_position_embeddings=int,
              max_seq_len=int, yarn=dict, llama_4_scaling=dict)
_NULLABLE = ("n_kv_heads", "head_dim", "rope_theta", "max_position_embeddings", "max_seq_len", "yarn",
             "llama_4_scaling")
_YARN_TYPES = dict(factor=float, original_max_position_embeddings=int, beta=float, alpha=float, apply_scale=bool)
_L4_TYPES = dict(beta=float, original_max_position_embeddings=int)
# The vision_encoder block (mistral-inference / vLLM `VisionEncoderArgs`).
_VISION_TYPES = dict(hidden_size=int, num_channels=int, image_size=int, max_image_size=int, patch_size=int,
                     intermediate_size=int, num_hidden_layers=int, num_attention_heads=int, head_dim=int,
                     rope_theta=float, image_token_id=int, image_break_token_id=int, image_end_token_id=int,
                     spatial_merge_size=int, adapter_bias=bool, add_pre_mm_projector_layer_norm=bool,
                     mm_projector_id=str, hidden_act=str)
# Required by mistral-inference, plus spatial_merge_size (its default of 1 means no 2x2 merge; transformers'
# converter requires it too).
_VISION_REQUIRED = ("hidden_size", "num_channels", "image_size", "patch_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "rope_theta", "image_token_id", "spatial_merge_size")


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


def native_vision_names() -> dict[str, str]:
  """Our vision leaf names (`safetensors_io.vision_maps`) -> consolidated tensor names (`{i}` = ViT layer)."""
  layer = "vision_encoder.transformer.layers.{i}."
  return dict(
      patch_conv="vision_encoder.patch_conv.weight", ln_pre="vision_encoder.ln_pre.weight",
      attention_norm=layer + "attention_norm.weight", ffn_norm=layer + "ffn_norm.weight",
      wq=layer + "attention.wq.weight", wk=layer + "attention.wk.weight",
      wv=layer + "attention.wv.weight", wo=layer + "attention.wo.weight",
      w1=layer + "feed_forward.w1.weight", w2=layer + "feed_forward.w2.weight",
      w3=layer + "feed_forward.w3.weight",
      projector_norm="pre_mm_projector_norm.weight", merging_layer="patch_merger.merging_layer.weight",
      w_in="vision_language_adapter.w_in.weight", b_in="vision_language_adapter.w_in.bias",
      w_out="vision_language_adapter.w_out.weight", b_out="vision_language_adapter.w_out.bias")


def _maps(cfg: ModelConfig) -> list[io.TensorMap]:
  return (io.decoder_maps(cfg, native_names(), interleaved_to_half, half_to_interleaved)
          + io.vision_maps(cfg, native_vision_names(), interleaved_to_half, half_to_interleaved))


# --------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------
def config_from_params_json(d: Mapping[str, Any], source: str = PARAMS_FILE, text_only: bool = False
                            ) -> ModelConfig:
  """params.json -> ModelConfig: the text decoder, and the vision tower when a `vision_encoder` block is
  present (unless `text_only`: the block is then not read).

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
  if d.get("vision_encoder") is not None and not text_only:
    fields.update(_vision_from_params_json(d["vision_encoder"], source))
  return ModelConfig.from_dict(fields)


def _vision_from_params_json(v: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The vision fields from params.json's `vision_encoder` block, checked to be what our ViT computes:
  a pre-projector RMSNorm and the patch merger (Mistral Small 3.1 / Ministral 3, not Pixtral-12B)."""
  where = f"{source}: vision_encoder."
  if not isinstance(v, Mapping):
    raise UserError(f"{source}: vision_encoder is a {type(v).__name__}; an object is expected.")
  io.check_json_types(v, _VISION_TYPES, where)
  missing = [k for k in _VISION_REQUIRED if k not in v]
  if missing:
    raise UserError(f"{source}: vision_encoder lacks required field(s) {missing}. {_TEXT_ONLY_HINT}")
  if v.get("hidden_act", "silu") != "silu":
    raise UserError(f"{where}hidden_act={v['hidden_act']!r}: only SiLU ViTs are supported. {_TEXT_ONLY_HINT}")
  if v["num_channels"] != 3:
    raise UserError(f"{where}num_channels={v['num_channels']}: the vision encoder reads RGB images (3).")
  if v.get("add_pre_mm_projector_layer_norm", False) is not True:
    raise UserError(f"{where}add_pre_mm_projector_layer_norm is {v.get('add_pre_mm_projector_layer_norm', 'absent')}"
                     ": only encoders with the pre-projector RMSNorm and the patch merger (Ministral 3, Mistral "
                     f"Small 3.1; not Pixtral-12B) are supported. {_TEXT_ONLY_HINT}")
  if v.get("mm_projector_id", "patch_merge") != "patch_merge":
    raise UserError(f"{where}mm_projector_id={v['mm_projector_id']!r}: only 'patch_merge' is supported. "
                     f"{_TEXT_ONLY_HINT}")
  hidden, heads = v["hidden_size"], v["num_attention_heads"]
  io.check_vit_heads(hidden, heads, v.get("head_dim"), where)
  return dict(
      vision_layers=v["num_hidden_layers"], vision_d_model=hidden, vision_heads=heads,
      vision_d_ffn=v["intermediate_size"], vision_patch_size=v["patch_size"], vision_image_size=v["image_size"],
      vision_rope_theta=float(v["rope_theta"]), spatial_merge_size=v["spatial_merge_size"],
      # mistral-inference's default (transformers' converter assumes False): Mistral's releases write it.
      projector_bias=bool(v.get("adapter_bias", True)), image_token_id=v["image_token_id"],
      image_break_id=v.get("image_break_token_id", 12), image_end_id=v.get("image_end_token_id", 13))


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
  if cfg.vision_layers:
    out["vision_encoder"] = dict(
        hidden_size=cfg.vision_d_model, num_channels=3, image_size=cfg.vision_image_size,
        max_image_size=cfg.vision_image_size, patch_size=cfg.vision_patch_size,
        intermediate_size=cfg.vision_d_ffn, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, rope_theta=cfg.vision_rope_theta,
        image_token_id=cfg.image_token_id, image_break_token_id=cfg.image_break_id,
        image_end_token_id=cfg.image_end_id, spatial_merge_size=cfg.spatial_merge_size,
        adapter_bias=cfg.projector_bias, add_pre_mm_projector_layer_norm=True, mm_projector_id="patch_merge")
  return out


# --------------------------------------------------------------------------
# Load / save.
# --------------------------------------------------------------------------
def load_native(path: str | Path, cfg: ModelConfig | None = None, dtype: Any = None,
                shardings: Any = None, allow_non_finite: bool = False, text_only: bool = False
                ) -> tuple[dict[str, Any], ModelConfig]:
  """Imports a native checkpoint directory; arguments as `hf.load_hf` (with `shardings`, each process reads
  only its slices: the q/k row interleave is undone per head, on blocks of whole heads)."""
  path = Path(path)
  params_json = io.read_json(path / PARAMS_FILE, "a native checkpoint needs params.json.")
  found = config_from_params_json(params_json, str(path / PARAMS_FILE), text_only)
  files = io.find_shards(path, INDEX_FILE, "consolidated.safetensors", "consolidated*.safetensors")
  ignore = (lambda n: False) if found.vision_layers else (lambda n: n.startswith(_VISION_PREFIXES))
  multimodal = isinstance(params_json, dict) and params_json.get("vision_encoder") is not None
  return io.load_checkpoint(io.read_headers(files), found, f"native checkpoint {path}", _maps, ignore, cfg,
                            dtype, shardings, allow_non_finite,
                            hint=_TEXT_ONLY_HINT if multimodal and not text_only else "")


def _shard_name(k: int, n: int) -> str:
  return "consolidated.safetensors" if n == 1 else f"consolidated-{k:05d}-of-{n:05d}.safetensors"


def save_native(params: Any, cfg: ModelConfig, path: str | Path,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: Any = None,
                overwrite: bool = False, allow_non_finite: bool = False, extra_files: dict[str, str] | None = None
                ) -> Path:
  """Exports params.json + consolidated*.safetensors (atomically, checked finite and streamed from params
  spread over several processes, like `hf.save_hf`); `extra_files` (name -> source file, e.g. the tokenizer)
  are copied in before the directory appears."""
  io.check_params(params, cfg)
  np_dtype = io.to_np_dtype(dtype) if dtype is not None else None

  def fill(tmp: Path | None) -> None:
    io.write_shards(tmp, params, _maps(cfg), cfg, _shard_name, max_shard_bytes, np_dtype, allow_non_finite)
    if tmp is not None:
      io.write_json(tmp / PARAMS_FILE, config_to_params_json(cfg))
      io.copy_files(tmp, extra_files)
  io.write_directory(path, overwrite, fill, collective=io.spread_over_processes(params))
  return Path(path)
