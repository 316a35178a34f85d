"""Metrics to the console, TensorBoard (`<workdir>/tb`) and `<workdir>/metrics.jsonl`.

The JSONL file is the run's loss history. On resume it is cut back to the
restored step, so a job that was killed and restarted ends with the same
history as one that never stopped. Only process 0 writes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
from etils import epath


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
    if not self.enabled:
      return
    self._truncate(resume_step)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(tensorboard_dir(workdir))

  def _truncate(self, resume_step: int) -> None:
    if not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line and json.loads(line)["step"] <= resume_step]
    self.path.write_text("".join(line + "\n" for line in kept))

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
  """Tokens/s, MFU and ETA over the steps since the last report."""

  def __init__(self, flops_per_token: float, peak_flops: float | None, total_steps: int):
    self.flops_per_token, self.peak, self.total = flops_per_token, peak_flops, total_steps
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
