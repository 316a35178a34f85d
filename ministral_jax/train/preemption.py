"""SIGTERM as a request to save and stop, shared by the training loop and the cascade.

A preempted VM (or `kill`, or a launcher's timeout) sends SIGTERM and allows a
grace period. The loop asks `reached(step)` after every step: there it saves
and raises `errors.Preempted`; the cascade checks `requested()` between jobs,
so no job starts after it. `main` turns `Preempted` into exit status 75, which
tells a launcher the job did not finish.

One process: a Python SIGTERM handler records the request, and the next step
is the one to save. Several processes (a pod): SIGTERM may reach one host, or
all of them at different steps, so they must agree on the step. JAX's
preemption service does that (its notifier catches SIGTERM; the coordinator
takes the largest step any process has reached, plus one), and every process
learns it from `multihost_utils.reached_preemption_sync_point`.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

_state = {"requested": False}


def _handler(signum, frame) -> None:
  del frame
  if not _state["requested"]:
    logging.warning("Signal %d: saving a checkpoint at the end of this step, then exiting (status 75).", signum)
  _state["requested"] = True


def install() -> None:
  """Idempotent. A single process handles SIGTERM itself; on a pod JAX's preemption notifier owns it.
  Only the main thread may install signal handlers (elsewhere this is a no-op)."""
  if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _handler)


def reached(step: int) -> bool:
  """Whether the job saves and stops after `step` (every process gets the same answer for each step)."""
  if not _state["requested"] and jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if multihost_utils.reached_preemption_sync_point(step):
      logging.warning("Preemption notice: every process saves at step %d, then exits (status 75).", step)
      _state["requested"] = True
  return _state["requested"]


def requested() -> bool:
  return _state["requested"]


def reset() -> None:
  _state["requested"] = False
