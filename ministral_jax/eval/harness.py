"""Task `lm_eval`: a checkpoint scored on lm-evaluation-harness tasks through our backend.

    python -m ministral_jax.main --config=configs/lm_eval_tiny.py --workdir=DIR

The checkpoint is `eval.checkpoint` (orbax, HF or Mistral-native) or `<workdir>/params`; its tokenizer is
the one it records or ships (else `data.tokenizer`). `eval.tasks` names harness tasks: the offline ones
built here (`harness_tasks.TASKS`, written to `<workdir>/lm_eval_tasks/`), any task of the harness's
registry (MMLU, ARC, TriviaQA, ...: their datasets must be reachable), and tasks under `eval.include_path`.
Results go to `<workdir>/lm_eval.json` (metrics, few-shot counts, request counts and speed) and
`<workdir>/lm_eval.md` (the harness's table).
"""

from __future__ import annotations

import difflib
import json
import os
import time
from typing import Any

import jax
import ml_collections
from etils import epath

from ministral_jax import files, multihost, sharding
from ministral_jax.errors import UserError
from ministral_jax.eval import harness_tasks

RESULT_FILE, TABLE_FILE = "lm_eval.json", "lm_eval.md"


def harness_config() -> ml_collections.ConfigDict:
  """The `eval` fields this task reads besides `checkpoint` and `batch_size`."""
  return ml_collections.ConfigDict(dict(
      tasks=",".join(harness_tasks.TASKS),
      num_fewshot=-1,  # -1: each task's own default
      limit=0.0,  # 0: every document; < 1: a fraction; >= 1: that many per task
      max_length=0,  # 0: model.max_seq_len
      max_gen_toks=256,  # for tasks that do not set their own
      chat_template=False,  # prompts in the Mistral instruct format (SFT's)
      include_path="",  # more task YAMLs
      bootstrap_iters=0,  # > 0: standard errors by bootstrap
      log_samples=False,  # per-document inputs and outputs in lm_eval.json
      local_docs=64))  # documents per offline task


def check(e: ml_collections.ConfigDict) -> list[str]:
  problems = []
  if not [t for t in e.tasks.split(",") if t.strip()]:
    problems.append("eval.tasks is empty: name harness tasks, e.g. " + ",".join(harness_tasks.TASKS))
  for field, low in (("batch_size", 1), ("num_fewshot", -1), ("max_length", 0), ("max_gen_toks", 1),
                     ("local_docs", 1), ("bootstrap_iters", 0)):
    if e[field] < low:
      problems.append(f"eval.{field}={e[field]!r}: at least {low}")
  if e.limit < 0:
    problems.append(f"eval.limit={e.limit!r}: 0 (all), a fraction below 1, or a count")
  if e.include_path and not os.path.isdir(e.include_path):
    problems.append(f"eval.include_path={e.include_path!r} is not a directory")
  return problems


def task_manager(names: list[str], e: ml_collections.ConfigDict, workdir: str):
  """The harness's TaskManager over our offline tasks (written if named), `include_path`, and the
  harness's own registry when a name needs it; an unknown name is an error naming the closest ones."""
  from lm_eval.tasks import TaskManager
  paths = []
  if any(n in harness_tasks.TASKS for n in names):
    local = epath.Path(workdir) / "lm_eval_tasks"
    if jax.process_index() == 0:
      harness_tasks.write(local, n=e.local_docs)
    multihost.sync("lm_eval_tasks")
    paths.append(str(local))
  if e.include_path:
    paths.append(e.include_path)
  own = set(harness_tasks.TASKS)
  defaults = any(n not in own for n in names)
  tm = TaskManager(include_path=paths or None, include_defaults=defaults)
  known = set(tm.all_tasks)
  unknown = [n for n in names if n not in known]
  if unknown:
    hints = {n: difflib.get_close_matches(n, known | own, n=3) for n in unknown}
    raise UserError("Unknown lm-eval task(s): " + "; ".join(
        f"{n!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for n, h in hints.items())
        + f". Offline tasks: {', '.join(harness_tasks.TASKS)}; more with eval.include_path.")
  return tm


def _quiet_datasets() -> None:
  """`datasets` draws a progress bar per split it prepares; ours is the one over requests."""
  from absl import flags
  if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _checkpoint(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  path = cfg.eval.checkpoint or str(epath.Path(workdir) / "params")
  if not epath.Path(path).exists():
    raise UserError(f"There is no checkpoint to evaluate at {path}: set eval.checkpoint, or point --workdir at a "
                    "finished training run (its <workdir>/params).")
  return path


def _tokenizer_spec(cfg: ml_collections.ConfigDict, path: str, workdir: str):
  from ministral_jax.checkpoint import convert
  from ministral_jax.data import pipeline
  if convert.recorded_tokenizer(path) or cfg.data.tokenizer in ("", "init_from"):
    return ""  # the checkpoint's own (the backend checks it exists)
  return pipeline.build_tokenizer(cfg.data, workdir)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  e = cfg.eval
  problems = check(e)
  if problems:
    raise UserError("The lm_eval config has problems:\n  " + "\n  ".join(problems))
  path = _checkpoint(cfg, workdir)
  names = [t.strip() for t in e.tasks.split(",") if t.strip()]
  if set(names) <= set(harness_tasks.TASKS) and not e.include_path:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never ask the Hub
  _quiet_datasets()
  tm = task_manager(names, e, workdir)
  import lm_eval
  from lm_eval import utils as lm_utils
  from ministral_jax.eval import harness_model
  partitioner = sharding.Partitioner.from_config(cfg.mesh)
  model = harness_model.MinistralLM(checkpoint=path, tokenizer=_tokenizer_spec(cfg, path, workdir),
                                    batch_size=e.batch_size, max_length=e.max_length, max_gen_toks=e.max_gen_toks,
                                    partitioner=partitioner,
                                    show_progress=jax.process_index() == 0)
  start = time.time()
  out = lm_eval.simple_evaluate(
      model=model, tasks=names, task_manager=tm, num_fewshot=None if e.num_fewshot < 0 else e.num_fewshot,
      limit=None if e.limit == 0 else (int(e.limit) if e.limit >= 1 else e.limit), batch_size=e.batch_size,
      bootstrap_iters=e.bootstrap_iters, log_samples=e.log_samples, apply_chat_template=e.chat_template,
      fewshot_as_multiturn=e.chat_template)
  seconds = time.time() - start
  if out is None:  # the harness returns None on processes other than its rank 0; ours is rank 0 everywhere
    raise UserError("lm-eval returned no results.")
  report = {"checkpoint": path, "tasks": names, "results": out["results"], "n-shot": out.get("n-shot", {}),
            "n-samples": out.get("n-samples", {}), "versions": out.get("versions", {}),
            "truncated_requests": model.truncated, "seconds": seconds,
            "config": {k: e[k] for k in ("num_fewshot", "limit", "batch_size", "max_length", "chat_template")}}
  if e.log_samples:
    report["samples"] = out.get("samples", {})
  report = json.loads(json.dumps(report, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
  table = lm_utils.make_table(out)
  print(table)
  if model.truncated:
    print(f"{model.truncated} request(s) were longer than max_length={model.max_length} and lost tokens on the "
          "left (as the harness truncates).")
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  files.write_json(epath.Path(workdir) / RESULT_FILE, report)
  files.write_text(epath.Path(workdir) / TABLE_FILE, table)
  return report
