"""SIGTERM as a request to save and stop, shared by the training loop and the cascade.

A preempted VM (or `kill`, or a launcher's timeout) sends SIGTERM and allows a
grace period. The handler only records the request; the loop saves at the end
of the step it is in and raises `errors.Preempted`, and the cascade checks the
request between jobs, so no job starts after it. `main` turns `Preempted`
into exit status 75, which tells a launcher the job did not finish.
"""

from __future__ import annotations

import logging
import signal
import threading

_state = {"requested": False}


def _handler(signum, frame) -> None:
  del frame
  if not _state["requested"]:
    logging.warning("Signal %d: saving a checkpoint at the end of this step, then exiting (status 75).", signum)
  _state["requested"] = True


def install() -> None:
  """Idempotent; only the main thread may install signal handlers (elsewhere this is a no-op)."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
  return _state["requested"]


def reset() -> None:
  _state["requested"] = False
