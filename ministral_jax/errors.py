"""The two ways a job stops early on purpose, and the exit statuses a launcher reads.

`UserError` is a problem the user can fix (a config field, a path, a damaged
checkpoint): its message names what, where and the fix, and `main` prints it
as one line, without a traceback (`--verbosity=1` adds it). It subclasses
ValueError so callers that catch ValueError keep working.

`Preempted` is raised after a SIGTERM once the job has saved: the process then
exits with `EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"), so a launcher or a
cascade knows the job did not finish and must be run again. Nothing that
follows a preempted job may run.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: temporary failure, re-run to continue


class UserError(ValueError):
  """A problem with the input or the workdir; the message says what, where and the fix."""


class Preempted(RuntimeError):
  """The job saved its state after a termination signal and stopped before finishing."""

  def __init__(self, workdir: str, step: int | None = None):
    saved = f" after saving step {step}" if step is not None else ""
    super().__init__(f"Preempted: {workdir} stopped{saved} before finishing (exit status {EXIT_PREEMPTED}); run "
                     "the same command again to continue from there.")
    self.workdir, self.step = workdir, step
