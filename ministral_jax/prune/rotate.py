"""Hidden-dimension pruning, part 1: fold the RMSNorm gains, then rotate (and slice) the residual stream.

RMSNorm is `x / rms(x) * g`. A rotation Q of the residual stream commutes
with `x / rms(x)` (orthogonal maps keep norms) but not with the per-channel
gain g, so the gains are first folded into the weights that read the normed
stream (SliceGPT's construction):

    wq, wk, wv  <- diag(g_attention_norm) W      w1, w3 <- diag(g_ffn_norm) W
    output      <- diag(g_final_norm) output

Then, with Q `[d, d']` (orthonormal columns, one for the whole network),
every weight that reads the residual stream is multiplied by Q^T on its input
side and every weight that writes it by Q on its output side:

    tok_embeddings <- E Q        wo, w2 <- W Q        wq, wk, wv, w1, w3, output <- Q^T W

With d' = d the result computes exactly the parent's logits. With d' < d
the child's RMSNorm averages over d' channels, so its gains become
sqrt(d / d') (the rms of the kept part is measured over fewer channels);
the child keeps the standard eps, so this is exact up to eps / mean(x^2),
about 1e-5 for a trained model's residual stream.
A tied parent becomes an untied child: its head carries the folded final
gain, which its embedding must not.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from ministral_jax.model.config import ModelConfig


def fold_norm_gains(params: Any, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """The same function with every RMSNorm gain equal to 1 (the gains moved into the readers)."""
  layers = params["layers"]
  g_attn = layers["attention_norm"]["scale"]  # [layers, d]
  g_ffn = layers["ffn_norm"]["scale"]
  head = params["tok_embeddings"].T if cfg.tie_embeddings else params["output"]
  attention = dict(layers["attention"])
  for name in ("wq", "wk", "wv"):
    attention[name] = g_attn[:, :, None, None] * attention[name]
  ffn = dict(layers["feed_forward"])
  for name in ("w1", "w3"):
    ffn[name] = g_ffn[:, :, None] * ffn[name]
  new_layers = {"attention": attention, "feed_forward": ffn,
                "attention_norm": {"scale": jnp.ones_like(g_attn)}, "ffn_norm": {"scale": jnp.ones_like(g_ffn)}}
  out = {"tok_embeddings": params["tok_embeddings"], "layers": new_layers,
         "norm": {"scale": jnp.ones_like(params["norm"]["scale"])},
         "output": params["norm"]["scale"][:, None] * head}
  return out, cfg.replace(tie_embeddings=False)


def rotate_residual(params: Any, cfg: ModelConfig, q: np.ndarray) -> tuple[dict, ModelConfig]:
  """Applies Q `[d, d']` to a gain-folded model (see `fold_norm_gains`); returns the child."""
  d, d_new = q.shape
  if d != cfg.d_model or d_new > d:
    raise ValueError(f"Rotation of shape {q.shape} does not fit d_model={cfg.d_model} (need [d, d'] with d' <= d).")
  q = jnp.asarray(q, params["tok_embeddings"].dtype)
  layers, attention, ffn = params["layers"], params["layers"]["attention"], params["layers"]["feed_forward"]
  gain = float(np.sqrt(d / d_new))
  n_layers = cfg.n_layers
  new = {
      "tok_embeddings": params["tok_embeddings"] @ q,  # [vocab, d']
      "layers": {
          "attention": {
              **{k: jnp.einsum("dk,ldnh->lknh", q, attention[k]) for k in ("wq", "wk", "wv")},
              "wo": jnp.einsum("lnhd,dk->lnhk", attention["wo"], q),
          },
          "feed_forward": {
              **{k: jnp.einsum("dk,ldf->lkf", q, ffn[k]) for k in ("w1", "w3")},
              "w2": jnp.einsum("lfd,dk->lfk", ffn["w2"], q),
          },
          "attention_norm": {"scale": jnp.full((n_layers, d_new), gain, layers["attention_norm"]["scale"].dtype)},
          "ffn_norm": {"scale": jnp.full((n_layers, d_new), gain, layers["ffn_norm"]["scale"].dtype)},
      },
      "norm": {"scale": jnp.full((d_new,), gain, params["norm"]["scale"].dtype)},
      "output": q.T @ params["output"],  # [d', vocab]
  }
  return new, cfg.replace(d_model=d_new)


def pca_rotation(second_moment: np.ndarray, d_new: int) -> tuple[np.ndarray, float]:
  """Top-d' eigenvectors of the residual stream's second moment `[d, d]` (float64), and the
  fraction of its energy they keep."""
  eigvals, eigvecs = np.linalg.eigh(np.asarray(second_moment, np.float64))
  order = np.argsort(eigvals)[::-1]
  kept = eigvals[order[:d_new]].sum() / eigvals.sum()
  return eigvecs[:, order[:d_new]], float(kept)
