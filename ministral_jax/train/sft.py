"""Trainer `sft`: supervised fine-tuning on conversations, optionally distilled from a frozen teacher.

The batches are conversations rendered in Mistral's instruct format and
packed whole (`data/chat.py`); each carries a `loss_mask` that is 1 on the
assistant's tokens (its thinking, `[THINK]`/`[/THINK]`, the answer and the
closing EOS) and 0 on everything the model is given (BOS, system prompt,
user turns, `[INST]`/`[/INST]`). The loss is the next-token loss on those
tokens only (`pretrain.token_mask` reads the mask), so a user's words never
train the model.

What an SFT job reads can be made by the job itself (`prepare`), so a tiny
experiment runs from nothing: `tasks` writes the verifiable task suite's
problems as conversations (`rewards/tasks.py`: train and eval splits disjoint
by construction; `tasks.long_fraction` of them with the long chain of
thought, the rest short; `tasks.style="instruct"` for answers without
thinking) to `<workdir>/data/`, and without `init_from` the `parent` block
pretrains a tiny parent in `<workdir>/parent` whose SentencePiece becomes
the SFT tokenizer. Both are resumable and done once.

`sft.kd_weight` distils from a stronger teacher on the same tokens, as the
paper does during SFT: loss = kd_weight * KL(teacher || student) +
(1 - kd_weight) * CE, in one pass of the chunked losses (`losses.kd_with_ce`).
0 is plain SFT (no teacher is loaded), 1 is KL only. The periodic eval
reports next-token loss on the assistant tokens, so runs with and without a
teacher compare. `sft.fp8` runs the decoder's matmuls in fp8 through qwix
(`model/fp8.py`; fp32 master weights). Resume, SIGTERM, the non-finite
stop, metrics and checkpoints are the shared loop's.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import jax.numpy as jnp
import ml_collections
from etils import epath

from ministral_jax import files, multihost
from ministral_jax.checkpoint import convert
from ministral_jax.data import chat, pipeline, shapes
from ministral_jax.data import images as image_io
from ministral_jax.errors import UserError
from ministral_jax.eval import answers
from ministral_jax.model import transformer
from ministral_jax.model.config import ModelConfig, flops_per_token
from ministral_jax.rewards import tasks as task_suite
from ministral_jax.train import checkpointing, distill, loop, pretrain


def sft_config(teacher: str = "", kd_weight: float = 0.0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(teacher=teacher, teacher_dtype="", teacher_context="own",
                                        kd_weight=kd_weight, temperature=1.0, fp8=False))


def _module(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig):
  if not cfg.sft.fp8:
    return None
  from ministral_jax.model import fp8  # qwix is imported only when asked for
  return fp8.training_module(model_cfg, fp8=True)


def make_task(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, partitioner,
              teacher: tuple[Any, ModelConfig] | None = None) -> loop.Task:
  """The SFT task; `teacher` (params, config) replaces loading `sft.teacher` (e.g. shapes only, to compile)."""
  s = cfg.sft
  module = _module(cfg, model_cfg)
  next_token = pretrain.make_loss(model_cfg, cfg.loss, module)
  data = dict(train_data=_checked(chat.chat_iterator, model_cfg), eval_data=chat.chat_eval_batches,
              extra_eval=_answer_eval(cfg, model_cfg))
  if not s.kd_weight:
    return loop.Task("sft", next_token, **data)
  teacher_params, teacher_cfg = teacher or distill.load_teacher(cfg, model_cfg, partitioner, block="sft")
  loss_fn = distill.make_loss(model_cfg, teacher_cfg, cfg.loss, s.temperature, ce_weight=1.0 - s.kd_weight,
                              module=module)
  return loop.Task("sft", loss_fn, frozen=teacher_params, frozen_shardings=partitioner.param_shardings(teacher_cfg),
                   eval_loss_fn=pretrain.make_loss(model_cfg, cfg.loss),
                   extra_flops_per_token=flops_per_token(teacher_cfg, cfg.data.seq_len, backward=False), **data)


def compile_abstract(cfg: ml_collections.ConfigDict, teacher_cfg: ModelConfig | None, partitioner) -> Any:
  """This job's train step (student, frozen teacher, fp8 if asked) compiled from shapes alone: the
  real-size check, with no checkpoint read. Returns the compiled program."""
  model_cfg = ModelConfig.from_dict(cfg.model)
  teacher = None
  if cfg.sft.kd_weight:
    if cfg.sft.teacher_dtype:
      teacher_cfg = teacher_cfg.replace(dtype=cfg.sft.teacher_dtype)
    teacher = (checkpointing.abstract_with_shardings(transformer.abstract_params(teacher_cfg),
                                                     partitioner.param_shardings(teacher_cfg)), teacher_cfg)
  task = make_task(cfg, model_cfg, partitioner, teacher)
  features = {k: ((cfg.train.global_batch, cfg.data.seq_len), jnp.int32) for k in chat.FEATURES}
  if cfg.data.get("image_slots"):  # each row's patch buffer
    rows, p = (cfg.train.global_batch, cfg.data.image_slots), model_cfg.vision_patch_size
    features.update(patches=((*rows, p, p, 3), jnp.float32), patch_rows=(rows, jnp.int32),
                    patch_cols=(rows, jnp.int32), patch_images=(rows, jnp.int32))
  return loop.compile_step(cfg, task, model_cfg, partitioner, features)


def _checked(iterator, model_cfg: ModelConfig):
  """The chat iterator, after checking that data with images numbers its image tokens as the model does."""
  def make(data_cfg, tokenizer, *args, **kwargs):
    if data_cfg.get("image_slots"):
      image_io.check_model_ids(tokenizer, model_cfg.image_token_id, model_cfg.image_break_id,
                               model_cfg.image_end_id)
    return iterator(data_cfg, tokenizer, *args, **kwargs)
  return make


def _answer_eval(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig):
  """Held-out answer accuracy beside the eval loss when `eval.answers.paths` names QA records (image QA)."""
  a = cfg.eval.get("answers")
  if not a or not a.paths:
    return None
  records = answers.read_records(a.paths, a.n)  # a bad file fails now, before any step
  settings = chat.image_settings(cfg.data)
  def evaluate(params, tokenizer) -> dict[str, float]:
    result = answers.accuracy(params, model_cfg, records, tokenizer, settings, a.batch_size, a.max_new_tokens)
    return {f"eval_{k}": v for k, v in result.items()}
  return evaluate


def check(cfg: ml_collections.ConfigDict) -> None:
  """What only SFT needs, before any work."""
  s, problems = cfg.sft, []
  if cfg.data.get("image_slots") and not cfg.model.get("vision_layers"):
    problems.append(f"data.image_slots={cfg.data.image_slots}: the data carries images but the model has no "
                    "vision tower (model.vision_layers=0); use a multimodal model (e.g. preset "
                    "'ministral3_3b_vision', or configs/vision_tiny.py) or set data.image_slots=0")
  if cfg.data.source != "chat":
    problems.append(f"data.source={cfg.data.source!r}: SFT reads conversations; set data.source='chat' and "
                    "data.paths to JSONL files of {\"messages\": [...]}")
  if not 0.0 <= s.kd_weight <= 1.0:
    problems.append(f"sft.kd_weight={s.kd_weight!r}: a weight in [0, 1] (0: no teacher, 1: KL only)")
  if s.kd_weight and not s.teacher:
    problems.append(f"sft.kd_weight={s.kd_weight} needs a teacher: set sft.teacher to a checkpoint directory")
  if s.temperature <= 0:
    problems.append(f"sft.temperature={s.temperature!r}: a positive temperature")
  if problems:
    raise UserError("The SFT config has problems:\n  " + "\n  ".join(problems))


def tasks_config(family: str = "arithmetic", level: int = 2, train: int = 4000, eval_: int = 256,
                 style: str = "short", long_fraction: float = 0.0) -> ml_collections.ConfigDict:
  """The task suite's problems as SFT data (used when `data.paths` is empty); `long_fraction` of the answers
  carry the long worked solution (in the thinking, or as an instruct answer)."""
  return ml_collections.ConfigDict(dict(family=family, level=level, train=train, eval=eval_, style=style,
                                        long_fraction=long_fraction, seed=0))


def write_task_data(t: ml_collections.ConfigDict, root: epath.Path) -> tuple[str, str]:
  """<root>/train.jsonl and eval.jsonl from the suite, written once (atomically); their paths."""
  train, evals = root / "train.jsonl", root / "eval.jsonl"
  if not (train.exists() and evals.exists()):
    root.mkdir(parents=True, exist_ok=True)
    problems = task_suite.generate(t.family, t.level, "train", t.train, t.seed)
    pick = random.Random(f"long:{t.seed}")
    long = [pick.random() < t.long_fraction for _ in problems]
    rows = [_conversation(p, t.style, is_long) for p, is_long in zip(problems, long)]
    files.write_text(train, "".join(json.dumps(r) + "\n" for r in rows))
    eval_style = "instruct" if t.style == "instruct" else "short"
    task_suite.write_jsonl(task_suite.generate(t.family, t.level, "eval", t.eval, t.seed), str(evals), eval_style)
  multihost.sync(f"task-data:{root}")  # process 0 writes them; the others read them after this
  return str(train), str(evals)


def _conversation(problem: task_suite.Problem, style: str, long: bool) -> dict:
  """One problem as SFT data: reasoning answers carry the short or long chain of thought; instruct answers
  are the short worked solution or, when `long`, the long one written out as the answer (a verbose model)."""
  if style != "instruct":
    return task_suite.to_conversation(problem, "long" if long else "short")
  if not long:
    return task_suite.to_conversation(problem, "instruct")
  messages = task_suite.to_conversation(problem, "long")["messages"]
  return {"messages": messages[:-1] + [{"role": "assistant", "content": messages[-1]["thinking"]}]}


def write_shapes_data(s: ml_collections.ConfigDict, root: epath.Path) -> tuple[str, str]:
  """The synthetic image-QA task (`data/shapes.py`) as train / held-out JSONL, written once (atomically)."""
  train, heldout = root / "shapes_train.jsonl", root / "shapes_heldout.jsonl"
  if not (train.exists() and heldout.exists()):
    root.mkdir(parents=True, exist_ok=True)
    shapes.write_split(str(train), shapes.build_split(s.seed, s.train, "train", s.size))
    shapes.write_split(str(heldout), shapes.build_split(s.seed + 1, s.heldout, "heldout", s.size))
  multihost.sync("sft:shapes-data")
  return str(train), str(heldout)


def pretrain_parent(cfg: ml_collections.ConfigDict, root: epath.Path, prefix: str = "[sft parent]") -> tuple[str, str]:
  """A tiny parent pretrained on `parent.data` in <root> (resumable); its params and its tokenizer file."""
  p = cfg.parent
  c = ml_collections.ConfigDict({"task": "pretrain", "seed": cfg.seed, "init_from": "", "model": cfg.model.to_dict(),
                                 "mesh": cfg.mesh.to_dict(), "loss": cfg.loss.to_dict(), "data": p.data.to_dict(),
                                 "optimizer": p.optimizer.to_dict(), "eval": cfg.eval.to_dict()})
  c.train = ml_collections.ConfigDict({**cfg.train.to_dict(), "steps": p.steps, "log_prefix": prefix})
  if not (root / "params").exists():
    pretrain.run(c, str(root))
  return str(root / "params"), str(pipeline.build_tokenizer(c.data, str(root)).path)


def prepare(cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The SFT job the config describes, with the inputs it asks the job to make made first."""
  cfg = copy.deepcopy(cfg)
  root = epath.Path(workdir)
  with cfg.unlocked():
    if not cfg.data.paths and "shapes" in cfg:
      cfg.data.paths, cfg.data.eval_paths = write_shapes_data(cfg.shapes, root / "data")
      if "answers" in cfg.eval and not cfg.eval.answers.paths:
        cfg.eval.answers.paths = cfg.data.eval_paths
    elif not cfg.data.paths and "tasks" in cfg:
      cfg.data.paths, cfg.data.eval_paths = write_task_data(cfg.tasks, root / "data")
    if cfg.model.get("vision_layers") and cfg.data.get("image_slots"):  # the ViT's geometry, not the data's
      cfg.data.update(image_patch_size=cfg.model.vision_patch_size, image_merge=cfg.model.spatial_merge_size,
                      image_max_size=cfg.model.vision_image_size)
    if not cfg.init_from and cfg.get("parent") and (cfg.parent.checkpoint or cfg.parent.steps):
      if cfg.parent.checkpoint:
        cfg.init_from = cfg.parent.checkpoint
      else:
        cfg.init_from, tokenizer = pretrain_parent(cfg, root / "parent")
        cfg.data.tokenizer = tokenizer
    if cfg.data.tokenizer == "init_from":  # the tokenizer the starting checkpoint records or ships
      recorded = convert.recorded_tokenizer(cfg.init_from) if cfg.init_from else None
      if not recorded:
        raise UserError(f"data.tokenizer='init_from', but init_from={cfg.init_from!r} records no tokenizer; name "
                        "its tokenizer file in data.tokenizer.")
      cfg.data.tokenizer = recorded["source"]
  return cfg


def start_problems(cfg: ml_collections.ConfigDict, job: str, reference: bool = True) -> list[str]:
  """What is wrong with the start of a job that begins from an SFT model (DPO, Online DPO, the PWRM): it needs
  `init_from`, or an `sft_stage` config that makes one (`prepare_after_stage`)."""
  if cfg.init_from or (cfg.get("sft_stage") and cfg.sft_stage.get("task")):
    return []
  frozen = ", which is also its frozen reference" if reference else ""
  return [f"init_from is empty: {job} starts from a checkpoint (an SFT model){frozen}; name one, or give an "
          "sft_stage config to make it"]


def prepare_after_stage(cfg: ml_collections.ConfigDict, workdir: str, job: str) -> ml_collections.ConfigDict:
  """For a job that starts from an SFT model (GRPO, DPO): without `init_from`, first runs its `sft_stage`
  config in <workdir>/sft (resumable, done once) and starts from those params; then `prepare`."""
  cfg = copy.deepcopy(cfg)
  with cfg.unlocked():
    if not cfg.init_from and cfg.get("sft_stage") and cfg.sft_stage.get("task"):
      stage = copy.deepcopy(cfg.sft_stage)
      with stage.unlocked():
        stage.train.log_prefix = f"[{job} sft]"
      run(stage, str(epath.Path(workdir) / "sft"))
      multihost.sync(f"{job}:sft-stage")
      cfg.init_from = str(epath.Path(workdir) / "sft" / "params")
  return prepare(cfg, workdir)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  check(cfg)
  cfg = prepare(cfg, workdir)
  return loop.run(cfg, workdir, make_task,
                  sources=lambda c: {"sft.teacher": c.sft.teacher} if c.sft.kd_weight else {})
