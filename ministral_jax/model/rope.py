"""Rotary position embeddings: plain RoPE, YaRN, and the query temperature.

Everything here is computed in float32 exactly as transformers' `ministral3`
does (`modeling_rope_utils._compute_yarn_parameters`, `get_llama_4_attn_scale`),
because the logits must match it. q/k use the "rotate half" layout: pair j is
(x[j], x[j + head_dim/2]); Mistral-native checkpoints interleave pairs and are
permuted on import (`checkpoint/native.py`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ministral_jax.model.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """Returns (inv_freq [head_dim/2] float32, attention_factor)."""
  d = cfg.head_dim
  base = np.float32(cfg.rope_theta)
  # Same op order as torch: base ** (arange(0, d, 2) / d), in float32.
  exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
  pos_freqs = np.power(base, exponents, dtype=np.float32)
  if cfg.rope_scaling == "none":
    return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0
  return _yarn(cfg, pos_freqs)


def _yarn(cfg: ModelConfig, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
  d, base, factor = cfg.head_dim, cfg.rope_theta, cfg.yarn_factor
  original_len = cfg.yarn_original_max_len

  def scale_to_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

  if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
    attention_factor = scale_to_mscale(factor, cfg.yarn_mscale) / scale_to_mscale(
        factor, cfg.yarn_mscale_all_dim)
  else:
    attention_factor = scale_to_mscale(factor)

  def correction_dim(rotations: float) -> float:
    return (d * math.log(original_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

  low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
  high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), d - 1)
  if low == high:
    high += 0.001
  ramp = (np.arange(d // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
  ramp = np.clip(ramp, 0, 1).astype(np.float32)
  extrapolation_weight = np.float32(1) - ramp
  inv_freq_extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
  inv_freq_interpolation = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
  inv_freq = (inv_freq_interpolation * (1 - extrapolation_weight)
              + inv_freq_extrapolation * extrapolation_weight)
  return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(cfg: ModelConfig, positions: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos/sin tables `[batch, seq, head_dim]` for integer positions `[batch, seq]`."""
  inv_freq, attention_factor = inverse_frequencies(cfg)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [batch, seq, head_dim]
  cos = jnp.cos(angles) * attention_factor
  sin = jnp.sin(angles) * attention_factor
  return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """x `[batch, seq, heads, head_dim]`; cos/sin `[batch, seq, head_dim]`."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def query_temperature(cfg: ModelConfig, positions: jnp.ndarray, dtype) -> jnp.ndarray:
  """`1 + beta * log(1 + floor(pos / L0))`, shape `[batch, seq, 1, 1]`.

  Multiplies the queries after RoPE so that attention sharpens beyond the
  original context L0; equal to 1 for every position below L0.
  """
  pos = positions.astype(jnp.float32)
  scale = 1.0 + cfg.query_temperature_beta * jnp.log(1.0 + jnp.floor(pos / cfg.query_temperature_len))
  return scale[:, :, None, None].astype(dtype)
