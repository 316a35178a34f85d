"""lm-evaluation-harness speed: our backend (`MinistralLM`) against lm-eval's own Hugging Face backend, one run.

    python -m benchmarks.lm_eval_speed [--preset=tiny] [--docs=64] [--batch=8] [--rounds=2] [--json=out.json]

A random model (`--preset`, the Tekken vocabulary, 256 positions, fp32) is saved as an orbax checkpoint that
records its tokenizer and exported with `convert.convert("orbax", "hf", ...)`, which ships `tekken.json`, so
`AutoTokenizer` loads transformers' `MistralCommonBackend` and both sides run the same weights on the same
token ids. The three offline tasks of `eval/harness_tasks.py` (`--docs` documents each: multiple choice,
line completion, rolling perplexity) run through `lm_eval.simple_evaluate`, one task per call, on:

  - ours: `MinistralLM(checkpoint=orbax, batch_size=--batch, mesh="data=-1")`;
  - HF:   `HFLM(pretrained=hf, batch_size=--batch, device="cpu", dtype="float32", max_length=256)`,
          torch with as many threads as XLA's CPU pool.

Each round runs every task on ours, then on HF. Round 1 is cold: ours compiles its XLA programs there (a task
reuses the programs of the tasks before it, as in a real run); rounds 2.. are warm, their median is reported.
Only the backend's request methods (`loglikelihood`, `loglikelihood_rolling`, `generate_until`, wrapped on the
instance) are timed, so lm-eval's task building and environment report (~1 s per `simple_evaluate`) are not;
the whole `simple_evaluate` is reported beside. A request is one call lm-eval makes of the backend (a
multiple-choice document is one per choice). For ours, the time splits into the jitted `score_positions`
calls (blocked on), `sampler.rollout`, and the rest (tokenisation, batching, bookkeeping on the host); the
compiled programs are counted from the jit caches. The last round's per-request outputs (`log_samples`) are
compared so the speeds are known to be of equal work: the largest |delta| of a log-likelihood, whether
acc / acc_norm / exact_match and every generated text are identical.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import jax

from benchmarks.common import cpu_model, cpu_threads, markdown_table
from ministral_jax.checkpoint import convert, orbax_io
from ministral_jax.data import tokenizers
from ministral_jax.model import config, transformer
from ministral_jax.model.config import ModelConfig, param_count

MAX_LEN = 256
SHORT = {"mj_code_mc": "mc", "mj_code_line": "line", "mj_code_ppl": "ppl"}
EXACT = ("acc,none", "acc_norm,none", "exact_match,none")  # metrics that must be identical


class Clock:
  """Seconds and counts per (backend, round, task, what); `at` is the (backend, round, task) now running."""

  def __init__(self) -> None:
    self.at: tuple = ()
    self.s: dict[tuple, float] = collections.defaultdict(float)
    self.n: dict[tuple, int] = collections.defaultdict(int)
    self._busy = False

  def time(self, fn: Callable, what: str, block: bool = False) -> Callable:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
      start = time.perf_counter()
      try:
        out = fn(*args, **kwargs)
        return jax.block_until_ready(out) if block else out
      finally:
        self.s[(*self.at, what)] += time.perf_counter() - start
    return call

  def requests(self, lm: Any) -> Any:
    """Times `lm`'s request methods, outermost calls only, and counts the requests they get."""
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
      timed = self.time(getattr(lm, name), "requests")

      def call(reqs: list, *args: Any, _timed: Callable = timed, _plain: Callable = getattr(lm, name),
               **kwargs: Any) -> Any:
        if self._busy:
          return _plain(reqs, *args, **kwargs)
        self._busy = True
        self.n[(*self.at, "requests")] += len(reqs)
        try:
          return _timed(reqs, *args, **kwargs)
        finally:
          self._busy = False
      setattr(lm, name, call)
    return lm


def build_checkpoints(preset: str, out: str) -> tuple[str, str, ModelConfig]:
  """-> (orbax dir, HF dir, config): one random model, the HF export shipping tekken.json."""
  tok = tokenizers.load_tokenizer("tekken")
  cfg = ModelConfig(**{**config.preset_dict(preset), "vocab_size": tok.vocab_size, "max_seq_len": MAX_LEN,
                       "dtype": "float32"})
  params = transformer.init_params(cfg, jax.random.key(0))
  orbax_io.save_params(f"{out}/orbax", params, cfg, extra_metadata={"tokenizer": tok.identity()})
  convert.convert("orbax", "hf", f"{out}/orbax", f"{out}/hf")
  return f"{out}/orbax", f"{out}/hf", cfg


def agreement(mine: dict, theirs: dict, task: str) -> dict[str, Any]:
  """Per-request and metric agreement of two `simple_evaluate` results (log_samples=True) on `task`."""
  worst, texts, same_texts, greedy_diff = 0.0, 0, 0, 0
  pairs = zip(sorted(mine["samples"][task], key=lambda s: s["doc_id"]),
              sorted(theirs["samples"][task], key=lambda s: s["doc_id"]))
  for a, b in pairs:
    for x, y in zip(a["resps"], b["resps"]):
      x, y = x[0], y[0]
      if isinstance(x, str):
        texts, same_texts = texts + 1, same_texts + (x == y)
      elif isinstance(x, (list, tuple)):
        worst, greedy_diff = max(worst, abs(x[0] - y[0])), greedy_diff + (bool(x[1]) != bool(y[1]))
      else:
        worst = max(worst, abs(x - y))
  ra, rb = mine["results"][task], theirs["results"][task]
  metrics = {k: (ra[k], rb[k]) for k in ra if k in rb and isinstance(ra[k], (int, float))
             and "stderr" not in k and k != "sample_len"}
  return dict(max_abs_delta=worst, greedy_flags_differ=greedy_diff, texts=texts, same_texts=same_texts,
              metrics=metrics, exact_equal=all(ra[k] == rb[k] for k in EXACT if k in ra))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="tiny", help="model preset (config.preset_dict)")
  parser.add_argument("--docs", type=int, default=64, help="test documents per task")
  parser.add_argument("--batch", type=int, default=8, help="batch_size of both backends")
  parser.add_argument("--rounds", type=int, default=2, help="passes over the tasks; the first is cold (>= 2)")
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args()
  if args.rounds < 2:
    parser.error("--rounds must be at least 2 (a cold and a warm pass)")
  start = time.perf_counter()
  tmp = tempfile.TemporaryDirectory()
  os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=f"{tmp.name}/hf_home")
  import lm_eval
  import torch
  import transformers
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager
  from ministral_jax.eval import harness_model, harness_tasks
  from ministral_jax.sample import sampler
  threads = cpu_threads()
  torch.set_num_threads(threads)

  orbax_dir, hf_dir, cfg = build_checkpoints(args.preset, tmp.name)
  manager = TaskManager(include_path=str(harness_tasks.write(f"{tmp.name}/tasks", n=args.docs)),
                        include_defaults=False)
  clock = Clock()
  loaded = time.perf_counter()
  models = {"ours": clock.requests(harness_model.MinistralLM(checkpoint=orbax_dir, batch_size=args.batch,
                                                             mesh="data=-1", show_progress=False))}
  load_s = {"ours": time.perf_counter() - loaded}
  loaded = time.perf_counter()
  models["hf"] = clock.requests(HFLM(pretrained=hf_dir, batch_size=args.batch, device="cpu", dtype="float32",
                                     max_length=MAX_LEN))
  load_s["hf"] = time.perf_counter() - loaded
  score, rollout = harness_model.score_positions, sampler.rollout
  programs = lambda: (score._cache_size(), getattr(sampler._rollout, "_cache_size", lambda: -1)())
  harness_model.score_positions = clock.time(score, "score", block=True)
  sampler.rollout = clock.time(rollout, "rollout")
  results: dict[tuple[str, str], dict] = {}
  try:
    for r in range(args.rounds):
      for backend, lm in models.items():
        for task in harness_tasks.TASKS:
          clock.at, before = (backend, r, task), programs()
          begun = time.perf_counter()
          results[(backend, task)] = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager,
                                                             bootstrap_iters=0, log_samples=True, verbosity="ERROR")
          clock.s[(backend, r, task, "evaluate")] = time.perf_counter() - begun
          clock.n[(backend, r, task, "programs")] = sum(programs()) - sum(before)
  finally:
    harness_model.score_positions, sampler.rollout = score, rollout

  warm = range(1, args.rounds)
  cold_s = lambda b, t, what="requests": clock.s[(b, 0, t, what)]
  warm_s = lambda b, t, what="requests": statistics.median(clock.s[(b, r, t, what)] for r in warm)
  per_s = lambda n, s: f"{n / s:,.1f}" if s else "-"
  speed, split, agree, report = [], [], [], {}
  for task in (*harness_tasks.TASKS, "total"):
    names = harness_tasks.TASKS if task == "total" else (task,)
    n, n_hf = (sum(clock.n[(b, 0, t, "requests")] for t in names) for b in models)
    s = {(b, w): sum(f(b, t) for t in names) for b in models for w, f in (("cold", cold_s), ("warm", warm_s))}
    ev = {b: sum(warm_s(b, t, "evaluate") for t in names) for b in models}
    speed.append([SHORT.get(task, task), str(n) if n == n_hf else f"{n} (HF {n_hf})"] + [f"{s[(b, w)]:.2f}" for b, w in
                  (("ours", "cold"), ("ours", "warm"), ("hf", "cold"), ("hf", "warm"))]
                 + [per_s(n, s[("ours", "warm")]), per_s(n, s[("hf", "warm")]),
                    f"{s[('ours', 'warm')] / s[('hf', 'warm')]:.2f}", f"{s[('ours', 'cold')] / s[('hf', 'cold')]:.2f}",
                    f"{ev['ours']:.2f} / {ev['hf']:.2f}"])
    for w, f in (("cold", cold_s), ("warm", warm_s)):
      parts = {what: sum(f("ours", t, what) for t in names) for what in ("score", "rollout")}
      programs_built = sum(clock.n[("ours", r, t, "programs")] for t in names
                           for r in ([0] if w == "cold" else warm))
      split.append([SHORT.get(task, task), w, f"{s[('ours', w)]:.2f}", f"{parts['score']:.2f}",
                    f"{parts['rollout']:.2f}", f"{s[('ours', w)] - parts['score'] - parts['rollout']:.2f}",
                    str(programs_built)])
    if task != "total":
      a = agreement(results[("ours", task)], results[("hf", task)], task)
      shown = ", ".join(f"{k.split(',')[0]} {x:.4g} / {y:.4g}" for k, (x, y) in a["metrics"].items())
      agree.append([SHORT[task], f"{a['max_abs_delta']:.2e}" if a["texts"] == 0 else "-",
                    str(a["greedy_flags_differ"]), f"{a['same_texts']}/{a['texts']}" if a["texts"] else "-",
                    "yes" if a["exact_equal"] else "NO", shown])
      report[task] = dict(requests=n, agreement=a)
    report.setdefault(task, {}).update(seconds={f"{b}_{w}": v for (b, w), v in s.items()}, evaluate_warm=ev)

  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  print(f"Machine: {cpu_model()}, {threads} cores, load average {load} (1, 5, 15 min); JAX backend "
        f"{jax.default_backend()}, {jax.device_count()} device(s); torch {threads} threads")
  print(f"Versions: jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"lm_eval {lm_eval.__version__}")
  print(f"Model: random {args.preset!r}, {param_count(cfg) / 1e6:.2f}M params, Tekken vocab {cfg.vocab_size}, "
        f"max_length {MAX_LEN}, fp32 both sides; {args.docs} docs per task, batch {args.batch}, {args.rounds} rounds "
        f"(warm: median of {args.rounds - 1}); backend load {load_s['ours']:.1f} s ours, {load_s['hf']:.1f} s HF")
  print("\nRequest-method seconds (lm-eval's own work excluded); ratios are ours s / HF s (< 1: ours faster)\n")
  print(markdown_table(["task", "requests", "ours cold s", "ours warm s", "HF cold s", "HF warm s",
                        "ours warm req/s", "HF warm req/s", "ours/HF warm", "ours/HF cold",
                        "simple_evaluate warm s ours / HF"], speed))
  print("\nWhere our time goes (score: jitted score_positions calls; rollout: sampler.rollout; rest: host side)\n")
  print(markdown_table(["task", "pass", "ours s", "score s", "rollout s", "rest s", "programs compiled"], split))
  print("\nAgreement, last round (ours vs HF)\n")
  print(markdown_table(["task", "max abs Δ loglik", "greedy flags differing", "same generations",
                        "acc / exact_match identical", "metrics ours / HF"], agree))
  elapsed = time.perf_counter() - start
  print(f"\nTotal time {elapsed:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), threads=threads, load_seconds=load_s, tasks=report,
                     raw={"/".join(map(str, k)): v for k, v in clock.s.items()}, total_seconds=elapsed), f,
                indent=2, default=str)
  tmp.cleanup()


if __name__ == "__main__":
  main()
