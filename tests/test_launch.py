"""Launchers (their dry runs: there is no cloud here), sweeps, and gs:// workdirs passed through unchanged."""

import importlib.metadata
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from launch import common, tpu
from ministral_jax import configs, sweep
from ministral_jax.checkpoint import orbax_io
from ministral_jax.data import pipeline
from ministral_jax.train import checkpointing, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.train.steps=4", "--config.train.log_every=2", "--config.train.checkpoint_every=2",
        "--config.train.eval_every=4", "--config.train.eval_batches=1", "--config.model.n_layers=1",
        "--config.model.d_model=32", "--config.model.d_ffn=64", "--config.data.seq_len=32",
        "--config.train.global_batch=4", "--config.data.spm_vocab_size=512", "--config.model.vocab_size=512",
        "--config.data.max_documents=200", "--config.optimizer.warmup_steps=1"]


def _launch(module, *args):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def _lines(result):
  assert result.returncode == 0, result.stderr[-3000:]
  return [line for line in result.stdout.splitlines() if line]


@pytest.mark.parametrize("module,args", [("tpu", []), ("tpu", ["create"]), ("tpu", ["setup"]), ("tpu", ["run"]),
                                         ("tpu", ["status"]), ("tpu", ["logs"]), ("tpu", ["delete"]), ("local", []),
                                         ("gpu", [])])
def test_every_launcher_has_help(module, args):
  result = _launch(module, *args, "--help")
  assert result.returncode == 0 and "usage:" in result.stdout
  assert ("{create,setup,run,status,logs,delete}" if module == "tpu" and not args else "--dry_run") in result.stdout


# ---------------------------------------------------------------- launch.tpu, in this process (no cloud here)

WHERE = ["--name=mj", "--zone=us-east5-a", "--project=proj"]
AT = "mj --zone=us-east5-a --project=proj"


def _tpu(capsys, *argv):
  """launch.tpu's printed lines (its dry run: the exact commands, `#` lines for what depends on the cloud)."""
  tpu.main(list(argv))
  return [line for line in capsys.readouterr().out.splitlines() if line]


def test_tpu_create_dry_run_replaces_a_dead_request_and_waits_with_a_timeout(capsys):
  lines = _tpu(capsys, "create", *WHERE, "--dry_run", "--accelerator_type=v5p-32", "--spot", "--queued")
  assert [line for line in lines if not line.startswith("#")] == [
      f"gcloud compute tpus queued-resources describe {AT} '--format=value(state.state)'",
      f"gcloud compute tpus queued-resources delete {AT} --force --quiet",
      "gcloud compute tpus queued-resources create mj --node-id=mj --zone=us-east5-a --project=proj "
      "--accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5 --spot",
      f"gcloud compute tpus queued-resources describe {AT} '--format=value(state.state)'"]
  assert "# if it is SUSPENDED or FAILED it can never run again: it is replaced (deleted, then created):" in lines
  assert "# then, every 60s for at most 120 min, until it prints ACTIVE:" in lines
  lines = _tpu(capsys, "create", *WHERE, "--dry_run", "--accelerator_type=v5litepod-16", "--spot")
  assert [line for line in lines if not line.startswith("#")] == [
      f"gcloud compute tpus tpu-vm describe {AT} '--format=value(state,queuedResource)'",
      f"gcloud compute tpus tpu-vm delete {AT} --quiet",
      f"gcloud compute tpus tpu-vm create {AT} --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot"]


@pytest.mark.parametrize("accelerator,message", [
    ("v5e-8", "spelled v5litepod-<chips>; use --accelerator_type=v5litepod-8"),
    ("tpu7x-128", "TPU7x (Ironwood) and later generations are not served by the Cloud TPU API"),
    ("v7-8", "provisioned through GKE"),
    ("v5x-8", "no default runtime for 'v5x-8'"),
    ("v5p", "expected <generation>-<size>")])
def test_tpu_create_refuses_accelerator_types_the_tpu_api_does_not_take(accelerator, message):
  with pytest.raises(SystemExit, match=re.escape(message)):
    tpu.main(["create", *WHERE, "--dry_run", f"--accelerator_type={accelerator}"])


def test_tpu_setup_makes_a_python311_env_with_pinned_versions_and_replaces_the_code_whole(capsys):
  guard = ('if [ -f ~/ministral_jax_run/pid ] && [ ! -f ~/ministral_jax_run/exit_status ] && kill -0 '
           '"$(cat ~/ministral_jax_run/pid)" 2>/dev/null; then echo "$(hostname): a detached run is still going (pid '
           '$(cat ~/ministral_jax_run/pid)); wait for it or stop it first" >&2; exit 1; fi')
  swap = 'rm -rf "$HOME/ministral_jax" && mv "$HOME/ministral_jax.new" "$HOME/ministral_jax"'
  env = ('PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user uv==0.13.9 && rm -rf "$HOME/ministral_jax_venv" '
         '&& python3 -m uv venv -q --python 3.11 --seed "$HOME/ministral_jax_venv" && python3 -m uv pip install -q '
         '--python "$HOME/ministral_jax_venv/bin/python" \'jax[tpu]==0.10.2\' flax==0.12.8 optax==0.2.8 '
         'orbax-checkpoint==0.12.8 grain==0.2.18 -e "$HOME/ministral_jax[gcs]" && '
         '"$HOME/ministral_jax_venv/bin/python" -c \'import sys, jax; print(sys.version.split()[0], "jax", '
         'jax.__version__)\'')
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mj", "--zone=us-east5-a", "--project=proj", "--worker=all"]
  copied = ('rm -rf "$HOME/ministral_jax.new" && mkdir -p "$HOME/ministral_jax.new" && tar -xzf ~/ministral_jax.tar.gz '
            '-C "$HOME/ministral_jax.new"')
  assert _tpu(capsys, "setup", *WHERE, "--dry_run", "--ref=v1.2") == [
      "git archive --format=tar.gz --output=/tmp/ministral_jax.tar.gz v1.2",
      "gcloud compute tpus tpu-vm scp /tmp/ministral_jax.tar.gz 'mj:~/' --zone=us-east5-a --project=proj --worker=all",
      shlex.join(ssh + [f"--command={guard} && {copied} && {swap} && {env}"])]
  cloned = ('rm -rf "$HOME/ministral_jax.new" && git init -q "$HOME/ministral_jax.new" && git -C "$HOME/ministral_jax.new" '
            'fetch -q --depth=1 https://github.com/o/r.git 0123abc && git -C "$HOME/ministral_jax.new" checkout -q '
            '--detach FETCH_HEAD')
  assert _tpu(capsys, "setup", *WHERE, "--dry_run", "--repo_url=https://github.com/o/r.git", "--ref=0123abc") == [
      shlex.join(ssh + [f"--command={guard} && {cloned} && {swap} && {env}"])]


def test_tpu_setup_pins_what_this_code_is_tested_with_and_setup_py_floors_admit_them():
  pins = dict(p.split("==") for p in tpu.PINS)
  assert pins.pop("jax[tpu]") == importlib.metadata.version("jax")
  assert pins == {name: importlib.metadata.version(name) for name in pins}
  setup_py = open(os.path.join(REPO, "setup.py")).read()
  assert 'python_requires=">=3.11"' in setup_py and tpu.PYTHON_VERSION == "3.11"
  for name, floor in re.findall(r'"(jax|flax|orbax-checkpoint|grain)>=([0-9.]+)"', setup_py):
    pinned = importlib.metadata.version(name)
    assert tuple(map(int, pinned.split("."))) >= tuple(map(int, floor.split("."))), (name, floor, pinned)


def test_tpu_run_dry_run_in_the_foreground_and_detached_with_status_and_logs(capsys):
  python = "$HOME/ministral_jax_venv/bin/python"
  ssh = f"gcloud compute tpus tpu-vm ssh {AT} --worker=all"
  job = "--config=configs/cascade_ministral3.py --workdir=gs://b/cascade"
  run = _tpu(capsys, "run", *WHERE, "--dry_run", "--config=configs/cascade_ministral3.py", "--workdir=gs://b/cascade",
             "--", "--config.parent.checkpoint=gs://b/ckpt")
  assert run == [f"{ssh} '--command=cd $HOME/ministral_jax && MINISTRAL_JAX_MULTIHOST=1 {python} -m ministral_jax.main "
                 f"{job} --config.parent.checkpoint=gs://b/ckpt'"]
  run = _tpu(capsys, "run", *WHERE, "--dry_run", "--detach", "--config=configs/cascade_ministral3.py",
             "--workdir=gs://b/cascade", "--", "--config.parent.checkpoint=gs://b/ckpt")
  assert run == [
      "# on every worker, in a session of its own, one after the other:",
      f"#   {python} -m ministral_jax.main {job} --config.parent.checkpoint=gs://b/ckpt",
      f"{ssh} '--command=cd $HOME/ministral_jax && {python} -m launch.tpu _start {job} -- "
      "--config.parent.checkpoint=gs://b/ckpt'"]
  assert [line for line in _tpu(capsys, "status", *WHERE, "--dry_run") if not line.startswith("#")] == [
      f"gcloud compute tpus tpu-vm describe {AT} '--format=value(state,queuedResource)'",
      f"gcloud compute tpus queued-resources describe {AT} '--format=value(state.state)'",
      f"{ssh} '--command=cd $HOME/ministral_jax && {python} -m launch.tpu _status'"]
  assert _tpu(capsys, "logs", *WHERE, "--dry_run", "--worker=0", "--lines=200", "--follow") == [
      f"gcloud compute tpus tpu-vm ssh {AT} --worker=0 '--command=cd $HOME/ministral_jax && {python} -m launch.tpu "
      "_logs --lines=200 --follow'"]


def test_tpu_delete_dry_run_looks_for_the_queued_resource_behind_the_vm(capsys):
  assert [line for line in _tpu(capsys, "delete", *WHERE, "--dry_run") if not line.startswith("#")] == [
      f"gcloud compute tpus tpu-vm describe {AT} '--format=value(state,queuedResource)'",
      f"gcloud compute tpus queued-resources describe {AT} '--format=value(state.state)'",
      f"gcloud compute tpus queued-resources delete {AT} --force --quiet",
      f"gcloud compute tpus tpu-vm delete {AT} --quiet"]
  assert _tpu(capsys, "delete", *WHERE, "--dry_run", "--queued") == [
      f"gcloud compute tpus queued-resources delete {AT} --force --quiet"]


def test_tpu_sweep_is_one_job_per_point_each_with_its_own_workdir_and_name():
  run = _lines(_launch("tpu", "run", "--name=mj", "--zone=z", "--dry_run", "--config=configs/pretrain_tiny.py",
                       "--workdir=gs://b/lr"))
  assert len(run) == 3
  for line, lr in zip(run, ("0.001", "0.003", "0.01")):
    assert f"--workdir=gs://b/lr/optimizer.lr={lr} --config.optimizer.lr={lr}" in line


def test_tpu_run_refuses_a_local_workdir():
  result = _launch("tpu", "run", "--name=mj", "--zone=z", "--dry_run", "--config=configs/pretrain_tiny.py",
                   "--workdir=/tmp/x")
  assert result.returncode != 0 and "must be a gs:// URL" in result.stderr


class FakeGcloud:
  """Stands in for `subprocess.run`: `describe` answers from a script of states (the last one repeats; None is
  NOT_FOUND), every other command succeeds (or exits with `rc[verb]`); all are recorded as `<group> <verb>`."""

  def __init__(self, node=(None,), queued=(None,), rc=None):
    self.answers = {"tpu-vm": list(node), "queued-resources": list(queued)}
    self.rc = rc or {}
    self.calls, self.lines = [], []

  def __call__(self, cmd, check=False, capture_output=False, **kwargs):
    cmd = list(cmd)
    group, verb = cmd[3], cmd[4]
    self.calls.append(f"{group} {verb}")
    if verb == "describe":
      answers = self.answers[group]
      out = answers.pop(0) if len(answers) > 1 else answers[0]
      if out is None:
        return subprocess.CompletedProcess(cmd, 1, "", f"ERROR: (gcloud) NOT_FOUND: Resource '{cmd[5]}' was not found")
      return subprocess.CompletedProcess(cmd, 0, out + "\n", "")
    self.lines.append(shlex.join(cmd))
    rc = self.rc.get(verb, 0)
    if check and rc:
      raise subprocess.CalledProcessError(rc, cmd)
    return subprocess.CompletedProcess(cmd, rc)


@pytest.fixture
def gcloud(monkeypatch):
  def install(**script):
    fake = FakeGcloud(**script)
    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.setattr(tpu.time, "sleep", lambda seconds: None)
    return fake
  return install


def test_tpu_create_replaces_a_suspended_request_after_waiting_out_suspending(gcloud, capsys):
  fake = gcloud(queued=["SUSPENDING", "SUSPENDED", None, "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  tpu.main(["create", *WHERE, "--accelerator_type=v6e-16", "--spot", "--queued"])
  assert fake.calls == ["queued-resources describe"] * 2 + ["queued-resources delete", "queued-resources describe",
                                                             "queued-resources create"] + ["queued-resources describe"] * 3
  assert fake.lines == [f"gcloud compute tpus queued-resources delete {AT} --force --quiet",
                        "gcloud compute tpus queued-resources create mj --node-id=mj --zone=us-east5-a --project=proj "
                        "--accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e --spot"]
  out = capsys.readouterr().out
  assert "queued resource mj is SUSPENDED: it can never run again (its VM is gone); replacing it" in out
  assert "next `python -m launch.tpu setup" in out


def test_tpu_create_waits_for_a_request_already_queued_instead_of_asking_twice(gcloud, capsys):
  fake = gcloud(queued=["WAITING_FOR_RESOURCES", "ACTIVE"])
  tpu.main(["create", *WHERE, "--queued"])
  assert fake.lines == [] and "already requested (WAITING_FOR_RESOURCES)" in capsys.readouterr().out


@pytest.mark.parametrize("queued,message", [
    (["WAITING_FOR_RESOURCES"], "is still WAITING_FOR_RESOURCES after 0.0 min (--timeout_minutes)"),
    ([None, "PROVISIONING", "FAILED"], "the request is FAILED"),
    ([None, "ACTIVE"], "")])
def test_tpu_create_wait_ends_on_active_failure_or_timeout(gcloud, queued, message):
  gcloud(queued=queued)
  argv = ["create", *WHERE, "--queued", "--timeout_minutes=0" if "after" in message else "--timeout_minutes=5"]
  if message:
    with pytest.raises(SystemExit, match=re.escape(message)):
      tpu.main(argv)
  else:
    tpu.main(argv)


def test_tpu_create_replaces_a_preempted_vm_through_its_queued_resource(gcloud, capsys):
  fake = gcloud(node=["PREEMPTED\tprojects/proj/locations/us-east5-a/queuedResources/mj-qr",
                      "PREEMPTED\tprojects/proj/locations/us-east5-a/queuedResources/mj-qr", "DELETING", None])
  tpu.main(["create", *WHERE, "--accelerator_type=v4-8"])
  assert fake.lines == ["gcloud compute tpus queued-resources delete mj-qr --zone=us-east5-a --project=proj --force --quiet",
                        f"gcloud compute tpus tpu-vm create {AT} --accelerator-type=v4-8 --version=tpu-ubuntu2204-base"]
  assert "TPU VM mj is PREEMPTED: it can never run again" in capsys.readouterr().out
  fake = gcloud(node=["TERMINATED", "TERMINATED", None])
  tpu.main(["create", *WHERE, "--accelerator_type=v4-8"])
  assert fake.lines[0] == f"gcloud compute tpus tpu-vm delete {AT} --quiet" and "tpu-vm create" in fake.lines[1]


@pytest.mark.parametrize("node,expect", [(["READY"], "already READY"), (["CREATING", "READY"], "waiting until it is READY"),
                                         (["STOPPED"], "start it"), (["HIDDEN"], "does not handle")])
def test_tpu_create_keeps_waits_for_or_explains_an_existing_vm(gcloud, capsys, node, expect):
  fake = gcloud(node=node)
  if expect.startswith("already") or expect.startswith("waiting"):
    tpu.main(["create", *WHERE])
    assert expect in capsys.readouterr().out
  else:
    with pytest.raises(SystemExit, match=expect):
      tpu.main(["create", *WHERE])
  assert fake.lines == []


@pytest.mark.parametrize("node,queued,expect", [
    (["READY\tprojects/p/locations/z/queuedResources/mj"], [None],
     f"gcloud compute tpus queued-resources delete {AT} --force --quiet"),
    (["READY"], [None], f"gcloud compute tpus tpu-vm delete {AT} --quiet"),
    ([None], ["SUSPENDED"], f"gcloud compute tpus queued-resources delete {AT} --force --quiet"),
    ([None], [None], None)])
def test_tpu_delete_never_leaves_the_queued_request_behind(gcloud, capsys, node, queued, expect):
  fake = gcloud(node=node, queued=queued)
  tpu.main(["delete", *WHERE])
  assert fake.lines == ([expect] if expect else [])
  assert expect or "nothing to delete" in capsys.readouterr().out


def test_tpu_cloud_errors_other_than_not_found_stop_with_gclouds_message(monkeypatch):
  denied = lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: PERMISSION_DENIED: TPU API not enabled")
  monkeypatch.setattr(subprocess, "run", denied)
  with pytest.raises(SystemExit, match="PERMISSION_DENIED: TPU API not enabled"):
    tpu.main(["create", *WHERE, "--queued"])


def test_tpu_foreground_run_reports_a_preempted_job_and_exits_75(gcloud, capsys):
  gcloud(rc={"ssh": 75})
  with pytest.raises(SystemExit) as stop:
    tpu.main(["run", *WHERE, "--config=configs/pretrain_tiny.py", "--workdir=gs://b/lr"])
  assert stop.value.code == 75
  assert "gs://b/lr/optimizer.lr=0.001: exit status 75 (preempted: `create`, `setup` and `run` again resume it)" in \
      capsys.readouterr().err


def test_tpu_status_of_a_preempted_slice_says_what_to_do(gcloud, capsys):
  fake = gcloud(node=["PREEMPTED\tprojects/p/locations/z/queuedResources/mj"])
  tpu.main(["status", *WHERE])
  out = capsys.readouterr().out
  assert "TPU VM PREEMPTED (made by queued resource mj)" in out and "`create` replaces it, then `setup`" in out
  assert fake.lines == []
  fake = gcloud(node=[None], queued=["SUSPENDED"])
  tpu.main(["status", *WHERE])
  assert "queued resource mj is SUSPENDED" in capsys.readouterr().out
  fake = gcloud(node=["READY"])
  tpu.main(["status", *WHERE])
  assert fake.lines == [f"gcloud compute tpus tpu-vm ssh {AT} --worker=all '--command=cd $HOME/ministral_jax && "
                        "$HOME/ministral_jax_venv/bin/python -m launch.tpu _status'"]


# ---------------------------------------------------------------- what `run --detach` starts on each worker

def _wait_for(path, seconds=30):
  deadline = time.monotonic() + seconds
  while not os.path.exists(path):
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def _fake_python(tmp_path, rc):
  """Prints its arguments like a job would, then exits with `rc` (the first job only, when `rc` is 75)."""
  script = tmp_path / "fake_python"
  script.write_text(f'#!/bin/sh\necho "job $*"\nexit {rc}\n')
  script.chmod(0o755)
  return str(script)


@pytest.mark.parametrize("rc", [0, 75])
def test_worker_detached_run_logs_records_its_exit_status_and_copies_the_log(tmp_path, monkeypatch, capsys, rc):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  workdir = tmp_path / "work"
  tpu.main(["_start", f"--python={_fake_python(tmp_path, rc)}", "--config=configs/pretrain_tiny.py",
            f"--workdir={workdir}", "--", "--config.train.steps=4"])
  assert "started (pid" in capsys.readouterr().out
  run_dir = tmp_path / "home" / "ministral_jax_run"
  _wait_for(run_dir / "exit_status")
  assert (run_dir / "exit_status").read_text() == str(rc)
  log = (run_dir / "worker.log").read_text()
  ran = [line for line in log.splitlines() if line.startswith("job ")]
  assert ran[0] == f"job -m ministral_jax.main --config=configs/pretrain_tiny.py --workdir={workdir}/optimizer.lr=0.001 " \
                   "--config.optimizer.lr=0.001 --config.train.steps=4"
  assert len(ran) == (3 if rc == 0 else 1)  # a preempted job stops the sweep
  copied = workdir / "logs" / f"{socket.gethostname()}.log"
  _wait_for(copied)
  assert copied.read_text() == log
  tpu.main(["_status"])
  status = capsys.readouterr().out
  assert f"ended, exit status {rc} ({tpu.EXIT_MEANING[rc]})" in status
  tpu.main(["_logs", "--lines=1"])
  assert capsys.readouterr().out == f"[{socket.gethostname()}] {log.splitlines()[-1]}\n"


def test_worker_refuses_a_second_detached_run_while_one_is_going(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "ministral_jax_run").mkdir()
  (tmp_path / "ministral_jax_run" / "pid").write_text(str(os.getpid()))  # alive
  with pytest.raises(SystemExit, match=f"a detached run is still going \\(pid {os.getpid()}\\)"):
    tpu.main(["_start", "--config=configs/pretrain_tiny.py", "--workdir=/tmp/unused"])


def test_worker_status_without_a_run(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("HOME", str(tmp_path))
  tpu.main(["_status"])
  assert capsys.readouterr().out == f"{socket.gethostname()}: no detached run here\n"


def test_gpu_dry_run_sets_the_xla_flags_and_runs_main():
  line, = _lines(_launch("gpu", "--config=configs/describe.py:ministral3_3b", "--workdir=/tmp/d", "--dry_run"))
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in line and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in line
  assert line.endswith("-m ministral_jax.main --config=configs/describe.py:ministral3_3b --workdir=/tmp/d")


def test_sweep_helpers_cross_pair_and_name_points():
  points = sweep.product([sweep.sweep("config.optimizer.lr", [1e-3, 3e-3]),
                          sweep.zip([sweep.sweep("seed", [0, 1]), sweep.sweep("data.seq_len", [64, 128])])])
  assert points[1] == {"optimizer.lr": 1e-3, "seed": 1, "data.seq_len": 128} and len(points) == 4
  assert len({sweep.run_name(p) for p in points}) == 4
  assert sweep.run_name({"distill.teacher": "/ckpt/a b"}) == "distill.teacher=_ckpt_a_b"
  assert sweep.flags({"train.steps": 5, "data.paths": "a.txt"}) == ["--config.train.steps=5", "--config.data.paths=a.txt"]
  with pytest.raises(ValueError, match="one length"):
    sweep.zip([sweep.sweep("a", [1]), sweep.sweep("b", [1, 2])])
  with pytest.raises(ValueError, match="twice"):
    sweep.product([sweep.sweep("a", [1]), sweep.sweep("config.a", [2])])


def test_local_sweep_runs_every_point_and_writes_one_summary_table(tmp_path):
  lines = _lines(_launch("local", "--config=configs/pretrain_tiny.py", f"--workdir={tmp_path}", "--", *TINY))
  rows = json.loads((tmp_path / "sweep.json").read_text())
  assert list(rows) == ["optimizer.lr=0.001", "optimizer.lr=0.003", "optimizer.lr=0.01"]
  assert all(r["step"] == 4 and r["eval_loss"] > 0 for r in rows.values())
  assert len({r["loss"] for r in rows.values()}) == 3  # three different runs
  table = (tmp_path / "sweep.md").read_text()
  assert table.count("| optimizer.lr=") == 3 and "eval_loss" in table
  assert all((tmp_path / name / "params" / "model_config.json").exists() for name in rows)
  assert any(line.startswith("| point |") for line in lines)


def test_gs_workdirs_stay_gs_urls_for_orbax_tensorboard_and_launchers():
  w = "gs://bucket/exp"
  assert str(checkpointing.checkpoint_dir(w)) == "gs://bucket/exp/checkpoints"
  assert metrics.tensorboard_dir(w) == "gs://bucket/exp/tb"
  assert common.join_path(w, "optimizer.lr=0.001") == "gs://bucket/exp/optimizer.lr=0.001"
  assert str(pipeline.tokenizer_cache(w)).startswith(os.path.expanduser("~/.cache/ministral_jax"))


def test_workdir_paths_reach_orbax_and_tensorboard_unchanged(tmp_path, monkeypatch):
  """A local run records what orbax's CheckpointManager and TensorBoard's writer were given."""
  import orbax.checkpoint as ocp
  import tensorboardX
  seen = {}
  manager_init, writer_init = ocp.CheckpointManager.__init__, tensorboardX.SummaryWriter.__init__

  def record_manager(self, directory, *a, **k):
    seen.setdefault("checkpoints", str(directory))
    manager_init(self, directory, *a, **k)

  def record_writer(self, logdir=None, *a, **k):
    seen["tb"] = logdir
    writer_init(self, logdir, *a, **k)
  monkeypatch.setattr(ocp.CheckpointManager, "__init__", record_manager)
  monkeypatch.setattr(tensorboardX.SummaryWriter, "__init__", record_writer)
  cfg = configs.load(os.path.join(REPO, "configs", "pretrain_tiny.py"))
  for flag in TINY:
    key, value = flag[len("--config."):].split("=")
    section, field = key.split(".")
    cfg[section][field] = type(cfg[section][field])(value)
  cfg.train.global_batch = 8  # the 8 simulated devices of the test process
  workdir = str(tmp_path) + "/run"
  from ministral_jax.train import pretrain
  pretrain.run(cfg, workdir)
  assert seen == {"checkpoints": workdir + "/checkpoints", "tb": workdir + "/tb"}
  assert (epath.Path(workdir) / "tb").exists() and orbax_io.load_config(workdir + "/params").d_model == 32
