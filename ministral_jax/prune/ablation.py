"""Task `prune_ablation`: one parent, one target, every scorer; the eval loss of each child before distillation.

    python -m ministral_jax.main --config=configs/prune_tiny.py --config.task=prune_ablation --workdir=DIR

The parent is calibrated once with every statistic any scorer reads. Then
each variant changes one choice of the configured pass (`prune`) and prunes
the parent with it: every other layer scorer, every other hidden scorer,
every other FFN scorer, re-calibration on or off, and, for a tied child of an
untied parent, every `tie_init`. Each child is evaluated on the eval split of
`data` (and every file in `eval.files`) and thrown away. Written to the workdir:

    ablation.md    the Markdown table
    ablation.json  the same rows; finished rows are kept, so a killed run resumes where it stopped
"""

from __future__ import annotations

import json

import ml_collections
from etils import epath

from ministral_jax import files
from ministral_jax.checkpoint import convert
from ministral_jax.errors import UserError
from ministral_jax.eval import task as eval_task
from ministral_jax.model.config import ModelConfig
from ministral_jax.prune import calibration, pruner, rewrite, scorers
from ministral_jax.prune import task as prune_task

def variants(pcfg: ml_collections.ConfigDict, parent: ModelConfig, target: ModelConfig) -> list[tuple[str, dict]]:
  """(label, overrides of `prune`): the configured pass, then one change at a time."""
  steps = pruner.steps_of(pcfg)
  out = [(f"configured ({', '.join(pcfg[pruner.SCORER_FIELD[s]] for s in steps)})", {})]
  for step in steps:
    field = pruner.SCORER_FIELD[step]
    out += [(f"{step}: {name}", {field: name}) for name in scorers.SCORERS[step] if name != pcfg[field]]
  out.append((f"recalibrate={not pcfg.recalibrate}", {"recalibrate": not pcfg.recalibrate}))
  if target.tie_embeddings and not parent.tie_embeddings:
    out += [(f"tie_init: {t}", {"tie_init": t}) for t in rewrite.TIE_INITS if t != pcfg.tie_init]
  return out


def table(rows: list[dict], parent_row: dict) -> str:
  names = list(parent_row["loss"])
  head = "| variant | layers removed | hidden energy kept | " + " | ".join(f"loss: {n}" for n in names) + \
         " | vs parent |"
  lines = [head, "|" + "---|" * (4 + len(names))]
  lines.append("| parent | | | " + " | ".join(f"{parent_row['loss'][n]:.4f}" for n in names) + " | |")
  for r in rows:
    energy = r.get("energy_kept")
    lines.append(f"| {r['variant']} | {r.get('removed', '')} | {'' if energy is None else f'{energy:.6f}'} | "
                 + " | ".join(f"{r['loss'][n]:.4f}" for n in names)
                 + f" | {r['loss'][names[0]] - parent_row['loss'][names[0]]:+.4f} |")
  return "\n".join(lines)


def run(cfg: ml_collections.ConfigDict, workdir: str, partitioner=None) -> dict:
  job = prune_task.prepare(cfg, workdir, partitioner)
  tokenizer = job.tokenizer
  out = epath.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  state_file = out / "ablation.json"
  state = json.loads(state_file.read_text()) if state_file.exists() else {}
  if state and state.get("job") != json.loads(json.dumps(job.identity)):
    raise UserError(f"{state_file} belongs to a different ablation. Use a new --workdir.")
  state.setdefault("job", job.identity)
  state.setdefault("rows", {})
  params, parent_cfg = convert.load_any(cfg.prune.parent, job.partitioner)
  if "parent" not in state:
    state["parent"] = {"loss": eval_task.evaluate(params, parent_cfg, cfg, tokenizer, job.partitioner)}
    files.write_json(state_file, state)
  wanted = sorted({n for key in scorers.NEEDS for n in scorers.NEEDS[key]})
  stats = None
  for label, overrides in variants(cfg.prune, parent_cfg, job.target):
    if label in state["rows"]:
      continue
    pcfg = ml_collections.ConfigDict({**cfg.prune.to_dict(), **overrides})
    if stats is None and not pcfg.recalibrate:
      stats = calibration.calibrate(params, parent_cfg.replace(dtype=pcfg.calibration_dtype), job.batches(),
                                    job.partitioner, wanted)
    result = pruner.prune(params, parent_cfg, job.target, pcfg, job.batches, job.partitioner,
                          parent_stats=None if pcfg.recalibrate else stats)
    row = {"variant": label, "overrides": overrides,
           "removed": result.report.get("layers", {}).get("removed", ""),
           "energy_kept": result.report.get("hidden", {}).get("energy_kept"),
           "loss": eval_task.evaluate(result.params, result.cfg, cfg, tokenizer, job.partitioner)}
    state["rows"][label] = row
    files.write_json(state_file, state)
    print(f"{label}: eval loss {row['loss']['eval_split']:.4f}")
  md = table(list(state["rows"].values()), state["parent"])
  text = (f"Parent {cfg.prune.parent} ({parent_cfg.n_layers} layers, d_model {parent_cfg.d_model}, d_ffn "
          f"{parent_cfg.d_ffn}) -> target ({job.target.n_layers}, {job.target.d_model}, {job.target.d_ffn}); "
          f"eval loss before any distillation.\n\n{md}\n")
  files.write_text(out / "ablation.md", text)
  print(text)
  return state
