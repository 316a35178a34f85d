"""Calibration statistics for pruning, accumulated in streaming form (paper, Algorithm 2).

One forward pass per batch, layer by layer (a `lax.scan` over the stacked
layers, calling the model's own RMSNorm / Attention / FeedForward modules),
adds to running sums and never keeps activations:

    norm_ratio [layers]    sum over tokens of ||h_out|| / ||h_in||   (layer importance)
    one_minus_cos [layers] sum of 1 - cos(h_in, h_out)               (ShortGPT block influence)
    second_moment [d, d]   sum of x x^T over the inputs of every attention and FFN norm
    ffn_act [layers, d_ffn] sum of |silu(W1 x) * (W3 x)|             (FFN channel importance)
    tokens                 number of (unmasked) tokens

Memory is O(d^2 + layers * d_ffn) however many tokens are seen. Divide by
`tokens` (or 2 * layers * tokens for the second moment) for means.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ministral_jax.model import layers as model_layers
from ministral_jax.model import transformer
from ministral_jax.model.config import ModelConfig


def empty_stats(cfg: ModelConfig) -> dict[str, jax.Array]:
  f32 = jnp.float32
  return {"norm_ratio": jnp.zeros((cfg.n_layers,), f32), "one_minus_cos": jnp.zeros((cfg.n_layers,), f32),
          "second_moment": jnp.zeros((cfg.d_model, cfg.d_model), f32),
          "ffn_act": jnp.zeros((cfg.n_layers, cfg.d_ffn), f32), "tokens": jnp.zeros((), f32)}


def batch_stats(params: Any, cfg: ModelConfig, batch: dict) -> dict[str, jax.Array]:
  """The statistics of one packed batch (`inputs`, `positions`, `segment_ids`; segment 0 = padding)."""
  dt = jnp.dtype(cfg.dtype)
  tokens, positions, segments = batch["inputs"], batch["positions"], batch["segment_ids"]
  weight = (segments != 0).astype(jnp.float32)  # [batch, seq]
  h = jnp.take(params["tok_embeddings"], tokens, axis=0).astype(dt)
  rope_tables, q_scale = transformer.position_tables(cfg, positions, dt)
  mask = transformer.segment_causal_mask(segments)
  norm, attention, ffn = (model_layers.RMSNorm(cfg), model_layers.Attention(cfg), model_layers.FeedForward(cfg))

  def layer(carry, p):
    h, second_moment = carry
    x = h.astype(jnp.float32)
    second_moment += jnp.einsum("btd,bte,bt->de", x, x, weight)
    attn_out, _ = attention.apply({"params": p["attention"]},
                                  norm.apply({"params": p["attention_norm"]}, h), rope_tables, q_scale, mask,
                                  None, None)
    mid = h + attn_out
    xm = mid.astype(jnp.float32)
    second_moment += jnp.einsum("btd,bte,bt->de", xm, xm, weight)
    normed = norm.apply({"params": p["ffn_norm"]}, mid)
    w1, w3 = (p["feed_forward"][k].astype(dt) for k in ("w1", "w3"))
    act = jax.nn.silu(normed @ w1) * (normed @ w3)  # [batch, seq, d_ffn]
    out = mid + ffn.apply({"params": p["feed_forward"]}, normed)
    xo = out.astype(jnp.float32)
    n_in, n_out = jnp.linalg.norm(x, axis=-1), jnp.linalg.norm(xo, axis=-1)
    per_layer = {
        "norm_ratio": jnp.sum(weight * n_out / jnp.maximum(n_in, 1e-12)),
        "one_minus_cos": jnp.sum(weight * (1 - jnp.sum(x * xo, -1) / jnp.maximum(n_in * n_out, 1e-12))),
        "ffn_act": jnp.einsum("btf,bt->f", jnp.abs(act.astype(jnp.float32)), weight),
    }
    return (out, second_moment), per_layer

  (_, second_moment), per_layer = jax.lax.scan(
      layer, (h, jnp.zeros((cfg.d_model, cfg.d_model), jnp.float32)), params["layers"])
  return {**per_layer, "second_moment": second_moment, "tokens": jnp.sum(weight)}


def accumulate(stats: dict, new: dict) -> dict:
  return jax.tree.map(jnp.add, stats, new)
