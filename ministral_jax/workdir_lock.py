"""One job per workdir: `with hold(workdir): ...` around everything a job does there.

Two jobs in one workdir overwrite each other's checkpoints and results without
any error, so the second one must stop before it starts. `hold` writes
`<workdir>/lock.json` naming its holder:

    {"host", "pid", "pid_start", "started", "heartbeat", "argv", "token"}

`pid_start` is the process start time (field 22 of /proc/<pid>/stat), so a
recycled pid is not mistaken for the holder. `token` tells one hold from
another in the same process.

A lock whose holder is gone is taken over with a warning, so a killed job
never blocks its own re-run:

  * holder on this host: gone when its pid is not running (or is another process
    now). A live holder is never taken over, however old its heartbeat.
  * holder on another host (a shared disk or gs://): gone when its heartbeat, rewritten
    every `HEARTBEAT_S`, is older than `stale_after_s`. This compares clocks of two
    hosts, hence the generous default.
  * an unreadable lock file (a job killed while writing it): gone once it is
    `UNPARSABLE_GRACE_S` old; younger, another job may be writing it right now.

Local paths are exact: the lock file is created with O_CREAT|O_EXCL, and each
attempt (create, or judge and take over), heartbeat and release runs under a
flock on the workdir directory, which the kernel drops when its holder dies;
so jobs racing for one stale lock end with one holder, and the one that logs
the take-over is the one that got it. On a filesystem without flock (some NFS
setups) a take-over re-checks the bytes it judged before removing them, which
leaves a window of microseconds. Hostnames tell hosts apart: two containers
that share a hostname but not a pid namespace would see each other's jobs as
dead.

Remote workdirs (gs://, through etils.epath) have neither exclusive creation nor
flock: `hold` checks that no live lock exists (or removes a stale one),
writes its own and reads it back. Two jobs that both look before either has
written still both start: the window is the latency of one write, about a
second on GCS. Starting two jobs on one gs:// workdir at the same moment is
on the user.

Holding a workdir that this process already holds (a job that runs jobs in
its own workdir) just counts up. In a multi-host JAX job only process 0 takes
the lock (call `hold` after `jax.distributed.initialize`); the others enter at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Iterator

from etils import epath

from ministral_jax import files
from ministral_jax.errors import UserError

LOCK_FILE = "lock.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
UNPARSABLE_GRACE_S = 5.0
_ATTEMPTS = 40  # create / inspect / take over rounds before giving up on a lock that keeps changing
_RETRY_S = 0.05  # wait before re-reading a lock file that is being written

_held: dict[str, "_Lock"] = {}
_held_guard = threading.Lock()


def _forget_after_fork() -> None:
  """A forked child is another process: the parent's holds are not its own."""
  global _held_guard
  _held.clear()
  _held_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


@contextlib.contextmanager
def hold(workdir: str, stale_after_s: float = STALE_AFTER_S) -> Iterator[None]:
  """Holds `workdir` for this process (creating it if needed) or raises UserError naming its holder.

  On exit the lock file is removed if it is still ours, and a workdir that
  `hold` created is removed again if it is empty, so a job that failed on bad
  input leaves nothing behind.
  """
  if not _is_primary():
    yield
    return
  key = _key(workdir)
  with _held_guard:
    lock = _held.get(key)
    if lock is None:
      lock = _Lock(workdir, stale_after_s)
      lock.acquire()
      _held[key] = lock
    lock.count += 1
  try:
    yield
  finally:
    with _held_guard:
      lock.count -= 1
      if lock.count == 0:
        del _held[key]
        lock.release()


def _is_primary() -> bool:
  """A process that never imported JAX cannot be part of a multi-host job."""
  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


def _is_remote(workdir: str) -> bool:
  return "://" in str(workdir)


def _key(workdir: str) -> str:
  return str(workdir).rstrip("/") if _is_remote(workdir) else os.path.realpath(workdir)


# --------------------------------------------------------------------------
# Who holds a lock, and whether they are gone.
# --------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state, start time in clock ticks since boot) from /proc/<pid>/stat; None without it."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      stat = f.read().decode(errors="replace")
  except OSError:
    return None
  fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
  return fields[0], int(fields[19])  # fields[0] is field 3 (state), fields[19] field 22 (starttime)


def _alive(pid: int, pid_start: int | None) -> bool:
  stat = _proc_stat(pid)
  if stat is not None:
    state, start = stat
    return state not in ("Z", "X") and (pid_start is None or start == pid_start)
  if os.path.exists("/proc/self/stat"):
    return False  # /proc works here, and knows no such pid
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process
  return True


@dataclasses.dataclass(frozen=True)
class _Holder:
  """A lock file as read: its bytes (to check later that it did not change), its record and age."""
  raw: bytes
  info: dict[str, Any] | None  # None: unparsable
  age_s: float  # since the file was last written

  @property
  def who(self) -> str:
    i = self.info or {}
    return f"pid {i.get('pid')} on host {i.get('host')}, started {i.get('started')}"


_CHANGED = _Holder(b"", None, 0.0)


def _parse(raw: bytes) -> dict[str, Any] | None:
  try:
    info = json.loads(raw)
  except (ValueError, UnicodeDecodeError):
    return None
  ok = (isinstance(info, dict) and isinstance(info.get("host"), str) and isinstance(info.get("pid"), int)
        and isinstance(info.get("heartbeat"), (int, float)))
  return info if ok else None


def _gone_because(holder: _Holder, stale_after_s: float) -> str | None:
  """Why the holder no longer holds the workdir, or None if it may still."""
  info = holder.info
  if info is None:
    if holder.age_s > UNPARSABLE_GRACE_S:
      return f"its lock file was unreadable and {holder.age_s:.0f} s old (a job killed while writing it)"
    return None
  if info["host"] == socket.gethostname():
    if not _alive(info["pid"], info.get("pid_start")):
      return f"its holder ({holder.who}) is no longer running"
    return None
  beat_age = time.time() - info["heartbeat"]
  if beat_age > stale_after_s:
    return f"its holder ({holder.who}) last refreshed it {beat_age:.0f} s ago (limit {stale_after_s:.0f} s)"
  return None


def _busy_message(workdir: str, path: epath.Path, holder: _Holder, stale_after_s: float) -> str:
  info = holder.info
  if info is None:
    return (f"Workdir {workdir} has a lock file {path} that another job is writing right now, or that is "
            f"damaged. Retry in a few seconds; if no job uses this workdir, delete {path}; or use another "
            "--workdir.")
  argv = " ".join(map(str, info.get("argv") or []))
  argv = argv if len(argv) <= 200 else argv[:197] + "..."
  where = "" if info["host"] == socket.gethostname() else (
      f" Its last heartbeat was {time.time() - info['heartbeat']:.0f} s ago; its lock counts as abandoned "
      f"after {stale_after_s:.0f} s without one.")
  return (f"Workdir {workdir} is in use by another job: {holder.who} (command: {argv or '?'}).{where} "
          f"Wait for it to finish, or stop it with `kill {info['pid']}` on {info['host']}; or use another "
          "--workdir.")


# --------------------------------------------------------------------------
# One held lock.
# --------------------------------------------------------------------------
@contextlib.contextmanager
def _flocked(directory: str) -> Iterator[None]:
  """Serialises the changes to an existing lock file among this host's processes.

  The directory, not the lock file, carries the flock: the lock file is
  replaced and removed, a directory fd stays valid. The kernel drops it when
  its holder dies, so it can never go stale itself. Where flock is not
  supported (some network filesystems) the changes run unserialised.
  """
  import fcntl  # POSIX only, like the rest of the local path

  fd = os.open(directory, os.O_RDONLY)
  try:
    with contextlib.suppress(OSError):
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


class _Lock:
  """The lock file of one workdir while this process holds it, and its heartbeat thread."""

  def __init__(self, workdir: str, stale_after_s: float):
    self.workdir = str(workdir)
    self.remote = _is_remote(workdir)
    self.dir = epath.Path(workdir)
    self.path = self.dir / LOCK_FILE
    self.stale_after_s = stale_after_s
    self.token = uuid.uuid4().hex
    self.count = 0
    self._created: list[epath.Path] = []  # directories hold() made, deepest first
    self._started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # --- taking and giving back ---
  def acquire(self) -> None:
    try:
      self._acquire()
    except BaseException:
      self._remove_created_dirs()  # a refused job leaves no directory behind either
      raise

  def _acquire(self) -> None:
    for attempt in range(_ATTEMPTS):
      self._make_dir()
      try:
        with self._guard():
          holder = self._take()
      except FileNotFoundError:  # a job that created the workdir removed it on leaving
        continue
      if holder is None:
        self._start_heartbeat()
        return
      if holder is _CHANGED:
        continue  # changed under us (no flock here): look again
      if holder.info is None and attempt < _ATTEMPTS - 1:
        time.sleep(_RETRY_S)  # most likely another host's job between creating and writing it
        continue
      raise UserError(_busy_message(self.workdir, self.path, holder, self.stale_after_s))
    raise UserError(f"Could not lock workdir {self.workdir}: its lock file {self.path} changed {_ATTEMPTS} "
                    "times while this job tried to take it. Another job is starting there; use another "
                    "--workdir or retry.")

  def _take(self) -> _Holder | None:
    """One try, under the guard: None when the lock is ours now, else the live holder
    (an empty `_Holder` when the file changed under us and must be looked at again).

    Under the flock nobody else changes the file between reading and replacing
    it, so the job that logs the take-over is the one that got the lock.
    """
    if self._create():
      return None
    holder = self._read()
    if holder is None:
      return _CHANGED
    why = _gone_because(holder, self.stale_after_s)
    if why is None:
      return holder
    if not self._remove_if_unchanged(holder.raw) or not self._create():
      return _CHANGED
    logging.warning("Took over the lock of workdir %s: %s.", self.workdir, why)
    return None

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      with self._guard():
        holder = self._read()
        if holder is not None and self._ours(holder):
          self.path.unlink()
        else:
          logging.warning("Workdir %s: the lock of this job was removed or taken over while it ran (now "
                          "held by %s); another job may have written there too.", self.workdir,
                          holder.who if holder else "nobody")
    finally:
      self._remove_created_dirs()

  # --- the file ---
  def _record(self) -> bytes:
    pid = os.getpid()
    stat = _proc_stat(pid)
    return json.dumps({"host": socket.gethostname(), "pid": pid, "pid_start": stat[1] if stat else None,
                       "started": self._started, "heartbeat": time.time(), "argv": list(sys.argv),
                       "token": self.token}, indent=1).encode()

  def _create(self) -> bool:
    """Writes our lock file unless one exists; True if it is ours now."""
    if self.remote:
      if self.path.exists():
        return False
      files.write_text(self.path, self._record())
      holder = self._read()  # the last of two racing writers wins; the other backs off
      return holder is not None and self._ours(holder)
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(self._record())
      f.flush()
      os.fsync(f.fileno())
    return True

  def _read(self) -> _Holder | None:
    try:
      raw = self.path.read_bytes()
      mtime = self.path.stat().mtime
    except FileNotFoundError:
      return None
    return _Holder(raw, _parse(raw), max(0.0, time.time() - mtime))

  def _ours(self, holder: _Holder) -> bool:
    return holder.info is not None and holder.info.get("token") == self.token

  def _guard(self) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext() if self.remote else _flocked(str(self.dir))

  def _remove_if_unchanged(self, raw: bytes) -> bool:
    """Removes a stale lock file unless it changed since it was judged (possible only without flock)."""
    try:
      if self.path.read_bytes() != raw:
        return False
      self.path.unlink()
    except FileNotFoundError:
      pass
    return True

  # --- heartbeat ---
  def _start_heartbeat(self) -> None:
    self._thread = threading.Thread(target=self._beat_until_released, name=f"workdir_lock {self.workdir}",
                                    daemon=True)
    self._thread.start()

  def _beat_until_released(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        if not self._beat():
          logging.error("Workdir %s: another job took over the lock of this job; stopped refreshing it.",
                        self.workdir)
          return
      except Exception as e:  # noqa: BLE001 - a full disk or a flaky bucket must not end the beats for good
        logging.warning("Workdir %s: could not refresh the lock's heartbeat: %s", self.workdir, e)

  def _beat(self) -> bool:
    """Rewrites the heartbeat if the lock is still ours; False if it is not."""
    with self._guard():
      holder = self._read()
      if holder is None or not self._ours(holder):
        return False
      files.write_text(self.path, json.dumps({**holder.info, "heartbeat": time.time()}, indent=1))
      return True

  # --- the workdir itself ---
  def _make_dir(self) -> None:
    if self.dir.exists() and not self.dir.is_dir():
      raise UserError(f"--workdir {self.workdir} is a file, not a directory; use another --workdir.")
    missing, d = [], self.dir
    while not d.exists() and d != d.parent:
      missing.append(d)
      d = d.parent
    self.dir.mkdir(parents=True, exist_ok=True)
    self._created = self._created or missing

  def _remove_created_dirs(self) -> None:
    for d in self._created:
      try:
        if not self.remote:
          os.rmdir(d)  # fails unless empty: nothing a job wrote is ever removed
        elif not any(d.iterdir()):
          d.rmdir()
        else:
          return
      except (OSError, ValueError, NotImplementedError):
        return
