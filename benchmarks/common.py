"""Helpers shared by the benchmarks: one timing loop, the machine, a Markdown table."""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Sequence


def time_calls(fns: dict[Any, Callable[[], Any]], steps: int, warmup: int = 1) -> dict[Any, list[float]]:
  """Seconds per call of each zero-argument callable, `steps` timings each.

  Every callable must block until its work is done (`jax.block_until_ready`).
  All callables are first warmed up (`warmup` untimed calls: JIT compilation,
  allocator and thread-pool start-up), then timed round-robin, one call of
  each per round, so that a slow phase of a shared machine hits every
  callable alike instead of whichever happened to be running.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times: dict[Any, list[float]] = {name: [] for name in fns}
  for _ in range(steps):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def cpu_threads() -> int:
  """The cores this process may run on: the size of XLA's CPU intra-op thread pool."""
  return len(os.sched_getaffinity(0))


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)
