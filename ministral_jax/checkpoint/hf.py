"""Hugging Face checkpoints (config.json + model*.safetensors) <-> our params.

HF stores q/k rows in the same rotate-half order our RoPE uses (the Pixtral
ViT's too), so importing is names + transposes + reshapes. Three name
spellings exist for the text decoder (text-only CausalLM, v5 multimodal
`model.language_model.*` / `model.vision_tower.*` /
`model.multi_modal_projector.*`, older multimodal `language_model.model.*` /
`vision_tower.*` / `multi_modal_projector.*`, which transformers 5 itself
still writes to disk); all load, and exports use the v5 names.

Configs: `ministral3` (YaRN + query temperature), `mistral` (Mistral Small
3.1 / Magistral: plain RoPE) and the multimodal `mistral3` wrapper
(`Mistral3ForConditionalGeneration`), whose `text_config` is one of the two
and whose `vision_config` is a Pixtral ViT. HF fills absent config.json keys
from its class defaults, which differ between the two text types (eps 1e-5
vs 1e-6, sliding window None vs 4096, ...) and between an absent and a
given `vision_config`, so we apply the same defaults here.

A multimodal checkpoint imports with its vision encoder and projector, or,
with `text_only=True`, as exactly the text model its decoder alone gives
(the vision config is then not even read, so an unsupported ViT, such as
Pixtral-12B's GELU one, does not stop it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ministral_jax.checkpoint import safetensors_io as io
from ministral_jax.errors import UserError
from ministral_jax.model.config import ModelConfig, check_type

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# HF class defaults (transformers v5 Ministral3Config / MistralConfig) for keys config.json may omit.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "ministral3": dict(num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       max_position_embeddings=262_144, sliding_window=None, tie_word_embeddings=False,
                       hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=11, rope_theta=1e6,
                       rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=16.0,
                                            original_max_position_embeddings=16_384, beta_fast=32.0,
                                            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                            llama_4_scaling_beta=0.1)),
    "mistral": dict(num_key_value_heads=8, head_dim=None, rms_norm_eps=1e-6, max_position_embeddings=131_072,
                    sliding_window=4096, tie_word_embeddings=False, hidden_act="silu",
                    bos_token_id=1, eos_token_id=2, pad_token_id=None, rope_theta=1e4,
                    rope_parameters=None),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# The JSON type of every config.json key we read; null is allowed where transformers allows it.
_TYPES = dict(model_type=str, vocab_size=int, hidden_size=int, intermediate_size=int, num_hidden_layers=int,
              num_attention_heads=int, num_key_value_heads=int, head_dim=int, rms_norm_eps=float,
              max_position_embeddings=int, tie_word_embeddings=bool, hidden_act=str, bos_token_id=int,
              pad_token_id=int, rope_theta=float, rope_parameters=dict, rope_scaling=dict, text_config=dict)
_NULLABLE = ("num_key_value_heads", "head_dim", "bos_token_id", "pad_token_id", "rope_parameters",
             "rope_scaling", "text_config")
_ROPE_TYPES = dict(rope_type=str, type=str, rope_theta=float, factor=float, original_max_position_embeddings=int,
                   beta_fast=float, beta_slow=float, mscale=float, mscale_all_dim=float,
                   llama_4_scaling_beta=float, partial_rotary_factor=float, truncate=bool, attention_factor=float)

# (text prefix, lm_head name), most specific first.
_PREFIXES = (
    ("model.language_model.", "lm_head.weight"),  # v5 Mistral3ForConditionalGeneration
    ("language_model.model.", "language_model.lm_head.weight"),  # older multimodal files
    ("model.", "lm_head.weight"),  # Ministral3ForCausalLM / MistralForCausalLM
)
_VISION_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                    "model.multi_modal_projector.")
_TEXT_ONLY_HINT = ("This is a multimodal checkpoint: pass text_only=True (convert: --text_only) to load its "
                   "text decoder alone.")

# Multimodal (`mistral3`) configs. transformers' Mistral3Config builds an absent vision_config from these
# (`sub_configs_defaults`), a given one from PixtralVisionConfig's class defaults: both say GELU, which
# Ministral 3 / Mistral Small 3.1 configs override with "silu".
_VISION_DEFAULTS_ABSENT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, num_channels=3, image_size=1540, patch_size=14,
                               hidden_act="gelu")
_PIXTRAL_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         num_channels=3, image_size=1024, patch_size=16, hidden_act="gelu")
_VISION_TYPES = dict(model_type=str, hidden_size=int, intermediate_size=int, num_hidden_layers=int,
                     num_attention_heads=int, num_channels=int, image_size=int, patch_size=int, hidden_act=str,
                     head_dim=int, rope_theta=float, rope_parameters=dict)
_VISION_ROPE_TYPES = dict(rope_type=str, type=str, rope_theta=float)
# image_token_index is what Mistral3Config writes (image_token_id is its alias); the break / end ids have no
# HF field (the processor knows them by name), so we write and read them under their params.json names.
_MULTIMODAL_TYPES = dict(vision_config=dict, image_token_index=int, image_token_id=int, image_break_token_id=int,
                         image_end_token_id=int, spatial_merge_size=int, multimodal_projector_bias=bool,
                         projector_hidden_act=str)
_MULTIMODAL_NULLABLE = ("vision_config",)


# --------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------
def config_from_hf(hf_config: Mapping[str, Any], source: str = CONFIG_FILE, text_only: bool = False
                   ) -> ModelConfig:
  """A transformers config.json (ministral3, mistral, or mistral3) -> ModelConfig.

  A mistral3 config gives a multimodal config (its text_config, vision_config
  and projector settings), or with `text_only` its text decoder's config
  alone (the vision fields at their defaults, the vision config unread).
  `source` names the file in errors about a value's type.
  """
  d = dict(hf_config)
  _check_types(d, f"{source}: ")
  if d.get("quantization_config") or (d.get("text_config") or {}).get("quantization_config"):
    raise UserError("Quantized (e.g. FP8) HF checkpoints are not supported; use a BF16 release.")
  vision: dict[str, Any] = {}
  if d.get("model_type") == "mistral3":
    if not text_only:
      vision = _vision_from_hf(d, source)
    text = dict(d.get("text_config") or {})
    _check_types(text, f"{source}: text_config.")
    text.setdefault("model_type", "mistral")  # Mistral3Config's default text model
    text.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", True))
    d = text
  model_type = d.get("model_type")
  if model_type not in _DEFAULTS:
    raise UserError(f"Unsupported model_type {model_type!r}: expected 'ministral3', 'mistral' or "
                     "'mistral3' (whose text_config is one of these).")
  missing = [k for k in _REQUIRED if k not in d]
  if missing:
    raise UserError(f"The {model_type} config lacks required field(s) {missing}.")
  g = lambda key: d.get(key, _DEFAULTS[model_type][key])  # noqa: E731
  if g("sliding_window") is not None:
    raise UserError(f"sliding_window={g('sliding_window')} (transformers' default for '{model_type}' when "
                     "the key is absent is " f"{_DEFAULTS[model_type]['sliding_window']}): sliding-window "
                     "attention is not supported; Ministral 3 / Mistral Small 3.1 set it to null.")
  if g("hidden_act") != "silu":
    raise UserError(f"hidden_act={g('hidden_act')!r} is not supported (only 'silu').")
  heads = d["num_attention_heads"]
  eos = g("eos_token_id")
  fields = dict(
      vocab_size=d["vocab_size"], d_model=d["hidden_size"], d_ffn=d["intermediate_size"],
      n_layers=d["num_hidden_layers"], n_heads=heads, n_kv_heads=g("num_key_value_heads") or heads,
      head_dim=g("head_dim") or d["hidden_size"] // heads, norm_eps=g("rms_norm_eps"),
      tie_embeddings=bool(g("tie_word_embeddings")), max_seq_len=g("max_position_embeddings"),
      # A None pad id (MistralConfig's default) keeps ModelConfig's Tekken <pad> (11).
      bos_id=g("bos_token_id"), eos_id=eos[0] if isinstance(eos, list) else eos, pad_id=g("pad_token_id"),
      **_rope_from_hf(d, model_type, g("rope_theta"), g("max_position_embeddings")), **vision)
  return ModelConfig.from_dict({k: v for k, v in fields.items() if v is not None})


def _vision_from_hf(d: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The vision fields of a mistral3 config: its Pixtral vision_config and projector settings, checked
  to be what our ViT computes (SiLU, 3 channels, the last layer's output, a GELU projector)."""
  io.check_json_types(d, _MULTIMODAL_TYPES, f"{source}: ", _MULTIMODAL_NULLABLE)
  given = d.get("vision_config")
  v = dict(_VISION_DEFAULTS_ABSENT) if given is None else {**_PIXTRAL_DEFAULTS, **given}
  where = f"{source}: vision_config."
  io.check_json_types(v, _VISION_TYPES, where, nullable=("head_dim", "rope_theta", "rope_parameters"))
  rp = dict(v.get("rope_parameters") or {})
  io.check_json_types(rp, _VISION_ROPE_TYPES, f"{where}rope_parameters.")
  if v.get("model_type", "pixtral") != "pixtral":
    raise UserError(f"{where}model_type={v['model_type']!r}: only the Pixtral vision encoder ('pixtral') is "
                     f"supported. {_TEXT_ONLY_HINT}")
  if v["hidden_act"] != "silu":
    raise UserError(f"{where}hidden_act={v['hidden_act']!r}" + (" (transformers' default when absent)"
                     if "hidden_act" not in (given or {}) else "") + ": only SiLU ViTs (Ministral 3, Mistral "
                     f"Small 3.1) are supported, not Pixtral-12B's GELU one. {_TEXT_ONLY_HINT}")
  if v["num_channels"] != 3:
    raise UserError(f"{where}num_channels={v['num_channels']}: the vision encoder reads RGB images (3).")
  hidden, heads = v["hidden_size"], v["num_attention_heads"]
  io.check_vit_heads(hidden, heads, v.get("head_dim"), where)
  kind = rp.get("rope_type", rp.get("type", "axial"))
  if kind not in ("axial", "default"):
    raise UserError(f"{where}rope_parameters.rope_type={kind!r}: the ViT's 2D RoPE is 'axial'.")
  act = d.get("projector_hidden_act", "gelu")
  if act != "gelu":
    raise UserError(f"{source}: projector_hidden_act={act!r}: only 'gelu' (exact erf form) is supported.")
  layer = d.get("vision_feature_layer", -1)
  if layer not in (-1, [-1]) or isinstance(layer, bool):
    raise UserError(f"{source}: vision_feature_layer={layer!r}: only -1 (the last ViT layer's output) is "
                     "supported.")
  image_token = d.get("image_token_index", d.get("image_token_id", 10))
  return dict(
      vision_layers=v["num_hidden_layers"], vision_d_model=hidden, vision_heads=heads,
      vision_d_ffn=v["intermediate_size"], vision_patch_size=v["patch_size"], vision_image_size=v["image_size"],
      vision_rope_theta=float(rp.get("rope_theta", v.get("rope_theta") or 10_000.0)),
      spatial_merge_size=d.get("spatial_merge_size", 2),
      projector_bias=bool(d.get("multimodal_projector_bias", False)), image_token_id=image_token,
      image_break_id=d.get("image_break_token_id", 12), image_end_id=d.get("image_end_token_id", 13))


def _check_types(d: Mapping[str, Any], where: str) -> None:
  """Every key we read has its JSON type, so a "4" fails here naming the file and key, not in arithmetic."""
  io.check_json_types(d, _TYPES, where, _NULLABLE)
  eos = d.get("eos_token_id")
  for k, token in enumerate(eos if isinstance(eos, list) else [eos] if eos is not None else []):
    check_type(token, int, f"{where}eos_token_id" + (f"[{k}]" if isinstance(eos, list) else ""))
  for key in ("rope_parameters", "rope_scaling"):
    io.check_json_types(d.get(key) or {}, _ROPE_TYPES, f"{where}{key}.", nullable=tuple(_ROPE_TYPES))


def _rope_from_hf(d: Mapping[str, Any], model_type: str, default_theta: float,
                  max_len: int) -> dict[str, Any]:
  """RoPE / YaRN / query temperature fields from v5 `rope_parameters` or legacy `rope_scaling`."""
  rp = d.get("rope_parameters") or d.get("rope_scaling") or _DEFAULTS[model_type]["rope_parameters"]
  rp = dict(rp or {})
  kind = rp.get("rope_type", rp.get("type", "default"))
  out: dict[str, Any] = dict(rope_theta=float(rp.get("rope_theta", d.get("rope_theta", default_theta))))
  if rp.get("partial_rotary_factor", 1.0) != 1.0 or rp.get("truncate", True) is not True:
    raise UserError(f"Unsupported RoPE settings {rp}: partial rotary / untruncated YaRN.")
  if rp.get("attention_factor") is not None:
    raise UserError("An explicit YaRN attention_factor is not supported (use mscale / mscale_all_dim).")
  if kind == "default":
    out["rope_scaling"] = "none"
  elif kind == "yarn":
    original = rp.get("original_max_position_embeddings") or max_len
    out.update(rope_scaling="yarn", yarn_original_max_len=int(original),
               yarn_factor=float(rp.get("factor") or max_len / original),
               # transformers treats missing/zero betas as 32/1 and missing mscales as falsy.
               yarn_beta_fast=float(rp.get("beta_fast") or 32.0),
               yarn_beta_slow=float(rp.get("beta_slow") or 1.0),
               yarn_mscale=float(rp.get("mscale") or 0.0),
               yarn_mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0))
  else:
    raise UserError(f"Unsupported rope_type {kind!r}: only 'default' and 'yarn'.")
  beta = rp.get("llama_4_scaling_beta") if model_type == "ministral3" else None
  out["query_temperature_beta"] = float(beta or 0.0)
  if beta:
    if not rp.get("original_max_position_embeddings"):
      raise UserError("llama_4_scaling_beta is set but rope_parameters has no "
                       "original_max_position_embeddings.")
    out["query_temperature_len"] = int(rp["original_max_position_embeddings"])
  return out


def config_to_hf(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
  """A config.json that transformers loads as Ministral3ForCausalLM or MistralForCausalLM, or (a vision
  model) as Mistral3ForConditionalGeneration with that text model as its text_config.

  ministral3 when YaRN or the query temperature is on (mistral has neither).
  HF holds a single L0 for both, so they must agree when both are on.
  """
  ministral = cfg.rope_scaling == "yarn" or bool(cfg.query_temperature_beta)
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling == "yarn":
    rope.update(type="yarn", rope_type="yarn", factor=cfg.yarn_factor,
                original_max_position_embeddings=cfg.yarn_original_max_len, beta_fast=cfg.yarn_beta_fast,
                beta_slow=cfg.yarn_beta_slow, mscale=cfg.yarn_mscale, mscale_all_dim=cfg.yarn_mscale_all_dim)
  if cfg.query_temperature_beta:
    l0 = rope.setdefault("original_max_position_embeddings", cfg.query_temperature_len)
    if l0 != cfg.query_temperature_len:
      raise UserError(f"HF configs hold one original_max_position_embeddings for YaRN and the query "
                       f"temperature; this config has {l0} and {cfg.query_temperature_len}.")
  if ministral:
    rope["llama_4_scaling_beta"] = cfg.query_temperature_beta
  dtype = dtype or cfg.param_dtype
  text = {
      "architectures": ["Ministral3ForCausalLM" if ministral else "MistralForCausalLM"],
      "model_type": "ministral3" if ministral else "mistral",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ffn,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
      "rope_parameters": rope, "sliding_window": None, "attention_dropout": 0.0,
      "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, "initializer_range": 0.02,
      "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
      "dtype": dtype, "torch_dtype": dtype,
  }
  if not cfg.vision_layers:
    return text
  return {
      "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
      "text_config": {k: v for k, v in text.items() if k not in ("architectures", "dtype", "torch_dtype")},
      "vision_config": {
          "model_type": "pixtral", "hidden_size": cfg.vision_d_model, "intermediate_size": cfg.vision_d_ffn,
          "num_hidden_layers": cfg.vision_layers, "num_attention_heads": cfg.vision_heads,
          "head_dim": cfg.vision_d_model // cfg.vision_heads, "num_channels": 3,
          "image_size": cfg.vision_image_size, "patch_size": cfg.vision_patch_size, "hidden_act": "silu",
          "attention_dropout": 0.0, "initializer_range": 0.02,
          "rope_parameters": {"rope_type": "axial", "rope_theta": cfg.vision_rope_theta}},
      "image_token_index": cfg.image_token_id, "image_break_token_id": cfg.image_break_id,
      "image_end_token_id": cfg.image_end_id, "spatial_merge_size": cfg.spatial_merge_size,
      "multimodal_projector_bias": cfg.projector_bias, "projector_hidden_act": "gelu",
      "vision_feature_layer": -1, "tie_word_embeddings": cfg.tie_embeddings,
      "dtype": dtype, "torch_dtype": dtype,
  }


# --------------------------------------------------------------------------
# Tensors.
# --------------------------------------------------------------------------
def hf_names(prefix: str = "model.", lm_head: str = "lm_head.weight") -> dict[str, str]:
  """Our leaf names -> HF tensor names (`{i}` = layer)."""
  layer = prefix + "layers.{i}."
  return dict(
      tok_embeddings=prefix + "embed_tokens.weight", norm=prefix + "norm.weight", output=lm_head,
      attention_norm=layer + "input_layernorm.weight", ffn_norm=layer + "post_attention_layernorm.weight",
      wq=layer + "self_attn.q_proj.weight", wk=layer + "self_attn.k_proj.weight",
      wv=layer + "self_attn.v_proj.weight", wo=layer + "self_attn.o_proj.weight",
      w1=layer + "mlp.gate_proj.weight", w2=layer + "mlp.down_proj.weight", w3=layer + "mlp.up_proj.weight")


def hf_vision_names(root: str = "model.") -> dict[str, str]:
  """Our vision leaf names (`safetensors_io.vision_maps`) -> HF tensor names (`{i}` = ViT layer).

  `root` is "model." (v5) or "" (older files, and what transformers 5 writes to disk).
  """
  tower, proj = root + "vision_tower.", root + "multi_modal_projector."
  layer = tower + "transformer.layers.{i}."
  return dict(
      patch_conv=tower + "patch_conv.weight", ln_pre=tower + "ln_pre.weight",
      attention_norm=layer + "attention_norm.weight", ffn_norm=layer + "ffn_norm.weight",
      wq=layer + "attention.q_proj.weight", wk=layer + "attention.k_proj.weight",
      wv=layer + "attention.v_proj.weight", wo=layer + "attention.o_proj.weight",
      w1=layer + "feed_forward.gate_proj.weight", w2=layer + "feed_forward.down_proj.weight",
      w3=layer + "feed_forward.up_proj.weight",
      projector_norm=proj + "norm.weight", merging_layer=proj + "patch_merger.merging_layer.weight",
      w_in=proj + "linear_1.weight", b_in=proj + "linear_1.bias",
      w_out=proj + "linear_2.weight", b_out=proj + "linear_2.bias")


def hf_maps(cfg: ModelConfig, prefix: str | None = None, lm_head: str = "lm_head.weight",
            vision_root: str = "model.") -> list[io.TensorMap]:
  """The TensorMaps of every leaf of `cfg` under these HF spellings; by default what we export: a
  CausalLM's names (`model.*`), or for a vision model the v5 multimodal ones (`model.language_model.*`)."""
  if prefix is None:
    prefix = _PREFIXES[0][0] if cfg.vision_layers else "model."
  return (io.decoder_maps(cfg, hf_names(prefix, lm_head))
          + io.vision_maps(cfg, hf_vision_names(vision_root)))


def _detect_prefix(names: set[str]) -> tuple[str, str]:
  for prefix, lm_head in _PREFIXES:
    if prefix + "embed_tokens.weight" in names:
      return prefix, lm_head
  return _PREFIXES[-1]  # the missing-tensor check then names what is absent


def _detect_vision_root(names: set[str], text_prefix: str) -> str:
  """"model." (v5) or "" (older), by the patch conv; without one, the spelling of the text tensors."""
  for root in ("model.", ""):
    if root + "vision_tower.patch_conv.weight" in names:
      return root
  return "" if text_prefix == "language_model.model." else "model."


def _ignored(name: str) -> bool:
  return name.endswith(".rotary_emb.inv_freq")


def _ignored_text_only(name: str) -> bool:
  return name.startswith(_VISION_PREFIXES) or _ignored(name)


def load_hf(path: str | Path, cfg: ModelConfig | None = None, dtype: Any = None,
            shardings: Any = None, allow_non_finite: bool = False, text_only: bool = False
            ) -> tuple[dict[str, Any], ModelConfig]:
  """Imports an HF checkpoint directory; returns (params, config).

  `cfg`: optional; its architecture must agree with config.json, and its
  execution fields (remat, scan, ...) are kept. `dtype`: cast the weights
  (default: keep the checkpoint's). `shardings`: a tree of
  `jax.sharding.Sharding` shaped like the params, or a function of the
  checkpoint's config that returns one (`Partitioner.param_shardings`); each
  process then reads only the slices of each tensor its own devices hold
  and gets global arrays (else leaves are host numpy arrays). On a
  multi-process job every process calls this with the same arguments.
  Names, shapes and files are all checked before any weight is read; a
  tensor holding NaN or Inf is an error naming it and its file unless
  `allow_non_finite`. `text_only`: load a multimodal checkpoint's text
  decoder alone (its vision tensors are not read), exactly the model a
  text-only export of that decoder gives.
  """
  path = Path(path)
  hf_config = io.read_json(path / CONFIG_FILE, "an HF checkpoint needs its config.json.")
  found = config_from_hf(hf_config, str(path / CONFIG_FILE), text_only)
  files = io.find_shards(path, INDEX_FILE, "model.safetensors", "model*.safetensors")
  infos = io.read_headers(files)
  prefix, lm_head = _detect_prefix(set(infos))
  root = _detect_vision_root(set(infos), prefix)
  multimodal = hf_config.get("model_type") == "mistral3"
  return io.load_checkpoint(
      infos, found, f"HF checkpoint {path}", lambda c: hf_maps(c, prefix, lm_head, root),
      _ignored if found.vision_layers else _ignored_text_only, cfg, dtype, shardings, allow_non_finite,
      hint=_TEXT_ONLY_HINT if multimodal and not text_only else "")


def _shard_name(k: int, n: int) -> str:
  return "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"


def save_hf(params: Any, cfg: ModelConfig, path: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            dtype: Any = None, overwrite: bool = False, allow_non_finite: bool = False,
            extra_files: dict[str, str] | None = None) -> Path:
  """Exports to an HF directory (config.json, shards, index, and `extra_files`: name -> source file, e.g.
  the tokenizer's `tekken.json`, which `AutoTokenizer` loads): a text-only CausalLM, or for a vision model
  a Mistral3ForConditionalGeneration under the v5 tensor names.

  Written into a temporary sibling directory and renamed into place; an
  existing non-empty `path` is refused unless `overwrite`. `dtype` casts the
  stored tensors (default: the params' own dtype). Params holding NaN or Inf
  are refused (nothing is written) unless `allow_non_finite`. Params spread
  over several processes are streamed a layer at a time to process 0, which
  writes; every process must call this.
  """
  io.check_params(params, cfg)
  np_dtype = io.to_np_dtype(dtype) if dtype is not None else None
  maps = hf_maps(cfg)
  dtype_name = (np_dtype or io.to_np_dtype(params["tok_embeddings"].dtype)).name

  def fill(tmp: Path | None) -> None:
    weight_map, total_bytes = io.write_shards(tmp, params, maps, cfg, _shard_name, max_shard_bytes, np_dtype,
                                              allow_non_finite)
    if tmp is None:
      return
    if len(set(weight_map.values())) > 1:
      io.write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    io.write_json(tmp / CONFIG_FILE, config_to_hf(cfg, dtype_name))
    io.copy_files(tmp, extra_files)
  io.write_directory(path, overwrite, fill, collective=io.spread_over_processes(params))
  return Path(path)
