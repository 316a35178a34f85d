"""Grades math answers by mathematical equivalence (math-verify), in worker processes that can be killed.

The reward for a math problem is whether the response's final \\boxed{}
answer equals the gold one as mathematics: 1/2, 0.5 and \\frac{1}{2} are the
same answer, so string matching would punish correct responses. math-verify
(sympy underneath) decides that, but a sampled answer such as 10^{10^{10}}
can make sympy run for minutes, and math-verify's own timeouts are SIGALRM
alarms that only work in a main thread and replace any alarm the caller set.

So grading runs in worker processes, each on its own main thread:
  - started with the `spawn` method: forking a process that runs JAX threads
    can deadlock the child;
  - per item, an alarm in the worker stops slow Python (the item is False);
    if the worker does not answer shortly after, it is killed and replaced
    (the item is False) and the pool carries on;
  - each worker has an address-space limit (RLIMIT_AS), so one answer cannot
    exhaust the machine's memory.

A `VerifierPool` keeps its workers between batches (starting one costs about
a second); `verify` is the one-shot form. Since workers are spawned, a script
that creates a pool must do so under `if __name__ == "__main__":`, and the
script's module is imported again in each worker.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import signal
import threading
import time
import traceback
from typing import Sequence

from ministral_jax.errors import UserError
from ministral_jax.rewards.format import extract_boxed

_INTEGER = re.compile(r"[+-]?\d{1,64}")  # two integers are compared here: sympy would only agree, 30x slower
_KILL_GRACE_S = 1.0  # after the in-worker alarm, how long the worker has to answer before it is killed


# ---------------------------------------------------------------------------------------------------------------
# Worker side (runs in the spawned process).


class _ItemTimeout(BaseException):
  """Raised by the alarm; a BaseException so that math-verify's `except Exception` cannot swallow it."""


def _on_alarm(signum, frame):
  raise _ItemTimeout()


def _grade(parse, verify, pred: str, gold: str, timeout_s: float) -> bool:
  signal.setitimer(signal.ITIMER_REAL, timeout_s)
  try:
    # Timeouts off inside math-verify: our alarm covers the whole item, and theirs would replace it.
    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    p = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))
  except _ItemTimeout:
    return False
  except Exception:  # pylint: disable=broad-except  # a malformed answer is a wrong answer
    return False
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)


def _mapped_bytes() -> int:
  """This process's address-space size (VmSize), or 0 where /proc does not say."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))
  except (OSError, StopIteration, ValueError):
    return 0


def _worker_main(conn, memory_mb: int) -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the pool
  try:
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": we time items ourselves
    from math_verify import parse, verify  # pylint: disable=g-import-not-at-top
  except ImportError:
    conn.send(("import", traceback.format_exc()))
    return
  except BaseException:  # pylint: disable=broad-except
    conn.send(("error", traceback.format_exc()))
    return
  # The limit is headroom over what start-up mapped: under spawn the worker has also re-imported the parent's
  # main module (maybe JAX), whose size says nothing about what grading needs.
  mapped = _mapped_bytes()
  if memory_mb and mapped:
    limit = mapped + (memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  signal.signal(signal.SIGALRM, _on_alarm)
  conn.send(("ready", ""))
  while True:
    try:
      item = conn.recv()
    except (EOFError, OSError):
      return
    if item is None:
      return
    conn.send(_grade(parse, verify, *item))


# ---------------------------------------------------------------------------------------------------------------
# Parent side.


@dataclasses.dataclass
class _Worker:
  process: multiprocessing.process.BaseProcess
  conn: multiprocessing.connection.Connection
  ready: bool = False

  def kill(self) -> None:
    self.process.kill()
    self.process.join(5)
    self.conn.close()


class VerifierPool:
  """Worker processes that grade (prediction, gold) pairs; reuse one for many batches, close it when done."""

  def __init__(self, workers: int = 2, memory_mb: int = 2048, start_timeout_s: float = 120.0):
    """`memory_mb`: address space each worker may map for grading, beyond what it mapped to start."""
    if workers < 1:
      raise UserError(f"VerifierPool needs at least one worker, got workers={workers}.")
    self._ctx = multiprocessing.get_context("spawn")
    self._memory_mb, self._start_timeout_s = memory_mb, start_timeout_s
    self._lock = threading.Lock()
    self._workers = [self._start() for _ in range(workers)]  # all start at once; each costs about a second
    self._closed = False

  def _start(self) -> _Worker:
    parent, child = self._ctx.Pipe(duplex=True)
    process = self._ctx.Process(target=_worker_main, args=(child, self._memory_mb), daemon=True,
                                name="math-verifier")
    process.start()
    child.close()
    return _Worker(process, parent)

  @property
  def worker_pids(self) -> list[int]:
    """The workers' process ids (they change when a hung worker is replaced)."""
    return [w.process.pid for w in self._workers]

  def wait_until_ready(self) -> None:
    """Blocks until every worker has started (otherwise the first `verify` waits for them)."""
    with self._lock:
      for worker in self._workers:
        self._await_ready(worker)

  def _await_ready(self, worker: _Worker) -> None:
    """Blocks until a new worker has imported math-verify, so that its start-up never counts against an item."""
    if worker.ready:
      return
    if not worker.conn.poll(self._start_timeout_s):
      worker.kill()
      raise RuntimeError(f"A math verifier worker did not start within {self._start_timeout_s:.0f} s.")
    try:
      kind, detail = worker.conn.recv()
    except (EOFError, OSError):
      raise RuntimeError(f"A math verifier worker died while starting (exit code {worker.process.exitcode}).")
    if kind != "ready":
      worker.kill()
      if kind == "import":
        raise UserError("The math verifier needs math-verify: pip install math-verify\n" + detail)
      raise RuntimeError("A math verifier worker failed to start:\n" + detail)
    worker.ready = True

  def _replace(self, worker: _Worker) -> _Worker:
    worker.kill()
    fresh = self._start()
    self._workers[self._workers.index(worker)] = fresh
    return fresh

  def verify(self, predictions: Sequence[str], answers: Sequence[str], timeout_s: float = 5.0) -> list[bool]:
    """Whether the last \\boxed{} of each prediction equals its gold answer (a bare value, or text whose last
    \\boxed{} holds it). No boxed answer, a malformed one, or one that takes longer than `timeout_s` is False."""
    if len(predictions) != len(answers):
      raise UserError(f"verify got {len(predictions)} predictions but {len(answers)} answers; pass one gold "
                      "answer per prediction.")
    if timeout_s <= 0:
      raise UserError(f"verify needs a positive timeout_s, got {timeout_s}.")
    results = [False] * len(predictions)
    jobs = collections.deque()
    for i, (pred, gold) in enumerate(zip(predictions, answers)):
      p = extract_boxed(pred)
      g = extract_boxed(gold) if "\\boxed" in gold else gold
      if not p or not p.strip() or not g or not g.strip():
        continue
      p, g = "".join(p.split()), "".join(g.split())
      if p == g or (_INTEGER.fullmatch(p) and _INTEGER.fullmatch(g)):
        results[i] = p == g or int(p) == int(g)  # decided exactly here; no need to wake a worker
        continue
      jobs.append((i, p, g))
    if jobs:
      with self._lock:
        if self._closed:
          raise RuntimeError("This VerifierPool is closed.")
        self._run(jobs, results, timeout_s)
    return results

  def _run(self, jobs: collections.deque, results: list[bool], timeout_s: float) -> None:
    """Hands one item at a time to each idle worker and collects answers; kills a worker past its deadline."""
    busy: dict[int, tuple[_Worker, int, float]] = {}  # id(worker) -> (worker, item index, deadline)
    idle = list(self._workers)
    while jobs or busy:
      while jobs and idle:
        worker = idle.pop()
        self._await_ready(worker)
        i, pred, gold = jobs.popleft()
        try:
          worker.conn.send((pred, gold, timeout_s))
        except (BrokenPipeError, OSError):  # it died while idle: not the item's fault, so the item goes again
          jobs.appendleft((i, pred, gold))
          idle.append(self._replace(worker))
          continue
        busy[id(worker)] = (worker, i, time.monotonic() + timeout_s + _KILL_GRACE_S)
      wait = max(0.0, min(d for _, _, d in busy.values()) - time.monotonic())
      conns = {w.conn: w for w, _, _ in busy.values()}
      for conn in multiprocessing.connection.wait(list(conns), timeout=wait):
        worker = conns[conn]
        _, i, _ = busy.pop(id(worker))
        try:
          results[i] = bool(conn.recv())
          idle.append(worker)
        except (EOFError, OSError):  # it died on this item (e.g. out of memory): the item is False
          idle.append(self._replace(worker))
      now = time.monotonic()
      for key, (worker, i, deadline) in list(busy.items()):
        if deadline <= now:  # stuck where the alarm cannot reach (C code): kill it, the item is False
          del busy[key]
          idle.append(self._replace(worker))

  def close(self) -> None:
    """Stops the workers: asked first, killed if they do not go."""
    if self._closed:
      return
    self._closed = True
    for w in self._workers:
      try:
        w.conn.send(None)
      except (BrokenPipeError, OSError):
        pass
    deadline = time.monotonic() + 2.0
    for w in self._workers:
      w.process.join(max(0.0, deadline - time.monotonic()))
      if w.process.is_alive():
        w.process.kill()
        w.process.join(5)
      w.conn.close()

  def __enter__(self) -> "VerifierPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    if not getattr(self, "_closed", True):
      try:
        self.close()
      except Exception:  # pylint: disable=broad-except  # at interpreter exit, modules may already be gone
        pass


def verify(predictions: list[str], answers: list[str], timeout_s: float = 5.0) -> list[bool]:
  """One-shot `VerifierPool.verify`: starts workers, grades, stops them. Prefer a pool for repeated batches."""
  workers = max(1, min(2, os.cpu_count() or 1, len(predictions)))
  with VerifierPool(workers=workers) as pool:
    return pool.verify(predictions, answers, timeout_s=timeout_s)


class LazyPool:
  """A `VerifierPool` started on first use (a trainer whose rewards never grade math starts no workers) and
  stopped by `close()`; `get()` after `close()` starts a new one."""

  def __init__(self):
    self._pool: VerifierPool | None = None

  def get(self) -> VerifierPool:
    if self._pool is None:
      self._pool = VerifierPool()
    return self._pool

  def close(self) -> None:
    if self._pool is not None:
      self._pool.close()
      self._pool = None
