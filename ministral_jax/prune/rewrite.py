"""The checkpoint rewrite: a pure function from (parent params, plan) to child params.

A `Plan` holds the decisions the scorers made, as arrays:

    layers    [n_layers']           parent layer ids kept, ascending
    rotation  [d, d']               one global basis for the residual stream (PCA, or a channel selection)
    ffn       [n_layers', d_ffn']   FFN channels kept in each kept layer, ascending

Any field may be None (that step is skipped). The three steps commute, so
`apply_plan` makes each child block from its parent block in one go, whatever
order the scorers ran in. Everything here is `jax.numpy` on the param tree,
so the rewrite runs jitted on the mesh (the child comes out sharded by the
rules) and under `jax.eval_shape` with no weights at all.

Tied embeddings. The child's tie comes from the target config. A tied parent
that is rotated comes out untied (the folded final gain belongs to the head
only), and an untied parent may give a tied child (Ministral 3 8B -> 3B), so
one matrix W `[vocab, d]` and a final-norm gain gamma must stand in for an
embedding E and an effective head A = diag(g_final) H `[d, vocab]`. Logits of
the tied child are norm(h) diag(gamma) W^T, so we want W ~ E (input side) and
W diag(gamma) ~ A^T (output side). `tie_init` picks the compromise:

    "head":      gamma_c = s_c ||A^T_c|| / ||E_c||, W = A^T diag(1 / gamma), with s_c the sign of
                 <E_c, A^T_c>: the logits are exactly the untied child's; W keeps the embedding's
                 column norms and signs, so the token vectors the blocks see keep their scale.
    "embedding": W = E, gamma_c = <E_c, A^T_c> / ||E_c||^2 (least squares per channel): the input
                 side is exact, the output side is the best diagonal fit.
    "mean":      gamma as for "head", W = (E + A^T diag(1 / gamma)) / 2.

All three are exact when the parent was already tied with a uniform final
gain (A = c E^T). None is good when E and A are unrelated, as in a trained
untied parent. Measured on the 5M-parameter `cpu_small` parent pruned to
5/192/512 (README, Pruning): eval loss before distillation 6.61 ("head"),
6.86 ("embedding"), 9.74 ("mean"), against 4.06 for the untied child; after
200 distillation steps 4.32 ("head") and 5.01 ("embedding"), against 4.13
untied. Hence the default, "head".
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from ministral_jax.errors import UserError
from ministral_jax.model.config import ModelConfig
from ministral_jax.prune import rotate

TIE_INITS = ("head", "embedding", "mean")


@struct.dataclass
class Plan:
  layers: jax.Array | None = None
  rotation: jax.Array | None = None
  ffn: jax.Array | None = None


def untie_embeddings(params: Any) -> dict:
  """A tied model as an untied one computing the same function (head = E^T)."""
  return {**params, "output": params["tok_embeddings"].T}


def tie_embeddings(params: Any, tie_init: str) -> dict:
  """An untied model as a tied one (see the module docstring for `tie_init`)."""
  if tie_init not in TIE_INITS:
    raise UserError(f"prune.tie_init={tie_init!r} is not one of {TIE_INITS}.")
  f32 = jnp.float32
  emb = params["tok_embeddings"].astype(f32)  # E [vocab, d]
  head_t = (params["norm"]["scale"][:, None].astype(f32) * params["output"].astype(f32)).T  # A^T [vocab, d]
  emb_norm2 = jnp.maximum(jnp.sum(emb * emb, axis=0), 1e-30)
  dot = jnp.sum(emb * head_t, axis=0)
  if tie_init == "embedding":
    gamma, tied = dot / emb_norm2, emb
  else:
    sign = jnp.where(dot < 0, -1.0, 1.0)
    gamma = sign * jnp.sqrt(jnp.sum(head_t * head_t, axis=0) / emb_norm2)
    from_head = head_t / jnp.where(gamma == 0, 1.0, gamma)
    tied = from_head if tie_init == "head" else (emb + from_head) / 2
  out = {k: v for k, v in params.items() if k != "output"}
  out["tok_embeddings"] = tied.astype(params["tok_embeddings"].dtype)
  out["norm"] = {"scale": gamma.astype(params["norm"]["scale"].dtype)}
  return out


def apply_plan(params: Any, plan: Plan, tie: bool | None = None, tie_init: str = "head") -> dict:
  """The child's params. `tie`: the child's tie_embeddings (None keeps what the steps leave).

  Every block of the child is made in one `lax.map` over the kept layers:
  pick the parent's block, slice its FFN channels, fold its gains and rotate
  it. Only the child is materialised (no stacked intermediate model), and a
  gather or a contraction along a sharded axis holds one layer's operands.
  """
  stack = params["layers"]
  ids = plan.layers if plan.layers is not None else jnp.arange(stack["ffn_norm"]["scale"].shape[0])

  def child_block(args):
    i, keep = args
    block = jax.tree.map(lambda x: x[i], stack)
    if keep is not None:  # FFN channels: columns of W1/W3, rows of W2
      ffn = block["feed_forward"]
      block = {**block, "feed_forward": {"w1": jnp.take(ffn["w1"], keep, axis=1),
                                         "w3": jnp.take(ffn["w3"], keep, axis=1),
                                         "w2": jnp.take(ffn["w2"], keep, axis=0)}}
    if plan.rotation is not None:
      block = rotate.rotate_block(rotate.fold_block(block), plan.rotation)
    return block

  params = {**params, "layers": jax.lax.map(child_block, (ids, plan.ffn))}
  if plan.rotation is not None:
    params = rotate.rotate_ends(params, plan.rotation)
    if "projector" in params:  # a multimodal child: its own projector, the parent's ViT
      params["projector"] = rotate.rotate_projector(params["projector"], plan.rotation)
  if tie is True and "output" in params:
    params = tie_embeddings(params, tie_init)
  elif tie is False and "output" not in params:
    params = untie_embeddings(params)
  return params


def config_after(cfg: ModelConfig, plan: Plan, tie: bool | None = None) -> ModelConfig:
  """The shapes `apply_plan` gives `cfg`'s params (other fields unchanged)."""
  changes: dict[str, Any] = {}
  if plan.layers is not None:
    changes["n_layers"] = int(plan.layers.shape[0])
  if plan.rotation is not None:
    changes.update(d_model=int(plan.rotation.shape[1]), tie_embeddings=False)
  if plan.ffn is not None:
    changes["d_ffn"] = int(plan.ffn.shape[1])
  if tie is not None:
    changes["tie_embeddings"] = tie
  return cfg.replace(**changes)
