"""The cascade's report: one table and one plot a researcher reads at a glance.

    report.md      model; layers, d_model, d_ffn; parameters; tokens seen; eval loss on the
                   eval split and on every `eval.files` entry (and at the long context, when a
                   stage has one); then, per stage, the child against its from-scratch baseline
    report.json    the same numbers
    eval_loss.png  periodic eval loss against the tokens each model trained on: the parent, each
                   child from its pruned start (0 tokens), each baseline from scratch
    evals.json     the evaluations done so far (a resumed report does not redo them)

"tokens seen" counts a model's own training: a child's distillation tokens
(short + long stage), not the parent's pretraining that it inherits.
"""

from __future__ import annotations

import io
import json
from typing import Any

import ml_collections
from etils import epath

from ministral_jax import files
from ministral_jax.checkpoint import convert
from ministral_jax.data import tokenizers
from ministral_jax.eval import task as eval_task
from ministral_jax.model.config import ModelConfig, param_count


def _eval_cfg(cfg: ml_collections.ConfigDict, seq_len: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"data": {**cfg.data.to_dict(), "seq_len": seq_len}, "eval": cfg.eval.to_dict(),
                                    "loss": cfg.loss.to_dict()})


def _curve(workdir: str, tokens_per_step: int, offset: int = 0) -> list[tuple[int, float]]:
  path = epath.Path(workdir) / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
  return [(offset + r["step"] * tokens_per_step, r["eval_loss"]) for r in rows if "eval_loss" in r]


def _non_embedding(cfg: ModelConfig) -> int:
  return param_count(cfg) - cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)


def write(cfg: ml_collections.ConfigDict, root: epath.Path, plan: list, runs: dict, pruned: dict,
          partitioner) -> dict[str, Any]:
  tokenizer = tokenizers.load_tokenizer(cfg.data.tokenizer)
  long_len = cfg.long.seq_len if any(s.long for s in plan) else 0
  evals_file = root / "evals.json"
  evals = json.loads(evals_file.read_text()) if evals_file.exists() else {}

  def evaluate(name: str, path: str, model: ModelConfig, batches: int | None = None) -> dict[str, float]:
    """Every eval source the config names, computed once per model (an added eval file is computed for
    each model on the next run; the others come from evals.json)."""
    key = f"{name}@{batches}"
    done = evals.setdefault(key, {})
    wanted = ["eval_split"] + [f for f in cfg.eval.files.split(",") if f]
    missing = [w for w in wanted if w not in done] + ([f"eval_split@{long_len}"] if long_len and
                                                      f"eval_split@{long_len}" not in done else [])
    if missing:
      params, _ = convert.load_any(path, partitioner, model)
      short_missing = [m for m in missing if not m.startswith("eval_split@")]
      if short_missing:
        done.update(eval_task.evaluate(params, model, _eval_cfg(cfg, cfg.data.seq_len), tokenizer, partitioner,
                                       batches, only=short_missing))
      if long_len and f"eval_split@{long_len}" in missing:
        done[f"eval_split@{long_len}"] = eval_task.evaluate(
            params, model, _eval_cfg(cfg, long_len), tokenizer, partitioner, batches, only=["eval_split"])["eval_split"]
      files.write_json(evals_file, evals)
    return {w: done[w] for w in wanted + ([f"eval_split@{long_len}"] if long_len else [])}

  parent = runs["parent"].model
  rows = [("parent", runs["parent"])]
  for s in plan:
    rows.append((f"{s.name} (pruned, before distillation)", None))
    rows += [(name, runs[name]) for name in (f"{s.name}/short", f"{s.name}/long") if name in runs]
  rows += [(name, run) for name, run in runs.items() if name.startswith("baseline_")]
  results = {}
  stage_of = {s.name: s for s in plan}
  for label, run in rows:
    if run is None:
      stage = stage_of[label.split(" ")[0]]
      model, path, tokens, start = stage.short, pruned[stage.name], 0, None
    else:
      model, path, tokens, start = run.model, run.path, run.tokens, run.start_document
    losses = evaluate(label, path, model)
    results[label] = {"n_layers": model.n_layers, "d_model": model.d_model, "d_ffn": model.d_ffn,
                      "params": param_count(model), "non_embedding_params": _non_embedding(model),
                      "tokens": tokens, "start_document": start, "loss": losses}
  md = _markdown(results, parent)
  summary = _summary(plan, runs, results)
  text = (f"# Cascade report\n\nParent: {runs['parent'].path}. Eval loss is the mean next-token loss on the "
          f"built-in eval split at {cfg.data.seq_len} tokens (and on every extra file); tokens seen count each "
          f"model's own training.\n\n{md}\n\n{summary}\n")
  report = {"rows": results, "summary": summary}
  files.write_json(root / "report.json", report)
  files.write_text(root / "report.md", text)
  _plot(root, cfg, plan, runs, pruned, evaluate)
  print(text, flush=True)
  return report


def _markdown(results: dict, parent: ModelConfig) -> str:
  names = list(next(iter(results.values()))["loss"])
  head = ["model", "layers", "d_model", "d_ffn", "parameters", "non-embedding vs parent", "tokens seen"]
  head += [f"loss: {n}" for n in names] + ["vs parent"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  base = results["parent"]["loss"][names[0]]
  for label, r in results.items():
    share = r["non_embedding_params"] / _non_embedding(parent)
    cells = [label, r["n_layers"], r["d_model"], r["d_ffn"], f"{r['params']:,}", f"{share:.0%}", f"{r['tokens']:,}"]
    cells += [f"{r['loss'][n]:.4f}" for n in names] + [f"{r['loss'][names[0]] - base:+.4f}"]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines)


def _summary(plan: list, runs: dict, results: dict) -> str:
  """Per stage: the released child against its baseline at equal tokens, and both against the parent."""
  parent = results["parent"]["loss"]["eval_split"]
  lines = []
  for s in plan:
    child = f"{s.name}/long" if f"{s.name}/long" in results else f"{s.name}/short"
    base = f"baseline_{s.name}"
    if base not in results:
      continue
    c, b = results[child]["loss"]["eval_split"], results[base]["loss"]["eval_split"]
    verdict = "below" if c < b else "NOT below"
    lines.append(f"- {s.name}: the child's eval loss {c:.4f} is {verdict} the from-scratch baseline's {b:.4f} "
                 f"({c - b:+.4f}) after {results[child]['tokens']:,} / {results[base]['tokens']:,} tokens; from the "
                 f"parent ({parent:.4f}): child {c - parent:+.4f}, baseline {b - parent:+.4f}.")
  return "\n".join(lines)


def _plot(root: epath.Path, cfg, plan, runs, pruned, evaluate) -> None:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  short_step = cfg.train.global_batch * cfg.data.seq_len
  fig, ax = plt.subplots(figsize=(8, 5))
  if runs["parent"].workdir:
    ax.plot(*zip(*_curve(runs["parent"].workdir, short_step) or [(0, float("nan"))]), "k-", label="parent")
  for i, s in enumerate(plan):
    color = f"C{i}"
    start = evaluate(f"{s.name} (pruned, before distillation)", pruned[s.name], s.short, cfg.train.eval_batches)
    points = [(0, start["eval_split"])] + _curve(runs[f"{s.name}/short"].workdir, short_step)
    ax.plot(*zip(*points), "-", color=color, marker=".", label=f"{s.name} (distilled)")
    if f"{s.name}/long" in runs:
      long_step = cfg.long.global_batch * cfg.long.seq_len
      offset = s.short_steps * short_step
      curve = _curve(runs[f"{s.name}/long"].workdir, long_step, offset)
      if curve:
        ax.plot(*zip(*curve), ":", color=color, marker=".", label=f"{s.name} long stage (eval at {cfg.long.seq_len})")
    if f"baseline_{s.name}" in runs:
      curve = _curve(runs[f"baseline_{s.name}"].workdir, short_step)
      if curve:
        ax.plot(*zip(*curve), "--", color=color, marker="x", label=f"{s.name} shape from scratch")
  ax.set_xlabel("tokens trained on (own training)")
  ax.set_ylabel(f"eval loss ({cfg.train.eval_batches} eval batches)")
  ax.set_title("Cascade distillation vs training from scratch")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  files.write_text(root / "eval_loss.png", buf.getvalue())
