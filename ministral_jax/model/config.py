"""The decoder's configuration, the published sizes, and their parameter counts.

A `ModelConfig` is a frozen dataclass rather than a ConfigDict because it is
a Flax module attribute (it must be hashable), it is written into every
checkpoint as JSON, and a typo in a field name must fail loudly. Experiment
configs (`configs/*.py`, ml_collections) carry a `model` ConfigDict made by
`preset_dict(name)`; `ModelConfig.from_dict` validates it.

Fields split in two groups: *architecture* (what a checkpoint must agree on:
shapes, RoPE, norms) and *execution* (dtypes, remat, scan, attention
implementation), which may differ between the job that saved a checkpoint
and the job that loads it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import numbers
from typing import Any, Mapping

import ml_collections
import numpy as np

from ministral_jax.errors import UserError

ARCH_FIELDS = (
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ffn",
    "norm_eps", "tie_embeddings", "rope_theta", "rope_scaling", "yarn_factor",
    "yarn_original_max_len", "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale",
    "yarn_mscale_all_dim", "query_temperature_beta", "query_temperature_len", "max_seq_len",
)
# Written into a checkpoint's architecture only when vision_layers > 0, so text-only checkpoints
# and run identities stay byte for byte what they were before vision existed.
VISION_FIELDS = (
    "vision_layers", "vision_d_model", "vision_heads", "vision_d_ffn", "vision_patch_size",
    "vision_image_size", "vision_rope_theta", "spatial_merge_size", "projector_bias", "image_token_id",
    "image_break_id", "image_end_id",
)
ARCH_FIELDS = ARCH_FIELDS + VISION_FIELDS


ATTENTION_IMPLS = ("auto", "blockwise", "xla", "cudnn", "splash", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Ministral 3 / Mistral Small 3.1 text decoder (paper Table 1)."""

  # --- architecture ---
  vocab_size: int = 131_072
  d_model: int = 4096  # HF hidden_size
  n_layers: int = 34
  n_heads: int = 32
  n_kv_heads: int = 8
  head_dim: int = 128  # independent of d_model / n_heads
  d_ffn: int = 14336  # HF intermediate_size
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  rope_theta: float = 1e6
  rope_scaling: str = "yarn"  # "none" (plain RoPE) or "yarn"
  yarn_factor: float = 16.0
  yarn_original_max_len: int = 16_384  # also L0 of the query temperature
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float = 1.0
  yarn_mscale_all_dim: float = 1.0
  # Query temperature 1 + beta * log(1 + floor(pos / len)) ("llama_4_scaling").
  # beta = 0 switches it off (Mistral Small 3.1).
  query_temperature_beta: float = 0.1
  query_temperature_len: int = 16_384
  max_seq_len: int = 262_144
  bos_id: int = 1
  eos_id: int = 2
  pad_id: int = 11
  # Vision: the Pixtral ViT and the multimodal projector (model/vision.py). vision_layers = 0 is a
  # text-only model: no vision parameters at all, checkpoints exactly as before.
  vision_layers: int = 0
  vision_d_model: int = 1024  # HF vision_config.hidden_size
  vision_heads: int = 16  # MHA; head_dim = vision_d_model / vision_heads
  vision_d_ffn: int = 4096
  vision_patch_size: int = 14
  vision_image_size: int = 1540  # longest side an image is resized to before patching
  vision_rope_theta: float = 10_000.0
  spatial_merge_size: int = 2  # the projector merges 2x2 patches into one [IMG] token
  projector_bias: bool = False  # HF multimodal_projector_bias
  image_token_id: int = 10  # [IMG]: replaced by image features
  image_break_id: int = 12  # [IMG_BREAK], [IMG_END]: ordinary text embeddings
  image_end_id: int = 13

  # --- execution ---
  param_dtype: str = "float32"
  dtype: str = "float32"  # activations and matmul inputs
  # "auto" (the best kernel for the backend), "blockwise", "splash" (TPU), "pallas_gpu",
  # "cudnn" (GPU, unpacked only), "xla" (dense reference); see model/attention_kernels.py.
  attention_impl: str = "auto"
  attention_block: int = 256  # query/key tile of the flash kernels (splash: a multiple of 128)
  # "none", "full" (recompute the block), "dots" (save matmul outputs),
  # "dots_no_batch" (save matmuls without batch dims: weights-stationary).
  remat_policy: str = "none"
  # True: lax.scan over the stacked layers (one compiled block); False: the
  # same loop fully unrolled. Params are stacked `[layers, ...]` either way.
  scan_layers: bool = True
  matmul_precision: str = "default"  # "default" | "high" | "highest"
  # False (the paper): the ViT gets no gradient (stop_gradient on its output) and no optimiser state.
  train_vision_encoder: bool = False

  def __post_init__(self):
    for field in dataclasses.fields(self):  # first: the checks below compare and format the values
      value = check_type(getattr(self, field.name), _FIELD_TYPES[field.type], f"Model config field {field.name}")
      object.__setattr__(self, field.name, value)
    _check(self.rope_scaling in ("none", "yarn"), "rope_scaling", self.rope_scaling, "'none' or 'yarn'")
    _check(self.n_heads % self.n_kv_heads == 0, "n_heads", self.n_heads,
           f"a multiple of n_kv_heads={self.n_kv_heads} (grouped-query attention)")
    _check(self.head_dim % 2 == 0, "head_dim", self.head_dim, "even (RoPE rotates pairs)")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ffn"):
      _check(int(getattr(self, name)) > 0, name, getattr(self, name), "a positive integer")
    if self.vision_layers:
      _check(self.vision_layers > 0, "vision_layers", self.vision_layers, "0 (text only) or positive")
      _check(self.vision_d_model % self.vision_heads == 0 and (self.vision_d_model // self.vision_heads) % 2 == 0,
             "vision_heads", self.vision_heads, f"a divisor of vision_d_model={self.vision_d_model} leaving an "
             "even head_dim (2D RoPE rotates pairs)")
      for name in ("vision_d_ffn", "vision_patch_size", "vision_image_size", "spatial_merge_size"):
        _check(int(getattr(self, name)) > 0, name, getattr(self, name), "a positive integer")
      for name in ("image_token_id", "image_break_id", "image_end_id"):
        _check(0 <= getattr(self, name) < self.vocab_size, name, getattr(self, name),
               f"a token id below vocab_size={self.vocab_size}")
    _check(self.attention_impl in ATTENTION_IMPLS, "attention_impl", self.attention_impl,
           f"one of {ATTENTION_IMPLS}")
    _check(8 <= self.attention_block and self.attention_block % 8 == 0, "attention_block", self.attention_block,
           "a multiple of 8, at least 8 (splash on TPU: a multiple of 128)")
    _check(self.remat_policy in REMAT_POLICIES, "remat_policy", self.remat_policy, f"one of {REMAT_POLICIES}")
    _check(self.matmul_precision in ("default", "high", "highest"), "matmul_precision",
           self.matmul_precision, "'default', 'high' or 'highest'")
    for name in ("param_dtype", "dtype"):
      _check(getattr(self, name) in ("float32", "bfloat16", "float16"), name, getattr(self, name),
             "'float32', 'bfloat16' or 'float16'")

  # --- derived ---
  @property
  def q_per_kv(self) -> int:
    return self.n_heads // self.n_kv_heads

  def arch_dict(self) -> dict[str, Any]:
    fields = ARCH_FIELDS if self.vision_layers else ARCH_FIELDS[:-len(VISION_FIELDS)]
    return {k: getattr(self, k) for k in fields}

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **changes: Any) -> "ModelConfig":
    return ModelConfig.from_dict({**self.to_dict(), **changes})

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config; an unknown field is an error that names the closest field."""
    if isinstance(d, ml_collections.ConfigDict):
      d = d.to_dict()
    known = {f.name for f in dataclasses.fields(cls)}
    for key in d:
      if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"Unknown model config field '{key}'.{hint} Known fields: {sorted(known)}")
    return cls(**dict(d))

  def mismatches(self, other: "ModelConfig") -> list[str]:
    """Architecture fields on which two configs disagree (for checkpoint checks)."""
    return [f"{k}: {getattr(self, k)!r} != {getattr(other, k)!r}"
            for k in ARCH_FIELDS if getattr(self, k) != getattr(other, k)]


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
  if not ok:
    raise UserError(f"Model config field '{field}' = {value!r} is invalid: it must be {expected}.")


# The annotations are strings (`from __future__ import annotations`).
_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}


def check_type(value: Any, kind: type, where: str) -> Any:
  """`value` as a plain `kind` (int, float, bool, str; dict for JSON objects), or a UserError naming
  `where` and both types.

  Checked because a JSON file or a command line easily gives "4" or 4.0 for
  4, which otherwise fails far away (a string in a shape, a float in a range).
  bool is refused where a number is expected (Python counts it as an int).
  Numbers become plain Python ints / floats, so to_dict() stays JSON and
  equal configs hash equally (4 and 4.0 alike for a float field).
  """
  is_bool = isinstance(value, (bool, np.bool_))
  if kind is bool and is_bool:
    return bool(value)
  if kind is int and isinstance(value, numbers.Integral) and not is_bool:
    return int(value)
  if kind is float and isinstance(value, numbers.Real) and not is_bool:
    return float(value)
  if (kind is str and isinstance(value, str)) or (kind is dict and isinstance(value, Mapping)):
    return value
  got = type(value).__name__
  raise UserError(f"{where}={_shown(value)} is {'an' if got[0] in 'aeiou' else 'a'} {got}; "
                  f"{_TYPE_NAMES[kind]} is expected.")


def _shown(value: Any) -> str:
  """The value as its JSON source spells it ("4", null, true) where it has a JSON spelling."""
  try:
    return json.dumps(value)
  except (TypeError, ValueError):
    return repr(value)


# --------------------------------------------------------------------------
# Published sizes. Sources (see ../shared/reference/ministral3_spec.md §1.2):
#  - 8B: transformers `Ministral3Config` defaults (v5.23) and the 8B config.json.
#  - 3B/14B: Megatron-Bridge `Ministral3ModelProvider{3B,14B}`; 14B rope_theta 1e9;
#    3B ties its embeddings (its HF checkpoint has no lm_head tensor).
#  - 24B: Mistral-Small-3.1-24B-Instruct-2503 config.json text_config
#    (model_type "mistral": plain RoPE theta 1e9, no query temperature, 128K).
# All: vocab 131,072, head_dim 128, 32/8 heads, RMSNorm eps 1e-5, no sliding window.
# --------------------------------------------------------------------------
_NO_YARN = dict(rope_scaling="none", query_temperature_beta=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    "mistral_small_3_1_24b": dict(n_layers=40, d_model=5120, d_ffn=32768, rope_theta=1e9,
                                  max_seq_len=131_072, **_NO_YARN),
    "ministral3_14b": dict(n_layers=40, d_model=5120, d_ffn=16384, rope_theta=1e9),
    "ministral3_8b": dict(n_layers=34, d_model=4096, d_ffn=14336, rope_theta=1e6),
    "ministral3_3b": dict(n_layers=26, d_model=3072, d_ffn=9216, rope_theta=1e6, tie_embeddings=True),
    # Tiny sizes for tests and CPU experiments. They keep the features that make
    # Ministral 3 different: head_dim != d_model / n_heads, GQA, YaRN with a
    # short original context so that tests cross it, and the query temperature.
    "tiny": dict(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=32,
                 d_ffn=128, yarn_factor=4.0, yarn_original_max_len=32, query_temperature_len=32,
                 max_seq_len=128),
    "tiny_tied": dict(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=32,
                      d_ffn=128, tie_embeddings=True, yarn_factor=4.0, yarn_original_max_len=32,
                      query_temperature_len=32, max_seq_len=128),
    # Heads divisible by a tensor axis of 4 (sharding tests).
    "tiny_shard": dict(vocab_size=256, n_layers=2, d_model=64, n_heads=8, n_kv_heads=4, head_dim=16,
                       d_ffn=128, yarn_factor=4.0, yarn_original_max_len=32, query_temperature_len=32,
                       max_seq_len=128),
    # CPU experiments on the built-in corpus (vocab set by the trained SentencePiece).
    "cpu_tiny": dict(vocab_size=1024, n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32,
                     d_ffn=384, yarn_factor=4.0, yarn_original_max_len=512, query_temperature_len=512,
                     max_seq_len=2048),
    "cpu_small": dict(vocab_size=1024, n_layers=6, d_model=256, n_heads=8, n_kv_heads=2, head_dim=32,
                      d_ffn=768, yarn_factor=4.0, yarn_original_max_len=512, query_temperature_len=512,
                      max_seq_len=2048),
    # ~100M parameters, for the CPU throughput benchmark.
    "bench_100m": dict(vocab_size=32_768, n_layers=8, d_model=768, n_heads=12, n_kv_heads=4,
                       head_dim=64, d_ffn=2816, yarn_original_max_len=4096, query_temperature_len=4096,
                       max_seq_len=8192),
}

# Every Ministral 3 size and Mistral Small 3.1 pair the decoder with the same Pixtral ViT (24 layers,
# 1024 wide, 16 heads, patch 14, images up to 1540 px) and a projector of the decoder's width
# (ministral3_spec.md §5.1). The text presets stay text-only; `<name>_vision` is the whole model.
VISION_PRESET = dict(vision_layers=24, vision_d_model=1024, vision_heads=16, vision_d_ffn=4096,
                     vision_patch_size=14, vision_image_size=1540, vision_rope_theta=10_000.0,
                     spatial_merge_size=2, projector_bias=False)
for _name in ("mistral_small_3_1_24b", "ministral3_14b", "ministral3_8b", "ministral3_3b"):
  PRESETS[f"{_name}_vision"] = {**PRESETS[_name], **VISION_PRESET}
# A tiny ViT (patch 4, so a 16x16 image is 2x2 [IMG] tokens) on the tiny decoder, for tests.
PRESETS["tiny_vision"] = {**PRESETS["tiny"], "vision_layers": 2, "vision_d_model": 32, "vision_heads": 2,
                          "vision_d_ffn": 64, "vision_patch_size": 4, "vision_image_size": 64}

# Published sizes, for the parameter-count test. Model cards give the language
# model's size to 0.1B (Ministral 3: "3.4B / 8.4B / 13.5B language model +
# 0.4B vision encoder"); Mistral Small 3.1 is "24B" for the whole model, so
# its check adds the 0.4B ViT and the projector to the decoder.
PUBLISHED_PARAMS = {
    "mistral_small_3_1_24b": 24.0e9,
    "ministral3_14b": 13.5e9,
    "ministral3_8b": 8.4e9,
    "ministral3_3b": 3.4e9,
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise UserError(f"Unknown model preset '{name}'. Known presets: {sorted(PRESETS)}")
  return ModelConfig.from_dict({**PRESETS[name], **overrides})


def preset_dict(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The preset as a ConfigDict holding every field, for experiment configs."""
  return ml_collections.ConfigDict(preset(name, **overrides).to_dict())


def param_count(cfg: ModelConfig) -> int:
  """Exact parameter count from the shapes (no weights allocated)."""
  d, f, h = cfg.d_model, cfg.d_ffn, cfg.head_dim
  attention = d * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
  block = attention + 3 * d * f + 2 * d
  embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  return cfg.n_layers * block + embed + d + vision_param_count(cfg) + projector_param_count(cfg)


def vision_param_count(cfg: ModelConfig) -> int:
  """The ViT: patch conv, ln_pre, and its pre-norm blocks (MHA + SwiGLU, no biases)."""
  if not cfg.vision_layers:
    return 0
  dv, p = cfg.vision_d_model, cfg.vision_patch_size
  block = 4 * dv * dv + 3 * dv * cfg.vision_d_ffn + 2 * dv
  return p * p * 3 * dv + dv + cfg.vision_layers * block


def projector_param_count(cfg: ModelConfig) -> int:
  """RMSNorm, the patch merger, and the two linears into the decoder's width."""
  if not cfg.vision_layers:
    return 0
  dv, d, m = cfg.vision_d_model, cfg.d_model, cfg.spatial_merge_size ** 2
  return dv + m * dv * dv + dv * d + d * d + (2 * d if cfg.projector_bias else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int, backward: bool = True) -> float:
  """Matmul FLOPs per token of a forward (+ backward) pass, causal attention halved."""
  d, f, h = cfg.d_model, cfg.d_ffn, cfg.head_dim
  per_layer = 2 * d * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 2 * 3 * d * f
  per_layer += 2 * 2 * cfg.n_heads * h * seq_len / 2  # QK^T and PV, causal
  total = cfg.n_layers * per_layer + 2 * d * cfg.vocab_size
  return total * (3 if backward else 1)

