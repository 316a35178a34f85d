"""Hidden-dimension pruning: fold the RMSNorm gains, then rotate (and slice) the residual stream.

RMSNorm is `x / rms(x) * g`. A rotation Q of the residual stream commutes
with `x / rms(x)` (orthogonal maps keep norms) but not with the per-channel
gain g, so the gains are first folded into the weights that read the normed
stream (SliceGPT's construction):

    wq, wk, wv  <- diag(g_attention_norm) W      w1, w3 <- diag(g_ffn_norm) W
    output      <- diag(g_final_norm) output

Then (`rotate_residual` folds and rotates in one pass), with Q `[d, d']` (orthonormal columns, one for the whole network, so no
extra matrices sit on the skip connections), every weight that reads the
residual stream is multiplied by Q^T on its input side and every weight that
writes it by Q on its output side:

    tok_embeddings <- E Q        wo, w2 <- W Q        wq, wk, wv, w1, w3, output <- Q^T W

A multimodal model's projector writes the stream too (`rotate_projector`).

With d' = d the result computes exactly the parent's logits. With d' < d
the child's RMSNorm averages over d' channels, so its gains become
sqrt(d / d') (the rms of the kept part is measured over fewer channels);
the child keeps the standard eps, so this is exact up to eps / mean(x^2),
about 1e-5 for a trained model's residual stream.
A tied parent becomes untied here: its head carries the folded final gain,
which its embedding must not (`rewrite.tie_embeddings` ties it again).
Functions read the layout from the params (an `output` entry means untied),
so they trace under `jit` and `eval_shape` with abstract arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


def fold_norm_gains(params: Any) -> dict:
  """The same function with every RMSNorm gain equal to 1 (the gains moved into the readers); untied."""
  head = params["output"] if "output" in params else params["tok_embeddings"].T
  g = params["norm"]["scale"]
  return {**params, "layers": jax.vmap(fold_block)(params["layers"]),
          "norm": {"scale": jnp.ones_like(g)}, "output": (g[:, None] * head).astype(head.dtype)}


def fold_block(block: Any) -> dict:
  """One layer's gains into q/k/v (attention_norm) and W1/W3 (ffn_norm)."""
  g_attn, g_ffn = block["attention_norm"]["scale"], block["ffn_norm"]["scale"]  # [d]
  scale = lambda w, g: (g.reshape(g.shape + (1,) * (w.ndim - 1)) * w).astype(w.dtype)
  attention, ffn = block["attention"], block["feed_forward"]
  return {"attention": {**attention, **{k: scale(attention[k], g_attn) for k in ("wq", "wk", "wv")}},
          "feed_forward": {**ffn, **{k: scale(ffn[k], g_ffn) for k in ("w1", "w3")}},
          "attention_norm": {"scale": jnp.ones_like(g_attn)}, "ffn_norm": {"scale": jnp.ones_like(g_ffn)}}


def rotate_block(block: Any, q: jax.Array) -> dict:
  """One gain-folded layer: readers get Q^T on their input side, writers Q on their output side."""
  d, d_new = q.shape
  attention, ffn = block["attention"], block["feed_forward"]
  gain = lambda old: jnp.full((d_new,), np.sqrt(d / d_new), old.dtype)
  return {
      "attention": {**{k: _rot("dk,dnh->knh", q, attention[k], attention[k]) for k in ("wq", "wk", "wv")},
                    "wo": _rot("nhd,dk->nhk", attention["wo"], q, attention["wo"])},
      "feed_forward": {**{k: _rot("dk,df->kf", q, ffn[k], ffn[k]) for k in ("w1", "w3")},
                       "w2": _rot("fd,dk->fk", ffn["w2"], q, ffn["w2"])},
      "attention_norm": {"scale": gain(block["attention_norm"]["scale"])},
      "ffn_norm": {"scale": gain(block["ffn_norm"]["scale"])},
  }


def rotate_ends(params: Any, q: jax.Array) -> dict:
  """The embedding, the final norm (its gain folded into the head) and the head; untied."""
  d, d_new = check_rotation(params, q)
  emb = params["tok_embeddings"]
  head = params["output"] if "output" in params else emb.T
  folded_head = params["norm"]["scale"][:, None].astype(jnp.float32) * head.astype(jnp.float32)
  return {**params, "tok_embeddings": _rot("vd,dk->vk", emb, q, emb),  # [vocab, d']
          "norm": {"scale": jnp.full((d_new,), np.sqrt(d / d_new), params["norm"]["scale"].dtype)},
          "output": _rot("dk,dv->kv", q, folded_head, head)}  # [d', vocab]


def rotate_residual(params: Any, q: jax.Array) -> dict:
  """The whole model folded and rotated by Q `[d, d']` (one layer at a time); the untied child."""
  check_rotation(params, q)
  layers = jax.lax.map(lambda block: rotate_block(fold_block(block), q), params["layers"])
  out = rotate_ends({**params, "layers": layers}, q)
  if "projector" in params:
    out["projector"] = rotate_projector(params["projector"], q)
  return out


def rotate_projector(projector: Any, q: jax.Array) -> dict:
  """The multimodal projector of a child of width d': its output writes the residual stream at the `[IMG]`
  positions (as the embedding does elsewhere), so `w_out <- W Q`; its inner GELU width is the text width in
  every Mistral 3 checkpoint, so it shrinks to d' too, keeping the channels j with the largest
  ||w_in[:, j]|| * ||(w_out Q)[j]|| (no calibration images needed; exact at d' = d, where all are kept in
  order). The ViT, the norm and the patch merger sit before it and are shared unchanged."""
  d, d_new = q.shape
  w_out = _rot("jd,dk->jk", projector["w_out"], q, projector["w_out"])  # [d (inner), d']
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  weight = jnp.linalg.norm(f32(projector["w_in"]), axis=0) * jnp.linalg.norm(f32(w_out), axis=1)
  keep = jnp.sort(jax.lax.top_k(weight, d_new)[1])
  out = {**projector, "w_in": jnp.take(projector["w_in"], keep, axis=1), "w_out": jnp.take(w_out, keep, axis=0)}
  if "b_in" in projector:
    out["b_in"] = jnp.take(projector["b_in"], keep)
    out["b_out"] = _rot("d,dk->k", projector["b_out"], q, projector["b_out"])
  return out


def check_rotation(params: Any, q: jax.Array) -> tuple[int, int]:
  d, d_new = q.shape
  d_model = params["tok_embeddings"].shape[1]
  if d != d_model or d_new > d:
    raise ValueError(f"Rotation of shape {tuple(q.shape)} does not fit d_model={d_model} (need [d, d'] with "
                     "d' <= d).")
  return d, d_new


def _rot(spec: str, a: jax.Array, b: jax.Array, like: jax.Array) -> jax.Array:
  """An fp32 einsum at full precision, returned in the dtype of the weight it replaces."""
  return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32), precision=_HI).astype(like.dtype)


def pca_rotation(second_moment: np.ndarray, d_new: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-d' eigenvectors `[d, d']` of the residual stream's second moment `[d, d]`, and every
  eigenvalue in decreasing order (float64 on the host, as SliceGPT does).

  `np.cumsum(eigvals) / eigvals.sum()` is the explained-variance curve; its
  entry d' - 1 is the fraction of the stream's energy the child keeps.
  """
  eigvals, eigvecs = np.linalg.eigh(np.asarray(second_moment, np.float64))
  order = np.argsort(eigvals)[::-1]
  q = eigvecs[:, order[:d_new]]
  # An eigenvector's sign is arbitrary; fix it (largest entry positive) so that the same statistics
  # summed in another order (another mesh) give the same child, not a sign-flipped equivalent.
  q = q * np.where(q[np.abs(q).argmax(0), np.arange(d_new)] < 0, -1.0, 1.0)
  return q.astype(np.float32), eigvals[order]


def selection(channels: np.ndarray, d: int) -> np.ndarray:
  """The `[d, d']` matrix that keeps `channels` (ascending) of the residual stream: slicing is the
  rotation Q = I[:, channels], so channel scorers share the rotation's code path."""
  q = np.zeros((d, len(channels)), np.float32)
  q[np.asarray(channels), np.arange(len(channels))] = 1.0
  return q
