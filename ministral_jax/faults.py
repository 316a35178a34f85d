"""Named fault-injection points, so tests can kill a job at an exact phase boundary.

Code that crosses a boundary where a kill must be survivable calls
`point("name")`. Nothing happens unless the environment names that point:

    MINISTRAL_JAX_FAULT=loop.after_final_checkpoint        SIGKILL at its 1st crossing
    MINISTRAL_JAX_FAULT=params.before_commit:3             SIGKILL at its 3rd crossing
    MINISTRAL_JAX_FAULT=params.before_commit:1:enospc      raise OSError(ENOSPC) instead (a full disk)
    MINISTRAL_JAX_FAULT=loop.after_step:5:sigterm          send SIGTERM instead (a preemption notice)

With `MINISTRAL_JAX_FAULT_PROCESS=i` only JAX process i (`JAX_PROCESS_ID`) acts, as when one host of a
pod is preempted or dies.

A kill here is SIGKILL to the process itself: no handler, no cleanup, exactly
what a preempted VM or the OOM killer does. The points are listed in `POINTS`
so a test can cross every one of them.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "MINISTRAL_JAX_FAULT"
POINTS = (
    "loop.after_step",               # a training step done (":1": before any checkpoint exists)
    "checkpoint.save_started",       # an async training checkpoint is being written
    "loop.after_final_checkpoint",   # the last checkpoint committed, <workdir>/params not yet written
    "params.before_commit",          # <workdir>/params fully written under its temporary name
    "prune.after_calibration",       # inside a pruning pass, statistics measured, nothing written
    "cascade.between_jobs",          # a cascade job finished, the next not started
    "posttrain.between_jobs",        # a post-training job finished, the next not started
)
_counts: dict[str, int] = {}


def point(name: str) -> None:
  spec = os.environ.get(ENV)
  if not spec:
    return
  target, _, rest = spec.partition(":")
  if target != name:
    return
  only = os.environ.get(ENV + "_PROCESS")
  if only is not None and only != os.environ.get("JAX_PROCESS_ID", "0"):
    return
  nth, _, action = rest.partition(":")
  _counts[name] = _counts.get(name, 0) + 1
  if _counts[name] != int(nth or 1):
    return
  if action == "enospc":
    raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
  os.kill(os.getpid(), signal.SIGTERM if action == "sigterm" else signal.SIGKILL)
