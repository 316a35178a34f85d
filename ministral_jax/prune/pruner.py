"""The pruning pass on params in memory: check the target, calibrate, score, rewrite (paper, Algorithm 2).

    parent --calibrate--> statistics --scorers--> Plan --rewrite--> child

Amounts come from the target model config (n_layers, d_model, d_ffn; heads
and vocabulary stay), the steps and their order from `prune.order`, the
scorers from `prune.{layer,hidden,ffn}_scorer`.

`prune.recalibrate` decides where the later steps' statistics come from:
  False (one-shot): one calibration pass over the parent measures everything;
    every decision is made on the parent, and one jitted rewrite turns the
    parent into the child. The order does not matter.
  True: before each later step, a new pass measures the model the earlier
    steps left (e.g. the PCA sees only the kept layers' residual stream, the
    FFN scores see the rotated, narrower model).
The default is one-shot, by measurement: on the 5M-parameter `cpu_small`
parent pruned to 5/192/512 (3 calibration seeds), re-measuring moved the
child's eval loss before distillation by -0.004 nats with the raw PCA and
+0.0005 with the normalized one, against +0.06 for pruning itself, and it
makes the pass 2.6x a plain forward instead of 1.3x (`benchmarks/prune_pass.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np

from ministral_jax import sharding
from ministral_jax.errors import UserError
from ministral_jax.model import config as model_config
from ministral_jax.model.config import ModelConfig
from ministral_jax.prune import calibration, rewrite, scorers

STEPS = ("layers", "hidden", "ffn")
STEP_FIELD = {"layers": "n_layers", "hidden": "d_model", "ffn": "d_ffn"}  # the size each step shrinks
SCORER_FIELD = {"layers": "layer_scorer", "hidden": "hidden_scorer", "ffn": "ffn_scorer"}


def prune_config(parent: str = "") -> ml_collections.ConfigDict:
  """The `prune` block of an experiment config (the target is the experiment's `model` block)."""
  return ml_collections.ConfigDict(dict(
      parent=parent,  # orbax params, HF or Mistral-native directory; never modified
      order="layers,hidden,ffn",  # the steps that run, in this order; leave one out to skip it
      layer_scorer="norm_ratio", hidden_scorer="pca", ffn_scorer="activation",
      recalibrate=False,  # re-measure the statistics on the already-pruned model before each later step
      tie_init="head",  # a tied child of an untied parent: see rewrite.py
      calibration_batches=16, calibration_batch_size=8,
      calibration_dtype="float32",  # compute dtype of the calibration forward (sums are float32)
      seed=0,  # the calibration sample and the random scorers
  ))


def steps_of(pcfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(s.strip() for s in pcfg.order.split(",") if s.strip())


def shrinking_steps(pcfg: ml_collections.ConfigDict, parent: ModelConfig, target: ModelConfig
                    ) -> ml_collections.ConfigDict:
  """`pcfg` with only the steps whose size shrinks from `parent` to `target`, in the configured order
  (e.g. 24B -> 14B prunes the FFN only, instead of a no-op layer step and a full-width rotation)."""
  out = copy.deepcopy(pcfg)
  out.order = ",".join(s for s in steps_of(pcfg)
                       if s in STEP_FIELD and getattr(target, STEP_FIELD[s]) < getattr(parent, STEP_FIELD[s]))
  return out


def check(parent: ModelConfig, target: ModelConfig, pcfg: ml_collections.ConfigDict) -> None:
  """Everything wrong with a (parent, target, prune config) triple, in one error, before any work."""
  problems = []
  steps = steps_of(pcfg)
  for s in steps:
    if s not in STEPS:
      problems.append(f"prune.order names an unknown step {s!r}; steps are {STEPS}")
  if len(set(steps)) != len(steps):
    problems.append(f"prune.order={pcfg.order!r} names a step twice")
  for step, field in SCORER_FIELD.items():
    if pcfg[field] not in scorers.SCORERS[step]:
      problems.append(f"prune.{field}={pcfg[field]!r} is not one of {sorted(scorers.SCORERS[step])}")
  if pcfg.tie_init not in rewrite.TIE_INITS:
    problems.append(f"prune.tie_init={pcfg.tie_init!r} is not one of {rewrite.TIE_INITS}")
  if pcfg.calibration_batches < 1 or pcfg.calibration_batch_size < 1:
    problems.append("prune.calibration_batches and prune.calibration_batch_size must be positive")
  if target.vocab_size != parent.vocab_size:
    problems.append(f"vocabulary: the target has vocab_size={target.vocab_size}, the parent "
                    f"{parent.vocab_size}; pruning keeps the vocabulary (set model.vocab_size={parent.vocab_size})")
  heads = ("n_heads", "n_kv_heads", "head_dim")
  if any(getattr(target, f) != getattr(parent, f) for f in heads):
    problems.append("head layout: the target has " + ", ".join(f"{f}={getattr(target, f)}" for f in heads)
                    + ", the parent " + ", ".join(f"{f}={getattr(parent, f)}" for f in heads)
                    + "; heads are never pruned (paper: 32/8 x 128 at every size), so set them to the parent's")
  vision = [f"{f}={getattr(target, f)!r} (parent {getattr(parent, f)!r})" for f in model_config.VISION_FIELDS
            if getattr(target, f) != getattr(parent, f)]
  if vision:
    problems.append("vision tower: the target has " + ", ".join(vision) + "; every child shares its parent's "
                    "ViT (only the projector follows the new width), so set these fields to the parent's")
  for step, field in STEP_FIELD.items():
    want, have = getattr(target, field), getattr(parent, field)
    if want > have:
      problems.append(f"{field}: the target ({want}) is larger than the parent ({have}); pruning only shrinks")
    elif want < have and step not in steps:
      problems.append(f"{field}: the target ({want}) is smaller than the parent ({have}) but step "
                      f"{step!r} is not in prune.order={pcfg.order!r}")
  if problems:
    raise UserError("Cannot prune to this target:\n  " + "\n  ".join(problems))


@dataclasses.dataclass
class Result:
  params: Any  # the child, sharded by the rules, in the target's param dtype
  cfg: ModelConfig  # the target config
  report: dict  # JSON-serialisable: the decisions and their scores
  arrays: dict[str, np.ndarray]  # the full scores and curves (for plots), by name


# A step's decision: (scorer name, statistics, params, target, rng, parent ids of the layers in params)
#   -> (a single-field Plan, the step's report entry, arrays for prune_scores.npz)
Decision = tuple[rewrite.Plan, dict[str, Any], dict[str, np.ndarray]]


def _decide_layers(name, stats, params, target, rng, layer_ids) -> Decision:
  score = np.asarray(scorers.LAYER_SCORERS[name](stats, params, rng), np.float64)
  keep = scorers.keep_top(score, target.n_layers)
  mean = score / float(stats["tokens"]) if name in ("norm_ratio", "block_influence") else score
  entry = {"scores": mean.tolist(), "kept": layer_ids[keep].tolist(),
           "removed": sorted(set(layer_ids.tolist()) - set(layer_ids[keep].tolist()))}
  return rewrite.Plan(layers=keep), entry, {"layers/scores": score}


def _decide_hidden(name, stats, params, target, rng, layer_ids) -> Decision:
  q, info = scorers.hidden_rotation(name, stats, params, target.d_model, rng)
  entry = {"d_model": list(q.shape), "explained_variance": info.get("explained_variance"),
           "energy_kept": info.get("energy_kept")}
  if "channels_kept" in info:
    entry["channels_kept"] = info["channels_kept"].tolist()
  arrays = ({"hidden/explained_variance_curve": info["explained_variance_curve"]}
            if "explained_variance_curve" in info else {})
  return rewrite.Plan(rotation=q), entry, arrays


def _decide_ffn(name, stats, params, target, rng, layer_ids) -> Decision:
  score = np.asarray(scorers.FFN_SCORERS[name](stats, params, rng), np.float64)  # [layers, d_ffn]
  keep = scorers.keep_top(score, target.d_ffn)
  kept_mass = np.take_along_axis(score, keep, axis=1).sum(1) / np.maximum(score.sum(1), 1e-30)
  entry = {"d_ffn": [int(score.shape[1]), int(target.d_ffn)], "layers": layer_ids.tolist(),
           "channels_kept": keep.tolist(), "score_fraction_kept": kept_mass.tolist()}
  return rewrite.Plan(ffn=keep), entry, {"ffn/scores": score}


_DECIDE = {"layers": _decide_layers, "hidden": _decide_hidden, "ffn": _decide_ffn}


@functools.lru_cache(maxsize=16)
def _rewriter(partitioner: sharding.Partitioner, out_cfg: ModelConfig, tie: bool | None, tie_init: str,
              dtype: str | None) -> Callable:
  """The jitted rewrite, its output sharded by the rules for `out_cfg` (cached per shape)."""
  def fn(params, plan):
    child = rewrite.apply_plan(params, plan, tie=tie, tie_init=tie_init)
    return child if dtype is None else jax.tree.map(lambda x: x.astype(dtype), child)
  return jax.jit(fn, out_shardings=partitioner.param_shardings(out_cfg))


def _apply(params, cfg: ModelConfig, plan: rewrite.Plan, partitioner, tie=None, tie_init="head", dtype=None):
  out_cfg = rewrite.config_after(cfg, plan, tie)
  if dtype is not None:
    out_cfg = out_cfg.replace(param_dtype=dtype)
  return _rewriter(partitioner, out_cfg, tie, tie_init, dtype)(params, plan), out_cfg


def prune(params: Any, parent: ModelConfig, target: ModelConfig, pcfg: ml_collections.ConfigDict,
          batches: Callable[[], Iterable[dict]], partitioner: sharding.Partitioner,
          parent_stats: scorers.Stats | None = None) -> Result:
  """Prunes `params` (a `parent`, sharded by `partitioner`) to `target`. The input is not modified.

  `batches()` yields the calibration batches, the same ones at every call.
  `parent_stats` (every statistic the scorers need) skips the parent's pass.
  """
  check(parent, target, pcfg)
  steps = steps_of(pcfg)
  rng = np.random.default_rng(pcfg.seed)
  calib = lambda p, cfg, wanted: calibration.calibrate(
      p, cfg.replace(dtype=pcfg.calibration_dtype), batches(), partitioner, wanted)
  needs = {s: scorers.needs(s, pcfg[SCORER_FIELD[s]]) for s in steps}
  first = needs[steps[0]] if (pcfg.recalibrate and steps) else sorted({n for s in steps for n in needs[s]})
  stats = parent_stats if parent_stats is not None else (calib(params, parent, first) if first else {})
  report: dict[str, Any] = {"order": list(steps), "recalibrate": bool(pcfg.recalibrate),
                            "calibration_tokens": int(stats.get("tokens", 0))}
  arrays: dict[str, np.ndarray] = {}

  def decide(step, stats, params, layer_ids) -> rewrite.Plan:
    name = pcfg[SCORER_FIELD[step]]
    plan, entry, step_arrays = _DECIDE[step](name, stats, params, target, rng, layer_ids)
    report[step] = {"scorer": name, **entry}
    arrays.update(step_arrays)
    return plan

  if pcfg.recalibrate:  # step by step, each on the model the steps before it left
    cur, cur_cfg, layer_ids = params, parent, np.arange(parent.n_layers)
    for i, step in enumerate(steps):
      if i > 0 and needs[step]:
        stats = calib(cur, cur_cfg, needs[step])
      plan = decide(step, stats, cur, layer_ids)
      cur, cur_cfg = _apply(cur, cur_cfg, plan, partitioner)
      if plan.layers is not None:
        layer_ids = layer_ids[plan.layers]
    plan, params, parent = rewrite.Plan(), cur, cur_cfg
  else:  # every decision on the parent, one rewrite
    plans = {s: decide(s, stats, params, np.arange(parent.n_layers)) for s in steps}
    field = lambda step, name: getattr(plans[step], name) if step in plans else None
    layers, ffn = field("layers", "layers"), field("ffn", "ffn")
    if ffn is not None and layers is not None:
      ffn = ffn[layers]  # the FFN decisions of the layers that stay
    plan = rewrite.Plan(layers=layers, rotation=field("hidden", "rotation"), ffn=ffn)
  child, _ = _apply(params, parent, plan, partitioner, target.tie_embeddings, pcfg.tie_init, target.param_dtype)
  return Result(child, target, report, arrays)
