"""Trainer `distill`: logit distillation from a frozen teacher, forward KL(teacher || student).

The teacher is any checkpoint (orbax, HF or Mistral-native) with its own
model config, restored onto the same mesh and passed to every step as an
argument. The KL runs over the full vocabulary in chunks (`losses.kd_loss`),
masked exactly like the next-token loss. `distill.ce_weight` mixes in the
next-token loss (the paper found KL alone better, so it defaults to 0).
`distill.temperature` divides both models' logits; see `losses.kd_loss` for
the T^2 convention.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from etils import epath

from ministral_jax.checkpoint import convert
from ministral_jax.errors import UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ModelConfig, flops_per_token
from ministral_jax.train import checkpointing, loop, losses, pretrain
from ministral_jax.train.pretrain import hidden_and_head, token_mask


# What "teacher_context=student" hands the teacher: the student's context extension, not its RoPE base.
CONTEXT_FIELDS = ("rope_scaling", "yarn_factor", "yarn_original_max_len", "yarn_beta_fast", "yarn_beta_slow",
                  "yarn_mscale", "yarn_mscale_all_dim", "query_temperature_beta", "query_temperature_len",
                  "max_seq_len")


def distill_config(teacher: str = "") -> ml_collections.ConfigDict:
  """teacher_context: "own" (the teacher's config as saved) or "student" (the student's YaRN and
  query temperature, e.g. a long-context stage whose teacher was trained at the short context)."""
  return ml_collections.ConfigDict(dict(teacher=teacher, teacher_dtype="", teacher_context="own",
                                        temperature=1.0, ce_weight=0.0))


def load_teacher(cfg: ml_collections.ConfigDict, student_cfg: ModelConfig, partitioner, block: str = "distill"):
  """The frozen teacher named by `cfg.<block>` (teacher, teacher_dtype, teacher_context), on the mesh."""
  b = cfg[block]
  path = b.teacher
  if not path or not epath.Path(path).exists():
    raise UserError(f"{block}.teacher={path!r} does not exist. Point it at an orbax, HF or Mistral-native "
                    "checkpoint directory (e.g. the parent's <workdir>/params).")
  teacher_cfg = convert.load_config_any(path)
  if b.teacher_dtype:
    teacher_cfg = teacher_cfg.replace(dtype=b.teacher_dtype)
  if teacher_cfg.vocab_size != student_cfg.vocab_size:
    raise UserError(f"The teacher's vocabulary ({teacher_cfg.vocab_size}) differs from the student's "
                    f"({student_cfg.vocab_size}); logit distillation needs the same tokenizer.")
  context = b.get("teacher_context", "own")
  if context not in ("own", "student"):
    raise UserError(f"{block}.teacher_context={context!r} must be 'own' or 'student'.")
  if context == "student":
    teacher_cfg = teacher_cfg.replace(**{k: getattr(student_cfg, k) for k in CONTEXT_FIELDS})
  return convert.load_or_init(path, teacher_cfg, partitioner, seed=0, allow_rope_change=True)


def make_loss(model_cfg: ModelConfig, teacher_cfg: ModelConfig, loss_cfg: ml_collections.ConfigDict,
              temperature: float = 1.0, ce_weight: float = 0.0, module=None) -> loop.LossFn:
  """The distillation loss: (params, batch, teacher params, rng) -> (loss_sum, tokens, aux)."""
  chunks = dict(seq_chunk=loss_cfg.seq_chunk, vocab_chunk=loss_cfg.vocab_chunk)

  def loss_fn(params, batch, teacher, rng):
    del rng
    mask = token_mask(batch)
    hidden, head = hidden_and_head(model_cfg, params, batch, module)
    t_hidden, t_head = jax.lax.stop_gradient(hidden_and_head(teacher_cfg, teacher, batch))
    if not ce_weight:
      kl_sum, count = losses.kd_loss(hidden, head, t_hidden, t_head, mask, temperature=temperature, **chunks)
      return kl_sum, count, {}
    # One pass over the logits for both terms: alpha * KL + (1 - alpha) * CE.
    return losses.kd_with_ce(hidden, head, t_hidden, t_head, batch["targets"], mask, alpha=1 - ce_weight,
                             temperature=temperature, **chunks)
  return loss_fn


def make_task(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, partitioner) -> loop.Task:
  teacher_params, teacher_cfg = load_teacher(cfg, model_cfg, partitioner)
  loss_fn = make_loss(model_cfg, teacher_cfg, cfg.loss, cfg.distill.temperature, cfg.distill.ce_weight)
  return loop.Task("distill", loss_fn, frozen=teacher_params,
                   frozen_shardings=partitioner.param_shardings(teacher_cfg),
                   eval_loss_fn=pretrain.make_loss(model_cfg, cfg.loss),
                   extra_flops_per_token=flops_per_token(teacher_cfg, cfg.data.seq_len, backward=False))


def compile_abstract(cfg: ml_collections.ConfigDict, teacher_cfg: ModelConfig, partitioner) -> Any:
  """This job's train step compiled from shapes alone, with a teacher of `teacher_cfg` (after
  `teacher_dtype` and `teacher_context`, as `load_teacher` would make it): the real-size check of
  a cascade stage, with no checkpoint read. Returns the compiled program."""
  model_cfg = ModelConfig.from_dict(cfg.model)
  if cfg.distill.teacher_dtype:
    teacher_cfg = teacher_cfg.replace(dtype=cfg.distill.teacher_dtype)
  if cfg.distill.get("teacher_context", "own") == "student":
    teacher_cfg = teacher_cfg.replace(**{k: getattr(model_cfg, k) for k in CONTEXT_FIELDS})
  shardings = partitioner.param_shardings(teacher_cfg)
  teacher = checkpointing.abstract_with_shardings(transformer.abstract_params(teacher_cfg), shardings)
  task = loop.Task("distill", make_loss(model_cfg, teacher_cfg, cfg.loss, cfg.distill.temperature,
                                        cfg.distill.ce_weight), frozen=teacher, frozen_shardings=shardings)
  return loop.compile_step(cfg, task, model_cfg, partitioner, ["inputs", "targets", "positions", "segment_ids"])


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  return loop.run(cfg, workdir, make_task, sources=lambda c: {"distill.teacher": c.distill.teacher})
