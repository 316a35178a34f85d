"""One job per workdir: live holders refuse, dead or silent ones are taken over, races end with one holder."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ministral_jax import workdir_lock
from ministral_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argv: workdir, start_at (unix time), hold_s (< 0: until stdin closes). Prints "held" or "refused <message>".
_CHILD = r"""
import sys, time
from ministral_jax import workdir_lock
from ministral_jax.errors import UserError
workdir, start_at, hold_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))
try:
  with workdir_lock.hold(workdir):
    print("held", flush=True)
    sys.stdin.read() if hold_s < 0 else time.sleep(hold_s)
except UserError as e:
  print("refused", e, flush=True)
"""


def _child(workdir, start_at=0.0, hold_s=-1.0) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.Popen([sys.executable, "-c", _CHILD, str(workdir), str(start_at), str(hold_s)], cwd=REPO,
                          env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _holding_child(workdir) -> subprocess.Popen:
  child = _child(workdir)
  assert child.stdout.readline().strip() == "held", child.stderr.read()
  return child


def _lock(workdir) -> dict:
  return json.loads((workdir / workdir_lock.LOCK_FILE).read_text())


def _write_lock(workdir, **fields) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  record = {"host": "some-other-host", "pid": 4321, "pid_start": 1, "started": "2020-01-01T00:00:00+00:00",
            "heartbeat": time.time(), "argv": ["train.py"], "token": "theirs", **fields}
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(record))


def _pid_start(pid: int) -> int:
  return workdir_lock._proc_stat(pid)[1]


def test_a_live_holder_in_another_process_refuses_with_its_host_pid_and_start(tmp_path):
  child = _holding_child(tmp_path)
  try:
    started = _lock(tmp_path)["started"]
    with pytest.raises(UserError) as e:
      with workdir_lock.hold(str(tmp_path)):
        pass
    message = str(e.value)
    for part in (socket.gethostname(), f"pid {child.pid}", started, f"kill {child.pid}", "another --workdir"):
      assert part in message
    assert _lock(tmp_path)["pid"] == child.pid  # untouched
  finally:
    child.stdin.close()
    child.wait(timeout=30)
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()  # released by its holder
  with workdir_lock.hold(str(tmp_path)):  # free again
    assert _lock(tmp_path)["pid"] == os.getpid()


def test_the_lock_of_a_killed_job_is_taken_over_with_a_warning(tmp_path, caplog):
  child = _holding_child(tmp_path)
  child.send_signal(signal.SIGKILL)
  child.wait(timeout=30)
  assert _lock(tmp_path)["pid"] == child.pid  # left behind
  with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path)):
    assert _lock(tmp_path)["pid"] == os.getpid()
  assert f"pid {child.pid}" in caplog.text and "no longer running" in caplog.text
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_a_live_holder_on_this_host_is_never_taken_over_however_old_its_heartbeat(tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write_lock(tmp_path, host=socket.gethostname(), pid=sleeper.pid, pid_start=_pid_start(sleeper.pid),
                heartbeat=0.0)
    before = (tmp_path / workdir_lock.LOCK_FILE).read_bytes()
    with pytest.raises(UserError, match=f"pid {sleeper.pid}"):
      with workdir_lock.hold(str(tmp_path), stale_after_s=1.0):
        pass
    assert (tmp_path / workdir_lock.LOCK_FILE).read_bytes() == before
  finally:
    sleeper.kill()
    sleeper.wait()


def test_a_recycled_pid_is_not_mistaken_for_the_holder(tmp_path, caplog):
  # The pid runs, but it is another process than the one that wrote the lock (another start time).
  _write_lock(tmp_path, host=socket.gethostname(), pid=os.getppid(), pid_start=_pid_start(os.getppid()) + 1)
  with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path)):
    assert _lock(tmp_path)["pid"] == os.getpid()
  assert "no longer running" in caplog.text


def test_another_hosts_lock_is_taken_over_only_once_its_heartbeat_is_old(tmp_path, caplog):
  _write_lock(tmp_path, heartbeat=time.time() - 30)
  with pytest.raises(UserError, match="some-other-host") as e:
    with workdir_lock.hold(str(tmp_path), stale_after_s=600):
      pass
  assert "pid 4321" in str(e.value) and "heartbeat" in str(e.value)
  assert _lock(tmp_path)["token"] == "theirs"
  _write_lock(tmp_path, heartbeat=time.time() - 700)
  with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path), stale_after_s=600):
    assert _lock(tmp_path)["pid"] == os.getpid()
  assert "some-other-host" in caplog.text and "700 s ago" in caplog.text


def test_an_unreadable_lock_file_is_taken_over_only_once_it_is_old(tmp_path, caplog, monkeypatch):
  monkeypatch.setattr(workdir_lock, "_ATTEMPTS", 4)
  path = tmp_path / workdir_lock.LOCK_FILE
  path.write_text('{"host": "x", "pi')  # a writer killed halfway, or one writing right now
  with pytest.raises(UserError, match="is writing right now, or that is damaged"):
    with workdir_lock.hold(str(tmp_path)):
      pass
  old = time.time() - 60
  os.utime(path, (old, old))
  with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path)):
    assert _lock(tmp_path)["pid"] == os.getpid()
  assert "unreadable" in caplog.text


def test_holding_a_workdir_twice_in_one_process_counts_up(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    token = _lock(tmp_path)["token"]
    with workdir_lock.hold(str(tmp_path / ".." / tmp_path.name)):  # the same directory, spelled otherwise
      assert _lock(tmp_path)["token"] == token
    assert _lock(tmp_path)["token"] == token  # the inner exit keeps it
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
  assert tmp_path.exists()  # it was there before


def test_a_workdir_made_for_a_failing_job_is_removed_and_one_with_results_is_kept(tmp_path):
  workdir = tmp_path / "new" / "run"
  with pytest.raises(RuntimeError):
    with workdir_lock.hold(str(workdir)):
      assert (workdir / workdir_lock.LOCK_FILE).exists()
      raise RuntimeError("bad input")
  assert not (tmp_path / "new").exists()
  with workdir_lock.hold(str(workdir)):
    (workdir / "samples.json").write_text("{}")
  assert sorted(os.listdir(workdir)) == ["samples.json"]


def test_the_heartbeat_refreshes_only_a_lock_that_is_still_ours(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path)):
    first = _lock(tmp_path)["heartbeat"]
    time.sleep(0.5)
    assert _lock(tmp_path)["heartbeat"] > first
    with workdir_lock._flocked(str(tmp_path)):  # another job's take-over, serialised as theirs would be
      _write_lock(tmp_path, heartbeat=123.0)
    time.sleep(0.5)
    assert _lock(tmp_path)["heartbeat"] == 123.0
  assert _lock(tmp_path)["token"] == "theirs"  # release leaves another job's lock alone
  assert "taken over" in caplog.text


def test_processes_racing_for_one_stale_lock_end_with_exactly_one_holder(tmp_path):
  child = _holding_child(tmp_path)
  child.send_signal(signal.SIGKILL)
  child.wait(timeout=30)
  start_at = time.time() + 1.5  # all at once, to make them collide
  racers = [_child(tmp_path, start_at=start_at) for _ in range(5)]
  firsts = [r.stdout.readline().strip() for r in racers]  # the winner holds until its stdin closes
  for r in racers:
    r.stdin.close()
  errors = [r.stderr.read() for r in racers]
  for r in racers:
    r.wait(timeout=30)
  assert sorted(f.split(" ", 1)[0] for f in firsts) == ["held"] + ["refused"] * 4, (firsts, errors)
  winner = [f.split(" ", 1)[0] for f in firsts].index("held")
  assert all(f"pid {racers[winner].pid}" in f for f in firsts if f.startswith("refused")), firsts
  assert "Took over" in errors[winner] and f"pid {child.pid}" in errors[winner]
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_remote_workdirs_use_the_same_record_and_staleness(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "_is_remote", lambda workdir: True)  # the epath-only path, on a local dir
  _write_lock(tmp_path, heartbeat=time.time() - 30)
  with pytest.raises(UserError, match="some-other-host"):
    with workdir_lock.hold(str(tmp_path)):
      pass
  _write_lock(tmp_path, heartbeat=time.time() - 700)
  with workdir_lock.hold(str(tmp_path)):
    assert _lock(tmp_path)["pid"] == os.getpid()
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_only_the_first_jax_process_takes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "_is_primary", lambda: False)
  with workdir_lock.hold(str(tmp_path / "run")):
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_a_user_error(tmp_path):
  (tmp_path / "run").write_text("not a directory")
  with pytest.raises(UserError, match="is a file"):
    with workdir_lock.hold(str(tmp_path / "run")):
      pass
