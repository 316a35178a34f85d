"""Task `cascade`: prune -> distill -> repeat (paper, Algorithm 1), end to end, resumable, with a report.

    python -m ministral_jax.main --config=configs/cascade_tiny.py --workdir=DIR

The cascade is a list of jobs, each an ordinary task in its own directory of
the workdir, each resumable on its own:

    parent/             pretrain the parent (skipped when `parent.checkpoint` names one)
    <stage>/prune/      prune the previous stage's short-context model to the stage's shape
    <stage>/short/      distill it from the teacher at the short context (`data.seq_len`)
    <stage>/long/       optional (`long_steps`): RoPE switched to YaRN and the query temperature
                        on, distilled at `long.seq_len`; the released child. The next stage is
                        pruned from the short-context model, as in the paper.
    baseline_<stage>/   the stage's shape trained from scratch on as many tokens as the child saw
                        in distillation, from the same window of the data (if `baselines`)

A job is done when its `params/` exists. Run the same command again and it
skips the done jobs and resumes the first unfinished one from its last
checkpoint, so a killed cascade ends with the result of one that never
stopped. After SIGTERM the running job saves and the cascade stops before the
next one (exit status 75: not finished). The cascade's identity
(`cascade.json`) is its config without how it runs, logs and evaluates
(`RUN_FIELDS`): evaluation files can be added to a finished cascade, and its
report then scores every model on them too. Progress lines carry the job
(`[cascade 3/9 child57/short]`) and `total_eta_min`, the whole cascade's
remaining time at the running job's measured FLOP/s. One data stream: every training job starts at the document where the
job before it stopped (`data.start_document`, plus `data.skip_documents`: the
positions past it that some of the job's row slots already read, see
`data/pipeline.py`), so no document is read twice and none is left out, and
`data.epochs` ends the
stream rather than repeat an example. At the end: `report.md` (the table),
`report.json` and `eval_loss.png` (eval loss against tokens).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import Any

import ml_collections
from etils import epath

from ministral_jax import config_checks, faults, files, multihost, sharding, workdir_lock
from ministral_jax.checkpoint import convert
from ministral_jax.data import pipeline, tokenizers
from ministral_jax.errors import Preempted, UserError
from ministral_jax.model.config import ARCH_FIELDS, ModelConfig, flops_per_token, param_count
from ministral_jax.prune import pruner
from ministral_jax.prune import task as prune_task
from ministral_jax.train import checkpointing, distill, preemption, pretrain

IDENTITY_FILE = "cascade.json"
_SHAPE = ("n_layers", "d_model", "d_ffn")
# How the cascade runs, logs and is evaluated: not part of its identity, free to change on a re-run.
RUN_FIELDS = ("mesh", "eval", "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
              "train.keep_checkpoints", "train.async_checkpoints", "train.peak_flops_per_device")


@dataclasses.dataclass
class Stage:
  name: str
  short: ModelConfig  # the child at the short context (the parent's RoPE)
  long: ModelConfig | None  # the same weights with YaRN and the query temperature, or None
  short_steps: int
  long_steps: int


def long_context(cfg: ModelConfig, short_len: int, long: ml_collections.ConfigDict) -> ModelConfig:
  """The long-context model: YaRN from the short context, and the query temperature switched on."""
  return cfg.replace(rope_scaling="yarn", yarn_factor=float(long.yarn_factor), yarn_original_max_len=short_len,
                     query_temperature_beta=float(long.query_temperature_beta), query_temperature_len=short_len,
                     max_seq_len=max(cfg.max_seq_len, long.seq_len))


def stage_config(name: str, n_layers: int, d_model: int, d_ffn: int, short_steps: int, long_steps: int,
                 **model: Any) -> ml_collections.ConfigDict:
  """One entry of `config.stages`: a child's shape (any other model field may be set too, e.g. its
  RoPE base) and its token budget in steps (`long_steps=0`: no long-context stage)."""
  return ml_collections.ConfigDict(dict(name=name, model=dict(n_layers=n_layers, d_model=d_model, d_ffn=d_ffn, **model),
                                        short_steps=short_steps, long_steps=long_steps))


def parent_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
  """`parent.model`, or `parent.checkpoint`'s architecture run with `parent.model`'s execution fields."""
  model = ModelConfig.from_dict(cfg.parent.model)
  if not cfg.parent.checkpoint:
    return model
  if not epath.Path(cfg.parent.checkpoint).exists():
    raise UserError(f"parent.checkpoint={cfg.parent.checkpoint!r} does not exist. Point it at an orbax, HF "
                     "or Mistral-native checkpoint, or leave it empty to pretrain a parent.")
  return convert.load_config_any(cfg.parent.checkpoint).replace(
      **{k: v for k, v in model.to_dict().items() if k not in ARCH_FIELDS})


def stages(cfg: ml_collections.ConfigDict, parent: ModelConfig) -> list[Stage]:
  """The stages, checked: names, shrinking shapes, and every prune step they imply."""
  if not cfg.stages:
    raise UserError("config.stages is empty: name at least one child shape.")
  out, prev, problems = [], parent, []
  if not cfg.parent.checkpoint and cfg.parent.steps < 1:
    problems.append(f"parent.steps={cfg.parent.steps}: pretrain the parent for at least 1 step, or name "
                    "parent.checkpoint")
  for i, s in enumerate(cfg.stages):
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name) or s.name == "parent" or s.name in [o.name for o in out]:
      problems.append(f"stages[{i}].name={s.name!r} must be unique, not 'parent', and path-safe")
    if s.short_steps < 1 or s.long_steps < 0:
      problems.append(f"stages[{i}] ({s.name}): short_steps={s.short_steps} must be >= 1 and long_steps="
                      f"{s.long_steps} >= 0 (0: no long-context stage)")
    short = prev.replace(**s.model.to_dict())
    if any(getattr(short, f) > getattr(prev, f) for f in _SHAPE) or param_count(short) >= param_count(prev):
      problems.append(f"stages[{i}] ({s.name}): {'/'.join(str(getattr(short, f)) for f in _SHAPE)} is not smaller "
                      f"than the model before it ({'/'.join(str(getattr(prev, f)) for f in _SHAPE)}); the targets "
                      "must decrease in every dimension and in size")
    else:
      try:
        pruner.check(prev, short, pruner.shrinking_steps(cfg.prune, prev, short))
      except ValueError as e:
        problems.append(f"stages[{i}] ({s.name}): {e}")
    long = long_context(short, cfg.data.seq_len, cfg.long) if s.long_steps else None
    out.append(Stage(s.name, short, long, int(s.short_steps), int(s.long_steps)))
    prev = short
  if problems:
    raise UserError("The cascade's stages are not valid:\n  " + "\n  ".join(problems))
  return out


def check_identity(root: epath.Path, cfg: ml_collections.ConfigDict, write: bool) -> None:
  """A workdir holding another cascade is an error; the first run writes (`write`) this one's identity."""
  identity = _identity(cfg)
  path = root / IDENTITY_FILE
  if path.exists():
    saved = _without_run_fields(json.loads(path.read_text()))
    diff = sorted(k for k in identity.keys() | saved.keys() if identity.get(k) != saved.get(k))
    if diff:
      raise UserError(f"Workdir {root} holds a different cascade (its config differs in: {', '.join(diff)}). "
                       "Use a new --workdir, or the config that started it.")
    return
  if root.exists() and any(p.name != workdir_lock.LOCK_FILE and not p.name.startswith(".") for p in root.iterdir()):
    raise UserError(f"Workdir {root} is not empty and holds no {IDENTITY_FILE}: it is not a cascade's. "
                     "Use a new --workdir.")
  if write:
    root.mkdir(parents=True, exist_ok=True)
    files.write_json(path, identity)


def _without_run_fields(identity: dict) -> dict:
  out = copy.deepcopy(identity)
  for field in RUN_FIELDS:
    block, _, key = field.rpartition(".")
    (out.get(block, {}) if block else out).pop(key, None)
  return out


def _identity(cfg: ml_collections.ConfigDict) -> dict:
  return _without_run_fields(json.loads(cfg.to_json()))


Position = tuple[int, list[int]]  # (data.start_document, data.skip_documents): where a job's data starts


@dataclasses.dataclass
class Run:
  """One training job's record for the report."""
  name: str
  model: ModelConfig
  path: str  # its params
  start_document: int
  tokens: int
  workdir: str = ""


def job_flops(cfg: ml_collections.ConfigDict, parent: ModelConfig, plan: list[Stage]) -> dict[str, float]:
  """Every training job's matmul FLOPs, in the order they run (the ETA of the whole cascade)."""
  short_tokens = cfg.train.global_batch * cfg.data.seq_len
  out = {} if cfg.parent.checkpoint else {"parent": cfg.parent.steps * short_tokens * flops_per_token(
      parent, cfg.data.seq_len)}
  teachers = {"parent": parent}
  prev = parent
  for s in plan:
    teacher = teachers.get(cfg.distill.teacher) or (prev if cfg.distill.teacher == "previous"
                                                    else convert.load_config_any(cfg.distill.teacher))

    def distill_flops(model: ModelConfig, seq_len: int) -> float:
      return flops_per_token(model, seq_len) + flops_per_token(teacher, seq_len, backward=False)
    out[f"{s.name}/short"] = s.short_steps * short_tokens * distill_flops(s.short, cfg.data.seq_len)
    tokens = s.short_steps * short_tokens
    if s.long:
      long_tokens = s.long_steps * cfg.long.global_batch * cfg.long.seq_len
      out[f"{s.name}/long"] = long_tokens * distill_flops(s.long, cfg.long.seq_len)
      tokens += long_tokens
    if cfg.baselines:
      out[f"baseline_{s.name}"] = _baseline_steps(cfg, tokens) * short_tokens * flops_per_token(
          s.short, cfg.data.seq_len)
    prev = s.short
  return out


def _baseline_steps(cfg: ml_collections.ConfigDict, tokens: int) -> int:
  return -(-tokens // (cfg.train.global_batch * cfg.data.seq_len))


class Cascade:
  """Runs the jobs in order, skipping the done ones; tracks where the data stream is."""

  def __init__(self, cfg: ml_collections.ConfigDict, root: epath.Path, n_jobs: int, flops: dict[str, float]):
    self.cfg, self.root, self.n_jobs, self.job, self.flops = cfg, root, n_jobs, 0, flops

  def _prefix(self, name: str) -> str:
    """Before each job: stop here if a SIGTERM came during the one before (it finished or saved)."""
    if self.job:
      faults.point("cascade.between_jobs")
      if preemption.requested():
        raise Preempted(str(self.root))
    self.job += 1
    return f"[cascade {self.job}/{self.n_jobs} {name}]"

  def job_config(self, name: str, task: str, model: ModelConfig, steps: int, start: Position, *, seq_len: int,
                 global_batch: int, optimizer: ml_collections.ConfigDict, init_from: str = "", teacher: str = "",
                 teacher_context: str = "own", mesh: ml_collections.ConfigDict | None = None
                 ) -> ml_collections.ConfigDict:
    """The experiment config of one job of the cascade (what `train` runs)."""
    cfg = self.cfg
    c = ml_collections.ConfigDict({"task": task, "seed": cfg.seed, "init_from": init_from, "model": model.to_dict(),
                                   "mesh": (mesh or cfg.mesh).to_dict(), "loss": cfg.loss.to_dict(),
                                   "eval": cfg.eval.to_dict(), "optimizer": optimizer.to_dict()})
    c.data = ml_collections.ConfigDict({**cfg.data.to_dict(), "start_document": start[0],
                                        "skip_documents": ",".join(map(str, start[1])), "seq_len": seq_len})
    c.train = ml_collections.ConfigDict({**cfg.train.to_dict(), "steps": steps, "global_batch": global_batch,
                                         "log_prefix": self._prefix(name), "flops_after": self._flops_after(name)})
    if task == "distill":
      c.distill = ml_collections.ConfigDict({**cfg.distill.to_dict(), "teacher": teacher,
                                             "teacher_context": teacher_context})
    return c

  def _flops_after(self, name: str) -> float:
    names = list(self.flops)
    return float(sum(self.flops[n] for n in names[names.index(name) + 1:]
                     if not (self.root / n / "params").exists()))

  def train(self, name: str, task: str, model: ModelConfig, steps: int, start: Position, *, seq_len: int,
            global_batch: int, optimizer: ml_collections.ConfigDict, init_from: str = "",
            teacher: str = "", teacher_context: str = "own", mesh: ml_collections.ConfigDict | None = None
            ) -> tuple[Run, Position]:
    """A pretrain or distill job; returns its record and where its data stream stopped."""
    workdir = self.root / name
    c = self.job_config(name, task, model, steps, start, seq_len=seq_len, global_batch=global_batch,
                        optimizer=optimizer, init_from=init_from, teacher=teacher, teacher_context=teacher_context,
                        mesh=mesh)
    if not (workdir / "params").exists():
      print(f"{c.train.log_prefix} {task}: {steps} steps x {global_batch} x {seq_len} tokens from document {start[0]}",
            flush=True)
      (distill if task == "distill" else pretrain).run(c, str(workdir))
    end = pipeline.stream_position(checkpointing.latest_data_state(str(workdir)))
    return Run(name, model, str(workdir / "params"), start[0], steps * global_batch * seq_len, str(workdir)), end

  def prune(self, name: str, parent_path: str, parent: ModelConfig, child: ModelConfig) -> str:
    cfg, workdir = self.cfg, self.root / name
    c = ml_collections.ConfigDict({"task": "prune", "seed": cfg.seed, "model": child.to_dict(),
                                   "data": cfg.data.to_dict(), "mesh": cfg.mesh.to_dict(),
                                   "prune": pruner.shrinking_steps(cfg.prune, parent, child).to_dict()})
    c.prune.parent = parent_path
    prefix = self._prefix(name)
    if not (workdir / "params").exists():
      print(f"{prefix} prune {parent_path} to {'/'.join(str(getattr(child, f)) for f in _SHAPE)}", flush=True)
      prune_task.run(c, str(workdir))
    return str(workdir / "params")


def long_mesh(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The long-context stages' mesh: `long.mesh` (e.g. with a context axis for 262K tokens), else `mesh`."""
  return cfg.long.get("mesh") or cfg.mesh


def check(cfg: ml_collections.ConfigDict, root: epath.Path) -> tuple[ModelConfig, list[Stage], sharding.Partitioner]:
  """Everything that can be wrong, before any work (nothing is written)."""
  parent = parent_config(cfg)
  plan = stages(cfg, parent)
  teacher = cfg.distill.teacher
  if teacher not in ("parent", "previous") and not epath.Path(teacher).exists():
    raise UserError(f"distill.teacher={teacher!r} does not exist. Use 'parent' (the cascade's root, as the "
                     "paper), 'previous' (the stage before) or a checkpoint directory.")
  if any(s.long for s in plan) and cfg.long.seq_len <= cfg.data.seq_len:
    raise UserError(f"long.seq_len={cfg.long.seq_len} must exceed data.seq_len={cfg.data.seq_len}.")
  partitioner = sharding.Partitioner.from_config(cfg.mesh)
  for model in [parent] + [m for s in plan for m in (s.short, s.long) if m is not None]:
    partitioner.param_shardings(model)
  partitioner.check_batch(cfg.train.global_batch)
  partitioner.check_sequence(cfg.data.seq_len)
  if any(s.long for s in plan):
    long_partitioner = sharding.Partitioner.from_config(long_mesh(cfg))
    for model in [s.long for s in plan if s.long]:
      long_partitioner.param_shardings(model)
    long_partitioner.check_batch(cfg.long.global_batch)
    long_partitioner.check_sequence(cfg.long.seq_len)
  if cfg.data.tokenizer == "spm_train":
    if cfg.data.spm_vocab_size > parent.vocab_size:
      raise UserError(f"data.spm_vocab_size={cfg.data.spm_vocab_size} exceeds the parent's vocab_size="
                       f"{parent.vocab_size}; lower it.")
  else:
    tokenizers.check_vocab_fits(tokenizers.load_tokenizer(cfg.data.tokenizer), parent.vocab_size)
  check_identity(root, cfg, write=False)
  return parent, plan, partitioner


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  from ministral_jax.cascade import report  # matplotlib is imported only to write the report

  root = epath.Path(workdir)
  config_checks.require(config_checks.workdir(workdir) + config_checks.train(cfg.train)
                        + config_checks.optimizer(cfg.parent.optimizer) + config_checks.optimizer(cfg.distill_optimizer)
                        + config_checks.data(cfg.data) + config_checks.loss(cfg.loss) + config_checks.distill(cfg.distill))
  parent, plan, partitioner = check(cfg, root)
  check_identity(root, cfg, write=True)
  multihost.sync("cascade:identity")  # no process writes into the workdir before every one has checked it
  cfg = copy.deepcopy(cfg)
  with cfg.unlocked():  # one tokenizer for every job (a trained SentencePiece is trained once, here)
    cfg.data.tokenizer = str(pipeline.build_tokenizer(cfg.data, str(root)).path)

  n_jobs = (0 if cfg.parent.checkpoint else 1) + sum(2 + bool(s.long) for s in plan) + len(plan) * bool(cfg.baselines)
  c = Cascade(cfg, root, n_jobs, job_flops(cfg, parent, plan))
  short = dict(seq_len=cfg.data.seq_len, global_batch=cfg.train.global_batch)
  if cfg.parent.checkpoint:
    runs, offset = {"parent": Run("parent", parent, cfg.parent.checkpoint, 0, 0)}, (0, [])
  else:
    runs = {}
    runs["parent"], offset = c.train("parent", "pretrain", parent, cfg.parent.steps, (0, []), optimizer=cfg.parent.optimizer,
                                     **short)
  prev, prev_cfg, pruned = runs["parent"].path, parent, {}
  for s in plan:
    pruned[s.name] = c.prune(f"{s.name}/prune", prev, prev_cfg, s.short)
    teacher = {"parent": runs["parent"].path, "previous": prev}.get(cfg.distill.teacher, cfg.distill.teacher)
    window = offset
    runs[f"{s.name}/short"], offset = c.train(f"{s.name}/short", "distill", s.short, s.short_steps, offset,
                                             optimizer=cfg.distill_optimizer, init_from=pruned[s.name],
                                             teacher=teacher, **short)
    tokens = runs[f"{s.name}/short"].tokens
    if s.long:
      runs[f"{s.name}/long"], offset = c.train(
          f"{s.name}/long", "distill", s.long, s.long_steps, offset, seq_len=cfg.long.seq_len,
          global_batch=cfg.long.global_batch, optimizer=cfg.distill_optimizer,
          init_from=runs[f"{s.name}/short"].path, teacher=teacher, mesh=long_mesh(cfg),
          teacher_context="student")  # the teacher reads the long context with the child's YaRN too
      tokens = runs[f"{s.name}/long"].tokens = runs[f"{s.name}/long"].tokens + tokens  # both stages
    if cfg.baselines:  # the same shape from scratch, as many tokens, the same window of the data
      runs[f"baseline_{s.name}"], _ = c.train(f"baseline_{s.name}", "pretrain", s.short,
                                              _baseline_steps(cfg, tokens), window,
                                              optimizer=cfg.parent.optimizer, **short)
    prev, prev_cfg = runs[f"{s.name}/short"].path, s.short
  return report.write(cfg, root, plan, runs, pruned, partitioner)
