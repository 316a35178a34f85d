"""What every launcher shares: the job command, one job per sweep point, dry runs, the sweep summary."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from typing import Any, Sequence

from ministral_jax import sweep


def main_command(config: str, workdir: str, overrides: Sequence[str] = (), python: str = "python") -> list[str]:
  return [python, "-m", "ministral_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


def join_path(base: str, name: str) -> str:
  """`base/name` for local paths and gs:// URLs alike (never through pathlib, which would turn gs:// into gs:/)."""
  return base.rstrip("/") + "/" + name


def jobs(config: str, workdir: str, extra: Sequence[str]) -> list[tuple[str, str, list[str]]]:
  """(name, workdir, overrides) per point of the config's sweep: one job at `workdir` when it declares
  none, else one per point at `workdir/<its overrides>`."""
  points = sweep.load_points(config)
  if points == [{}]:
    return [("default", workdir, list(extra))]
  return [(sweep.run_name(p), join_path(workdir, sweep.run_name(p)), sweep.flags(p) + list(extra)) for p in points]


class Runner:
  """Runs commands, or only prints them (`--dry_run`): the exact command lines, one per line."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def __call__(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
    print(("" if self.dry_run else "+ ") + prefix + shlex.join(cmd), flush=True)
    if not self.dry_run:
      import os
      subprocess.run(list(cmd), check=True, env={**os.environ, **(env or {})})


def parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dry_run", action="store_true", help="print the exact commands instead of running them")
  return p


def add_job_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True, help="configs/<experiment>.py[:arg]; its get_hyper, if any, is the sweep")
  p.add_argument("--workdir", required=True, help="the job's workdir, or the sweep's base (one sub-directory per point)")
  p.add_argument("overrides", nargs="*", help="extra --config.<field>=<value> flags for every job (after --)")


def summarize(workdir: str) -> dict[str, Any]:
  """The final numbers of a finished job, read from what it wrote (trainers, cascade, eval)."""
  from etils import epath
  path = epath.Path(workdir)
  out: dict[str, Any] = {}
  if (path / "metrics.jsonl").exists():
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
    for key in ("step", "loss", "eval_loss"):
      values = [r[key] for r in rows if key in r]
      if values:
        out[key] = values[-1]
  if (path / "report.json").exists():  # a cascade: each released child and baseline
    for name, row in json.loads((path / "report.json").read_text())["rows"].items():
      if "pruned" not in name and name != "parent":
        out[f"eval_loss {name}"] = row["loss"]["eval_split"]
  if (path / "eval.json").exists():
    for name, r in json.loads((path / "eval.json").read_text())["results"].items():
      out[f"eval_loss {name}"] = r["loss"]
  return out


def write_summary(workdir: str, rows: list[tuple[str, dict[str, Any]]]) -> str:
  """`<workdir>/sweep.md` and `sweep.json`: one row per point."""
  from ministral_jax import files
  keys = list(dict.fromkeys(k for _, r in rows for k in r))
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  lines = ["| point | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
  lines += ["| " + name + " | " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for name, r in rows]
  table = "\n".join(lines)
  files.write_text(join_path(workdir, "sweep.md"), table + "\n")
  files.write_json(join_path(workdir, "sweep.json"), dict(rows))
  return table


def run_jobs(args: argparse.Namespace, env: dict[str, str] | None = None, python: str = sys.executable) -> None:
  """Every point of the config's sweep, one after the other on this host; then the summary."""
  run = Runner(args.dry_run)
  todo = jobs(args.config, args.workdir, args.overrides)
  for _, workdir, overrides in todo:
    run(main_command(args.config, workdir, overrides, python), env)
  if len(todo) > 1 and not args.dry_run:
    print(write_summary(args.workdir, [(name, summarize(workdir)) for name, workdir, _ in todo]))
