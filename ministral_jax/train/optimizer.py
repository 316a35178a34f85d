"""AdamW with warmup + cosine or warmup-stable-decay, and global-norm clipping.

The `optimizer` block of an experiment config:
  lr, schedule ("cosine" | "wsd" | "constant"), warmup_steps, min_lr_ratio
  (cosine floor and WSD end point, as a fraction of lr), wsd_decay_fraction
  (the last fraction of training that decays linearly), b1, b2, eps,
  weight_decay (not applied to norm gains), clip_norm (0 = off).
Gradient accumulation is not here: the train step scans over microbatches,
which keeps one optimizer update per step and costs no optimizer memory.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import optax

from ministral_jax.errors import UserError


def optimizer_config(lr: float = 3e-4, schedule: str = "cosine") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=lr, schedule=schedule, warmup_steps=100, min_lr_ratio=0.1, wsd_decay_fraction=0.2,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
  warmup = min(cfg.warmup_steps, total_steps)
  if cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                [warmup])
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), floor)
  if cfg.schedule == "wsd":
    decay = max(1, int(round(cfg.wsd_decay_fraction * total_steps)))
    stable = max(0, total_steps - warmup - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
         optax.linear_schedule(peak, floor, decay)],
        [warmup, warmup + stable])
  raise UserError(f"Unknown optimizer.schedule '{cfg.schedule}'; use 'cosine', 'wsd' or 'constant'.")


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: RMSNorm gains (1-D per layer) are left alone."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, "key", None) == "scale" for k in path), params)


def frozen_params(model_cfg: Any) -> tuple[str, ...]:
  """Top-level params no job updates: the ViT, shared by every size and frozen as in the paper
  (model.train_vision_encoder=True trains it too)."""
  return ("vision_encoder",) if model_cfg.vision_layers and not model_cfg.train_vision_encoder else ()


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, frozen: Sequence[str] = ()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (+ global-norm clipping); the top-level params named in `frozen` get no update and no state."""
  schedule = learning_rate_schedule(cfg, total_steps)
  chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=_decay_mask))
  tx = optax.chain(*chain)
  if frozen:
    labels = lambda params: {k: "frozen" if k in frozen else "trained" for k in params}  # noqa: E731
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
