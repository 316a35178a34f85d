"""Calibration statistics for pruning, accumulated in streaming form (paper, Algorithm 2).

One forward pass per batch, layer by layer (a `lax.scan` over the stacked
layers, calling the model's own RMSNorm / Attention / FeedForward modules),
adds to running sums and never keeps activations. `w` is 1 on real tokens and
0 on padding; sums run over tokens unless said otherwise:

    norm_ratio      [layers]        sum w ||h_out|| / ||h_in||             (paper: layer importance)
    block_influence [layers]        sum w (1 - cos(h_in, h_out))           (ShortGPT)
    second_moment   [d, d]          sum w x x^T, x = every attention- and FFN-norm input (the
                                    residual stream), all layers together  (paper: PCA)
    second_moment_normalized [d, d] the same with x / rms(x): every token weighs the same, so a few
                                    high-norm tokens ("massive activations") cannot own the PCA
    channel_energy  [layers, 2, d]  per norm site, sum over rows of (mean_t |norm output|)^2
                                    (Minitron: mean over the sequence, L2 over the batch)
    ffn_act         [layers, d_ffn] sum w |silu(W1 x) * (W3 x)|             (paper: FFN channels)
    tokens          []              sum w

Memory is O(d^2 + layers * (d + d_ffn)) however many tokens are seen. Only the
statistics a run's scorers need are computed (`wanted`): the second moment is
the one that costs FLOPs (2 d^2 per token and norm site).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ministral_jax import sharding
from ministral_jax.errors import UserError
from ministral_jax.model import layers as model_layers
from ministral_jax.model import transformer
from ministral_jax.model.blockwise_attention import Layout
from ministral_jax.model.config import ModelConfig

STATS = ("norm_ratio", "block_influence", "second_moment", "second_moment_normalized", "channel_energy",
         "ffn_act")
_MOMENTS = {"second_moment": lambda x: x,
            "second_moment_normalized": lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-12)}
_HI = jax.lax.Precision.HIGHEST  # statistics are sums of many terms: no bf16 passes on TPU


def _gram(x: jax.Array, w: jax.Array) -> jax.Array:
  """sum_t w_t x_t x_t^T over `[batch, seq, d]` -> `[d, d]` (float32)."""
  return jnp.einsum("btd,bte,bt->de", x, x, w, precision=_HI)


def _row_energy(y: jax.Array, w: jax.Array) -> jax.Array:
  """Minitron's aggregation of one norm site: mean |y| over each row's tokens, squared, summed
  over rows -> `[d]` (an L2 over the batch once the square root is taken)."""
  per_row = jnp.einsum("btd,bt->bd", jnp.abs(y.astype(jnp.float32)), w)
  per_row = per_row / jnp.maximum(jnp.sum(w, axis=1), 1.0)[:, None]
  return jnp.sum(per_row * per_row, axis=0)


def batch_stats(params: Any, cfg: ModelConfig, batch: dict, wanted: Iterable[str] = STATS
                ) -> dict[str, jax.Array]:
  """The wanted statistics of one packed batch (`inputs`, `positions`, `segment_ids`; segment 0 = padding)."""
  wanted = frozenset(wanted)
  unknown = wanted - set(STATS)
  if unknown:
    raise UserError(f"Unknown calibration statistics {sorted(unknown)}; known: {STATS}.")
  dt = jnp.dtype(cfg.dtype)
  tokens, positions, segments = batch["inputs"], batch["positions"], batch["segment_ids"]
  w = (segments != 0).astype(jnp.float32)  # [batch, seq]
  h = jnp.take(params["tok_embeddings"], tokens, axis=0).astype(dt)  # [batch, seq, d_model]
  rope_tables, q_scale = transformer.position_tables(cfg, positions, dt)
  layout = Layout(segments, segments)
  norm, attention, ffn = model_layers.RMSNorm(cfg), model_layers.Attention(cfg), model_layers.FeedForward(cfg)

  moments = [k for k in _MOMENTS if k in wanted]

  def layer(carry, p):
    h, sums = carry
    x_attn = norm.apply({"params": p["attention_norm"]}, h)
    attn_out, _ = attention.apply({"params": p["attention"]}, x_attn, rope_tables, q_scale, layout, None, None)
    mid = h + attn_out
    x_ffn = norm.apply({"params": p["ffn_norm"]}, mid)
    ffn_out, inter = ffn.apply({"params": p["feed_forward"]}, x_ffn, mutable=["intermediates"])
    out = mid + ffn_out
    per_layer = {}
    for k in moments:
      x_in, x_mid = (_MOMENTS[k](x.astype(jnp.float32)) for x in (h, mid))
      sums = {**sums, k: sums[k] + _gram(x_in, w) + _gram(x_mid, w)}
    if "channel_energy" in wanted:
      per_layer["channel_energy"] = jnp.stack([_row_energy(x_attn, w), _row_energy(x_ffn, w)])
    if "ffn_act" in wanted:
      hidden = inter["intermediates"]["hidden"][0]  # [batch, seq, d_ffn]: silu(W1 x) * W3 x
      per_layer["ffn_act"] = jnp.einsum("btf,bt->f", jnp.abs(hidden.astype(jnp.float32)), w)
    if wanted & {"norm_ratio", "block_influence"}:
      x_in, x_out = h.astype(jnp.float32), out.astype(jnp.float32)
      n_in, n_out = jnp.linalg.norm(x_in, axis=-1), jnp.linalg.norm(x_out, axis=-1)
      per_layer["norm_ratio"] = jnp.sum(w * n_out / jnp.maximum(n_in, 1e-12))
      cos = jnp.sum(x_in * x_out, -1) / jnp.maximum(n_in * n_out, 1e-12)
      per_layer["block_influence"] = jnp.sum(w * (1 - cos))
    return (out, sums), {k: v for k, v in per_layer.items() if k in wanted}

  zeros = {k: jnp.zeros((cfg.d_model, cfg.d_model), jnp.float32) for k in moments}
  (_, sums), per_layer = jax.lax.scan(layer, (h, zeros), params["layers"])
  return {**per_layer, **sums, "tokens": jnp.sum(w)}


@functools.lru_cache(maxsize=16)
def _steps(cfg: ModelConfig, wanted: tuple[str, ...], partitioner: sharding.Partitioner):
  """The jitted first and accumulating steps (cached: re-calibration and ablations reuse them)."""
  param_shardings = partitioner.param_shardings(cfg)
  replicated = jax.sharding.NamedSharding(partitioner.mesh, jax.sharding.PartitionSpec())
  batch = partitioner.batch_sharding(2)
  first = jax.jit(lambda p, b: batch_stats(p, cfg, b, wanted), in_shardings=(param_shardings, batch),
                  out_shardings=replicated)
  add = lambda stats, p, b: jax.tree.map(jnp.add, stats, batch_stats(p, cfg, b, wanted))
  step = jax.jit(add, in_shardings=(replicated, param_shardings, batch), out_shardings=replicated,
                 donate_argnums=(0,))
  return first, step


def calibrate(params: Any, cfg: ModelConfig, batches: Iterable[dict], partitioner: sharding.Partitioner,
              wanted: Iterable[str] = STATS) -> dict[str, np.ndarray]:
  """One sharded pass over `batches` (host numpy, this process's rows): the summed statistics.

  The running sums stay on the devices (replicated; the batch axis is reduced
  across the mesh by XLA) and come to the host once, at the end.
  """
  first, step = _steps(cfg, tuple(sorted(set(wanted))), partitioner)
  stats = None
  with partitioner.activate():
    for batch in batches:
      batch = partitioner.shard_batch({k: batch[k] for k in ("inputs", "positions", "segment_ids")})
      stats = first(params, batch) if stats is None else step(stats, params, batch)
  if stats is None or float(stats["tokens"]) == 0:
    raise UserError("The calibration data produced no tokens. Point config.data at a non-empty corpus "
                     "(or raise prune.calibration_batches).")
  return {k: np.asarray(v) for k, v in jax.device_get(stats).items()}
