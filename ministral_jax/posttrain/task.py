"""Task `posttrain`: the paper's two post-training recipes from one base checkpoint, resumable, with a report.

    python -m ministral_jax.main --config=configs/posttrain_tiny.py --workdir=DIR

Each stage is an ordinary job in its own directory of the workdir (like the cascade), resumable on its own:

    base/              pretrain a tiny base (skipped when `posttrain.base` names a checkpoint)
    instruct/sft/      SFT on answers without thinking (+ logit distillation with `jobs.instruct_sft.sft.kd_weight`)
    pwrm/              the pairwise reward model, from instruct/sft, on rule-labelled pairs (answers only)
    instruct/odpo/     Online DPO from instruct/sft
    instruct/dpo/      with `posttrain.baselines`: offline DPO from instruct/sft on the rule's own pairs, as many
                       pairs in as many steps as instruct/odpo (the paper's claim C7: ODPO against offline DPO)
    reasoning/sft/     SFT on [THINK] chain of thought [/THINK] answers (short and long)
    reasoning/grpo/    GRPO from reasoning/sft
    reasoning/odpo/    Online DPO from reasoning/grpo, the thinking stripped before the PWRM reads a response
                       (`jobs.reasoning_odpo` if given, e.g. other prompts; else `jobs.odpo`)

`posttrain.recipes` lists each recipe's stages, in the order sft -> grpo -> odpo (a recipe may leave one out;
an empty list leaves the recipe out).
A job is done when its `params/` exists; run the same command again and it skips the done jobs and resumes the
first unfinished one from its last checkpoint. After SIGTERM the running job saves and the pipeline stops
(exit status 75). At the end, every stage's model answers the held-out prompts of its recipe greedily, and
`report.md`, `report.json` and `posttrain.png` give per stage: accuracy, the win rate against the recipe's SFT
model by the stated rule (`rewards/judge.py`), mean length, truncation and loop rates; with the PWRM's
held-out accuracy and calibration.
"""

from __future__ import annotations

import copy

import ml_collections
from etils import epath

from ministral_jax import config_checks, faults
from ministral_jax.errors import Preempted, UserError
from ministral_jax.eval import responses
from ministral_jax.train import dpo, grpo, odpo, preemption, pwrm, sft

ORDER = ("sft", "grpo", "odpo")
RECIPES = ("instruct", "reasoning")


def posttrain_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      base="",  # a base checkpoint (any format, with its tokenizer); empty: pretrain one in <workdir>/base
      recipes=dict(instruct=("sft", "odpo"), reasoning=("sft", "grpo", "odpo")),
      baselines=True,  # offline DPO beside instruct/odpo, on as many pairs
      reasoning_max_new_tokens=192,  # the reasoning ODPO's samples (its chains of thought are longer)
      report=dict(eval_problems=128, batch=128, max_new_tokens=192, loop=responses.loop_config())))


def check(cfg: ml_collections.ConfigDict) -> None:
  """The stage lists and every job's own config, before any work."""
  p, problems = cfg.posttrain, []
  for recipe, stages in p.recipes.items():
    if recipe not in RECIPES:
      problems.append(f"posttrain.recipes has {recipe!r}; the recipes are {RECIPES}")
      continue
    unknown = [s for s in stages if s not in ORDER]
    if unknown:
      problems.append(f"posttrain.recipes.{recipe} has {unknown}; stages are {ORDER}")
    elif not stages:
      continue  # the recipe is left out
    elif stages[0] != "sft" or list(stages) != sorted(stages, key=ORDER.index) or \
        len(set(stages)) != len(stages):
      problems.append(f"posttrain.recipes.{recipe}={tuple(stages)} is out of order: a recipe starts with sft and "
                      f"runs its stages once each in the order {' -> '.join(ORDER)}")
  if p.base and not epath.Path(p.base).exists():
    problems.append(f"posttrain.base={p.base!r} does not exist; name a checkpoint or leave it empty (a tiny base)")
  if problems:
    raise UserError("The post-training pipeline's config has problems:\n  " + "\n  ".join(problems))
  j = cfg.jobs
  sft.check(j.instruct_sft)
  sft.check(j.reasoning_sft)
  grpo.check(_with_start(j.grpo))
  pwrm.check(_with_start(j.pwrm))
  for job in ("odpo", "reasoning_odpo"):
    if j.get(job):
      odpo.check(_with_start(j[job], pwrm_path="-"))
  dpo.check(_with_start(j.dpo))


def _with_start(c: ml_collections.ConfigDict, pwrm_path: str = "") -> ml_collections.ConfigDict:
  """A job's config as the pipeline will run it, for checking: its start is given (made by an earlier job)."""
  c = copy.deepcopy(c)
  with c.unlocked():
    c.init_from = "-"
    if pwrm_path:
      c.odpo.pwrm = pwrm_path
  return c


class Pipeline:
  def __init__(self, cfg: ml_collections.ConfigDict, root: epath.Path):
    self.cfg, self.root, self.n = cfg, root, 0
    r = cfg.posttrain.recipes
    self.jobs = ((0 if cfg.posttrain.base else 1) + sum(len(s) for s in r.values())
                 + ("odpo" in r.get("instruct", ()) or "odpo" in r.get("reasoning", ()))
                 + bool(cfg.posttrain.baselines and "odpo" in r.get("instruct", ())))

  def _next(self, name: str) -> str:
    """Before each job: stop here if a SIGTERM came during the one before (it finished or saved)."""
    if self.n:
      faults.point("posttrain.between_jobs")
      if preemption.requested():
        raise Preempted(str(self.root))
    self.n += 1
    return f"[posttrain {self.n}/{self.jobs} {name}]"

  def base(self) -> str:
    """`posttrain.base`, or a tiny base pretrained in <root>/base (the instruct SFT job's `parent` block)."""
    if self.cfg.posttrain.base:
      return self.cfg.posttrain.base
    return sft.pretrain_parent(self.cfg.jobs.instruct_sft, self.root / "base", self._next("base"))[0]

  def run(self, name: str, runner, job: ml_collections.ConfigDict, **fields) -> str:
    """`runner(job)` in <root>/<name> unless its params exist; the job's start and log prefix filled in."""
    prefix = self._next(name)
    workdir = self.root / name
    c = copy.deepcopy(job)
    with c.unlocked():
      for path, value in fields.items():
        *blocks, key = path.split(".")
        node = c
        for block in blocks:
          node = node[block]
        node[key] = value
      c.train.log_prefix = prefix
      for stage in ("sft_stage", "pwrm_stage"):
        if stage in c:
          c[stage] = {}
    if not (workdir / "params").exists():
      runner(c, str(workdir))
    return str(workdir / "params")


def _suite_problems(sft_job: ml_collections.ConfigDict) -> dict:
  """An online stage prompts with its recipe's SFT problems when those come from the task suite (the
  miniature); with real data each job's own `data.paths` are its prompts."""
  return {"tasks": sft_job.tasks.to_dict()} if "tasks" in sft_job else {}


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  from ministral_jax.posttrain import report
  config_checks.require(config_checks.workdir(workdir))
  check(cfg)
  root = epath.Path(workdir)
  preemption.install()
  recipes, j = cfg.posttrain.recipes, cfg.jobs
  p = Pipeline(cfg, root)
  base = p.base()
  start = {"init_from": base, "data.tokenizer": "init_from"}
  models: dict[str, str] = {}
  instruct, reasoning = recipes.get("instruct", ()), recipes.get("reasoning", ())
  if instruct:
    models["instruct/sft"] = p.run("instruct/sft", sft.run, j.instruct_sft, **start)
  pwrm_path = ""
  if "odpo" in instruct or "odpo" in reasoning:
    sft_model = models.get("instruct/sft") or base
    pwrm_path = p.run("pwrm", pwrm.run, j.pwrm, **{**start, "init_from": sft_model})
  if "odpo" in instruct:
    models["instruct/odpo"] = p.run("instruct/odpo", odpo.run, j.odpo,
                                    **{**start, "init_from": models["instruct/sft"], "odpo.pwrm": pwrm_path,
                                       "odpo.strip_thinking": False, **_suite_problems(j.instruct_sft)})
    if cfg.posttrain.baselines:  # as many preference pairs, in as many steps, from the same SFT model
      models["instruct/dpo"] = p.run("instruct/dpo", dpo.run, j.dpo,
                                     **{**start, "init_from": models["instruct/sft"],
                                        "train.steps": j.odpo.train.steps,
                                        "train.global_batch": j.odpo.train.global_batch})
  if reasoning:
    models["reasoning/sft"] = p.run("reasoning/sft", sft.run, j.reasoning_sft, **start)
    last = models["reasoning/sft"]
    reasoning_data = _suite_problems(j.reasoning_sft)
    if "grpo" in reasoning:
      last = models["reasoning/grpo"] = p.run("reasoning/grpo", grpo.run, j.grpo,
                                              **{**start, "init_from": last, **reasoning_data})
    if "odpo" in reasoning:
      models["reasoning/odpo"] = p.run("reasoning/odpo", odpo.run, j.get("reasoning_odpo") or j.odpo,
                                       **{**start, "init_from": last, "odpo.pwrm": pwrm_path,
                                          "odpo.strip_thinking": True, **reasoning_data,
                                          "odpo.sampling.max_new_tokens": cfg.posttrain.reasoning_max_new_tokens})
  return report.write(cfg, root, models, pwrm_path)
