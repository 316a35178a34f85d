"""The post-training report: one table and one plot per pipeline.

    report.md      per stage model: held-out accuracy, win rate against the recipe's SFT model by the stated
                   rule, mean length, truncation and loop rates, and the preference pairs it trained on; then
                   the PWRM's held-out accuracy and calibration (ECE before and after the temperature)
    report.json    the same numbers
    posttrain.png  the four rates per stage, grouped by recipe

Every stage's model answers its recipe's held-out prompts (the SFT job's eval split) greedily, at
`posttrain.report.max_new_tokens`, so the numbers are a function of the final params alone: a resumed
pipeline reports exactly what an uninterrupted one does.
"""

from __future__ import annotations

import io
import json
from typing import Any

import jax
import ml_collections
from etils import epath

from ministral_jax import files, sharding
from ministral_jax.checkpoint import convert
from ministral_jax.data import chat, tokenizers
from ministral_jax.eval import responses
from ministral_jax.rewards import math_verifier, pwrm
from ministral_jax.train import grpo

COLUMNS = ("accuracy", "win_rate", "mean_length", "truncated", "loop_rate")


def _pairs(cfg: ml_collections.ConfigDict, name: str) -> int:
  job = {"instruct/odpo": "odpo", "reasoning/odpo": "odpo", "instruct/dpo": "odpo"}.get(name)
  return cfg.jobs[job].train.steps * cfg.jobs[job].train.global_batch if job else 0


def write(cfg: ml_collections.ConfigDict, root: epath.Path, models: dict[str, str], pwrm_path: str) -> dict[str, Any]:
  r = cfg.posttrain.report
  partitioner = sharding.Partitioner.from_config(cfg.jobs.instruct_sft.mesh)
  results: dict[str, dict] = {}
  answers: dict[str, responses.Answers] = {}
  with math_verifier.VerifierPool() as verifier:
    for name, path in models.items():
      recipe = name.split("/")[0]
      tokenizer = tokenizers.load_tokenizer(convert.recorded_tokenizer(path)["source"])
      conversations = chat.read_conversations(str(root / recipe / "sft" / "data" / "eval.jsonl"))
      items = [grpo.prompt_of(c, tokenizer) for c in conversations][:r.eval_problems]
      params, model_cfg = convert.load_any(path, partitioner)
      with partitioner.activate():
        answers[name] = responses.respond(params, model_cfg, [i.ids for i in items], [i.reference for i in items],
                                          tokenizer, r.max_new_tokens, r.batch, verifier, r.loop)
      results[name] = {**responses.summary(answers[name], answers.get(f"{recipe}/sft")), "pairs": _pairs(cfg, name)}
  calibration = {}
  if pwrm_path:
    calibration = json.loads((epath.Path(pwrm_path).parent / pwrm.CALIBRATION_FILE).read_text())
  out = {"stages": results, "pwrm": calibration, "eval_problems": r.eval_problems,
         "max_new_tokens": r.max_new_tokens}
  if jax.process_index() == 0:
    files.write_json(root / "report.json", out)
    files.write_text(root / "report.md", _markdown(out))
    _plot(root, results)
    print(f"[posttrain] report: {root / 'report.md'}\n{_markdown(out)}", flush=True)
  return out


def _markdown(out: dict) -> str:
  lines = [f"Held-out prompts: {out['eval_problems']} per recipe, answered greedily (at most {out['max_new_tokens']} "
           "tokens). Win rate: against the recipe's SFT model by the stated rule (a tie counts 1/2).", "",
           "| stage | accuracy | win rate vs SFT | mean length | truncated | loop rate | preference pairs |",
           "|---|---|---|---|---|---|---|"]
  for name, s in out["stages"].items():
    win = f"{s['win_rate']:.3f}" if "win_rate" in s else "—"
    lines.append(f"| {name} | {s['accuracy']:.3f} | {win} | {s['mean_length']:.1f} | {s['truncated']:.3f} | "
                 f"{s['loop_rate']:.3f} | {s['pairs'] or '—'} |")
  c = out["pwrm"]
  if c:
    lines += ["", f"PWRM on {c['eval_pairs']} held-out pairs: pairwise accuracy {c['accuracy']:.3f}; fitted temperature "
              f"{c['temperature']:.4g}; expected calibration error {c['ece_before']:.3f} before, {c['ece_after']:.3f} "
              f"after; log-loss {c['nll_before']:.3f} -> {c['nll_after']:.3f}."]
  return "\n".join(lines) + "\n"


def _plot(root: epath.Path, results: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  rates = ("accuracy", "win_rate", "truncated", "loop_rate")
  names = list(results)
  fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
  width = 0.8 / len(rates)
  for k, rate in enumerate(rates):
    ax.bar([i + k * width for i in range(len(names))], [results[n].get(rate, float("nan")) for n in names],
           width, label=rate.replace("_", " "))
  ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20, fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.set_title("Post-training stages on held-out prompts")
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  files.write_text(root / "posttrain.png", buf.getvalue())
