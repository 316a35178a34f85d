"""Importance scorers: the paper's, and the alternatives an ablation compares them with.

Every scorer reads the calibration statistics of the model it scores (see
`calibration.py`; sums, not yet divided by the token count, which never
changes a ranking) and/or its params, and returns scores where higher means
keep. Layers and FFN channels keep their top-k in their original order;
ties go to the lower index.

    layers  norm_ratio       mean ||h_out|| / ||h_in||              (paper, Algorithm 2)
            block_influence  mean 1 - cos(h_in, h_out)              (ShortGPT)
            random           a seeded permutation
            drop_last        keeps the first layers, drops the last ones
    hidden  pca              top principal directions of the residual stream at every norm input (paper)
            pca_normalized   the same PCA of x / rms(x): every token weighs the same (SliceGPT's raw
                             stream is dominated by a few high-norm tokens and directions)
            activation       per-channel energy of the norm outputs: mean over the sequence, L2 over
                             the rows, summed over every norm site (Minitron)
            gain             sum of |RMSNorm gain| over every norm (a weight-only baseline)
    ffn     activation       mean |silu(W1 x) * (W3 x)|             (paper)
            magnitude        L2 norm of the channel's weights in W1, W3 and W2
            random           a seeded permutation

Hidden scorers other than pca pick channels; the rewrite slices them as the
rotation Q = I[:, kept], so every hidden scorer goes through the same code.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from ministral_jax import multihost
from ministral_jax.prune import rotate

Stats = dict[str, np.ndarray]
# (stats of the current model, its params, a seeded generator) -> scores, higher = keep
Scorer = Callable[[Stats, Any, np.random.Generator], np.ndarray]


def _n_layers(params: Any) -> int:
  return int(params["layers"]["attention_norm"]["scale"].shape[0])


def _d_ffn(params: Any) -> int:
  return int(params["layers"]["feed_forward"]["w2"].shape[1])


def _ffn_magnitude(params: Any) -> np.ndarray:
  ffn = params["layers"]["feed_forward"]
  sq = lambda w, axis: jnp.sum(jnp.square(w.astype(jnp.float32)), axis=axis)
  return multihost.host_value(jnp.sqrt(sq(ffn["w1"], 1) + sq(ffn["w3"], 1) + sq(ffn["w2"], 2)))  # [layers, d_ffn]


def _gain_magnitude(params: Any) -> np.ndarray:
  layers = params["layers"]
  total = (jnp.sum(jnp.abs(layers["attention_norm"]["scale"]), axis=0) + jnp.sum(jnp.abs(layers["ffn_norm"]["scale"]), axis=0)
           + jnp.abs(params["norm"]["scale"]))
  return multihost.host_value(total).astype(np.float64)


LAYER_SCORERS: dict[str, Scorer] = {
    "norm_ratio": lambda stats, params, rng: stats["norm_ratio"],
    "block_influence": lambda stats, params, rng: stats["block_influence"],
    "random": lambda stats, params, rng: rng.permutation(_n_layers(params)).astype(np.float64),
    "drop_last": lambda stats, params, rng: -np.arange(_n_layers(params), dtype=np.float64),
}
HIDDEN_SCORERS: dict[str, Scorer | None] = {
    "pca": None,  # rotations, not per-channel scores: see `hidden_rotation`
    "pca_normalized": None,
    "activation": lambda stats, params, rng: np.sqrt(stats["channel_energy"]).sum(axis=(0, 1)),
    "gain": lambda stats, params, rng: _gain_magnitude(params),
}
FFN_SCORERS: dict[str, Scorer] = {
    "activation": lambda stats, params, rng: stats["ffn_act"],
    "magnitude": lambda stats, params, rng: _ffn_magnitude(params),
    "random": lambda stats, params, rng: np.stack([rng.permutation(_d_ffn(params)).astype(np.float64)
                                                   for _ in range(_n_layers(params))]),
}
SCORERS = {"layers": LAYER_SCORERS, "hidden": HIDDEN_SCORERS, "ffn": FFN_SCORERS}

# The calibration statistics each scorer reads.
NEEDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("layers", "norm_ratio"): ("norm_ratio",),
    ("layers", "block_influence"): ("block_influence",),
    ("hidden", "pca"): ("second_moment",),
    ("hidden", "pca_normalized"): ("second_moment_normalized",),
    ("hidden", "activation"): ("channel_energy",),
    ("ffn", "activation"): ("ffn_act",),
}


def needs(step: str, scorer: str) -> tuple[str, ...]:
  return NEEDS.get((step, scorer), ())


def keep_top(scores: np.ndarray, k: int) -> np.ndarray:
  """The ids of the k highest scores along the last axis, ascending (ties go to the lower id)."""
  order = np.argsort(-np.asarray(scores, np.float64), axis=-1, kind="stable")
  return np.sort(order[..., :k], axis=-1).astype(np.int32)


def hidden_rotation(scorer: str, stats: Stats, params: Any, d_new: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, dict[str, Any]]:
  """The `[d, d']` basis the child keeps, and what the report says of it.

  `explained_variance` (PCA scorers) is the fraction of the PCA's own second
  moment that the kept directions hold; `energy_kept` is the fraction of the
  raw residual stream's second moment the kept subspace holds, for any scorer,
  whenever that moment was measured (so an ablation compares them on one scale).
  """
  d = int(params["tok_embeddings"].shape[1])
  info: dict[str, Any] = {}
  if scorer in ("pca", "pca_normalized"):
    q, eigvals = rotate.pca_rotation(stats[NEEDS[("hidden", scorer)][0]], d_new)
    info["explained_variance_curve"] = np.cumsum(eigvals) / eigvals.sum()
    info["explained_variance"] = float(info["explained_variance_curve"][d_new - 1])
  else:
    channels = keep_top(HIDDEN_SCORERS[scorer](stats, params, rng), d_new)
    q = rotate.selection(channels, d)
    info["channels_kept"] = channels
  if "second_moment" in stats:
    m = np.asarray(stats["second_moment"], np.float64)
    info["energy_kept"] = float(np.trace(q.T.astype(np.float64) @ m @ q) / np.trace(m))
  return q, info
