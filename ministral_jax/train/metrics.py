"""Metrics to the console, TensorBoard (`<workdir>/tb`) and `<workdir>/metrics.jsonl`.

The JSONL file is the run's loss history. On resume it is cut back to the
restored step, so a job that was killed and restarted ends with the same
history as one that never stopped; a line cut short by the kill is dropped
there. Only process 0 writes; every process reads the kept history, so
decisions taken from it (an eval a kill cut off) are the same on every host.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
from etils import epath

from ministral_jax import files


def tensorboard_dir(workdir: str) -> str:
  """`<workdir>/tb`, as the string TensorBoard gets: a gs:// workdir stays gs:// (tensorboardX writes
  there through google-cloud-storage, the `gcs` extra)."""
  return str(epath.Path(workdir) / "tb")


class MetricsWriter:
  def __init__(self, workdir: str, resume_step: int, prefix: str = ""):
    self.enabled = jax.process_index() == 0
    self.prefix = prefix + " " if prefix else ""
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.tb = None
    self.kept = self._history_until(resume_step)  # on every process: the workdir is shared
    if not self.enabled:
      return
    files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.kept))
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(tensorboard_dir(workdir))

  def _history_until(self, resume_step: int) -> list[dict]:
    if not self.path.exists():
      return []
    kept = []
    lines = [line for line in self.path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
      try:
        row = json.loads(line)
        step = int(row["step"])
      except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        if i != len(lines) - 1:  # a kill cuts only the last line; anything else deserves a word
          logging.warning("%s line %d is not a metrics record; dropped it.", self.path, i + 1)
        continue
      if step <= resume_step:
        kept.append(row)
    return kept

  def logged(self, step: int, key: str) -> bool:
    """Whether the kept history has `key` at `step` (e.g. an eval a kill cut off)."""
    return any(r.get("step") == step and key in r for r in self.kept)

  def write(self, step: int, values: dict[str, Any], console: bool = False) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, **values}) + "\n")
    for key, value in values.items():
      if isinstance(value, (int, float)):
        self.tb.add_scalar(key, value, step)
    if console:
      print(f"{self.prefix}step {step}: " + ", ".join(_fmt(k, v) for k, v in values.items()), flush=True)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _fmt(key: str, value: Any) -> str:
  if isinstance(value, float):
    return f"{key}={value:.4g}"
  return f"{key}={value}"


class Throughput:
  """Tokens/s, MFU and ETA over the steps since the last report.

  `flops_after` is the work that follows this job (the rest of a cascade), in
  FLOPs; with it, `total_eta_min` extrapolates this job's achieved FLOP/s to
  everything left. `job_flops_per_token` counts all the job's matmuls (a
  distillation adds its teacher's forward); MFU counts the model's own.
  """

  def __init__(self, flops_per_token: float, peak_flops: float | None, total_steps: int,
               job_flops_per_token: float | None = None, flops_after: float = 0.0):
    self.flops_per_token, self.peak, self.total = flops_per_token, peak_flops, total_steps
    self.job_flops_per_token = job_flops_per_token or flops_per_token
    self.flops_after = flops_after
    self.t0, self.step0 = time.perf_counter(), None

  def start(self, step: int) -> None:
    self.t0, self.step0 = time.perf_counter(), step

  def report(self, step: int, tokens_per_step: int) -> dict[str, float]:
    elapsed = time.perf_counter() - self.t0
    steps = step - self.step0
    out: dict[str, float] = {}
    if steps > 0 and elapsed > 0:
      tokens_per_s = steps * tokens_per_step / elapsed
      out["tokens_per_s"] = tokens_per_s
      out["eta_min"] = (self.total - step) * elapsed / steps / 60
      if self.flops_after:
        achieved = tokens_per_s * self.job_flops_per_token
        out["total_eta_min"] = out["eta_min"] + self.flops_after / achieved / 60
      if self.peak:
        out["mfu"] = tokens_per_s * self.flops_per_token / self.peak
    self.start(step)
    return out


# bf16 dense peak FLOP/s per device, by jax device_kind prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
  """Published bf16 peak of this accelerator (or the config's override); None on CPU."""
  if override:
    return override
  kind = jax.devices()[0].device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops
  return None
