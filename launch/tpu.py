"""Cloud TPU: create a TPU VM or a multi-host pod slice, install this package on every worker in a Python
of its own, run any config on all workers at once with its workdir on GCS (in the foreground, or detached
so that a dropped SSH connection does not stop it), watch it, tear it down.

    python -m launch.tpu create --name=mj --zone=us-east5-a --accelerator_type=v5p-32 [--spot] [--queued]
    python -m launch.tpu setup  --name=mj --zone=us-east5-a [--ref=REF] [--repo_url=URL]
    python -m launch.tpu run    --name=mj --zone=us-east5-a --config=configs/cascade_ministral3.py \\
        --workdir=gs://BUCKET/cascade [--detach] [-- --config.parent.checkpoint=gs://BUCKET/ckpt/ms31]
    python -m launch.tpu status --name=mj --zone=us-east5-a
    python -m launch.tpu logs   --name=mj --zone=us-east5-a [--worker=0] [--lines=100] [--follow]
    python -m launch.tpu delete --name=mj --zone=us-east5-a [--queued]

Add `--dry_run` to any of them to print the exact gcloud commands instead, with `#` lines saying which of
them run when (some depend on what already exists).

create   `--queued` asks through a queued resource (the way to wait for capacity, Spot capacity included),
         whose VM gets the same name, and waits until it is ACTIVE, at most `--timeout_minutes`; the
         request stays queued after that, and `create` again resumes the wait. A resource of that name
         that can never run again (a queued resource SUSPENDED, which is what a preempted Spot request
         becomes, or FAILED; a VM PREEMPTED or TERMINATED) is deleted and created anew, and says so; one
         being suspended or deleted is waited out first; one that is waiting or ready is kept. v5e is
         spelled `v5litepod-<chips>`. TPU7x (Ironwood) and later are provisioned through GKE, not by the
         Cloud TPU API behind `gcloud compute tpus`, so they are refused with that advice.
setup    On every worker: a Python 3.11 virtual environment made by uv (the images' python3 is Ubuntu's
         3.10, for which pip only finds a JAX too old for this code; uv is what Google's MaxText install
         guide uses on TPU VMs, and it fetches a managed CPython without apt or a PPA, the same on every
         image), made anew on every setup, with the tested versions in `PINS` and this repository with its
         `gcs` extra. The code is a fresh copy swapped in whole, so files deleted upstream do not linger:
         the committed tree at `--ref` (default HEAD) of this checkout, or `--ref` (branch, tag or commit)
         of `--repo_url`. A new VM, a preempted one's replacement included, is blank: `setup` it first.
run      The same command on every worker (`--worker=all`) with that environment's python; each process
         joins the others through `sharding.initialize_distributed` and the mesh spans the whole slice. A
         config with a sweep (`get_hyper`) runs its points one after the other, each in
         `<workdir>/<its overrides>`. `--detach` starts them in a new session on every worker (no
         terminal, so SSH going away does not stop them), output to `~/ministral_jax_run/worker.log`,
         copied every two minutes and at the end to `<workdir>/logs/<worker host>.log`; `status` and
         `logs` read them back. Exit status 75 means preempted, 2 a configuration error.
delete   Without `--queued` it looks first: a VM that a queued resource created is deleted through that
         queued resource (`--force` deletes its VM, then the request), and a queued resource of that name
         left without a VM is deleted too, so no request lingers. `--queued` deletes the queued resource
         directly.

A preempted Spot slice: `status` shows it (PREEMPTED, or its queued resource SUSPENDED); then `create`
(which replaces it), `setup`, `run` again: every job resumes from its gs:// workdir.

Google Cloud pages this rests on (read for each state name, flag and behaviour used here):
  https://cloud.google.com/tpu/docs/queued-resources  (request states; Ironwood only through GKE)
  https://cloud.google.com/tpu/docs/reference/rest/v2/projects.locations.queuedResources  (state enum)
  https://cloud.google.com/tpu/docs/reference/rest/v2/projects.locations.queuedResources/delete  (force)
  https://cloud.google.com/tpu/docs/reference/rest/v2/projects.locations.nodes  (VM states, queuedResource)
  https://cloud.google.com/tpu/docs/spot  (Spot VMs cannot be restarted, only recreated)
  https://cloud.google.com/tpu/docs/preemptible  (a preempted VM's state goes from READY to PREEMPTED)
  https://cloud.google.com/tpu/docs/runtimes  (software version per generation, v5e as v5litepod)
  https://cloud.google.com/tpu/docs/tpu7x-training  (TPU7x is provisioned through GKE / XPK)
  https://cloud.google.com/tpu/docs/tutorials/LLM/jetstream  (the images' python3 is 3.10)
  https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/create  (and .../ssh, .../scp,
    .../describe, .../delete; compute/tpus/queued-resources/create, .../describe, .../delete)
  https://github.com/AI-Hypercomputer/maxtext/blob/main/docs/guides/install_maxtext.md  (uv venv on TPU VMs)
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, NoReturn, Sequence

from launch import common
from ministral_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = "/tmp/ministral_jax.tar.gz"
# Worker paths, expanded by the worker's shell: never inside single quotes.
REMOTE_DIR = "$HOME/ministral_jax"
VENV = "$HOME/ministral_jax_venv"
PYTHON = f"{VENV}/bin/python"
RUN_DIR = "~/ministral_jax_run"  # a detached run's pid, log and exit status, on each worker
PYTHON_VERSION = "3.11"
UV = "uv==0.13.9"
# What this code is tested with (tests/test_launch.py checks jax against the installed one).
PINS = ("jax[tpu]==0.10.2", "flax==0.12.8", "optax==0.2.8", "orbax-checkpoint==0.12.8", "grain==0.2.18")
LOG_SYNC_SECONDS = 120

# The TPU VM software version that goes with each generation (accelerator types are `<generation>-<size>`).
RUNTIMES = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
            "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}

# Queued resource states, by what `create` does about them.
QR_WAITING = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")
QR_DEAD = ("SUSPENDED", "FAILED")  # its VM is gone (preempted, or never came): only a new request runs
QR_LEAVING = ("SUSPENDING", "DELETING")
# TPU VM states.
NODE_BUSY = ("CREATING", "STARTING", "RESTARTING", "REIMAGING", "REPAIRING")
NODE_DEAD = ("PREEMPTED", "TERMINATED")
NODE_STOPPED = ("STOPPING", "STOPPED")

EXIT_MEANING = {0: "finished", errors.EXIT_PREEMPTED: "preempted: `create`, `setup` and `run` again resume it",
                errors.EXIT_USER_ERROR: "a configuration error: see the log"}


# ---------------------------------------------------------------- accelerator types

def _fail(message: str) -> NoReturn:
  raise SystemExit(f"error: {message}")


def generation(accelerator_type: str) -> str:
  """`v5p-32` -> `v5p`, refusing names the Cloud TPU API does not take, with what to use instead."""
  match = re.fullmatch(r"([a-z][a-z0-9]*)-(\d+)", accelerator_type)
  if not match:
    _fail(f"--accelerator_type={accelerator_type!r}: expected <generation>-<size>, e.g. v5p-32, "
          "v5litepod-16, v6e-8.")
  gen, size = match.groups()
  if gen in ("v5e", "v5lite"):
    _fail(f"--accelerator_type={accelerator_type}: v5e's accelerator types are spelled v5litepod-<chips>; "
          f"use --accelerator_type=v5litepod-{size}.")
  major = re.match(r"(?:v|tpu)(\d+)", gen)
  if gen == "ironwood" or (major and int(major.group(1)) >= 7):
    _fail(f"--accelerator_type={accelerator_type}: TPU7x (Ironwood) and later generations are not served by "
          "the Cloud TPU API that `gcloud compute tpus` drives; they are provisioned through GKE (e.g. with "
          "XPK). Use GKE for them, or a v6e, v5p or v5litepod slice here.")
  return gen


def runtime_for(accelerator_type: str) -> str:
  gen = generation(accelerator_type)
  if gen not in RUNTIMES:
    _fail(f"no default runtime for {accelerator_type!r}; pass --runtime_version (known generations: "
          f"{sorted(RUNTIMES)}).")
  return RUNTIMES[gen]


# ---------------------------------------------------------------- gcloud commands

def _where(args) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _tpus(*words: str) -> list[str]:
  return ["gcloud", "compute", "tpus", *words]


def _ssh(args, command: str, worker: str = "all") -> list[str]:
  return _tpus("tpu-vm", "ssh", args.name, *_where(args), f"--worker={worker}", f"--command={command}")


def _node_describe(args) -> list[str]:
  return _tpus("tpu-vm", "describe", args.name, *_where(args), "--format=value(state,queuedResource)")


def _qr_describe(args) -> list[str]:
  return _tpus("queued-resources", "describe", args.name, *_where(args), "--format=value(state.state)")


def _qr_delete(args, name: str = "") -> list[str]:
  return _tpus("queued-resources", "delete", name or args.name, *_where(args), "--force", "--quiet")


def _node_delete(args) -> list[str]:
  return _tpus("tpu-vm", "delete", args.name, *_where(args), "--quiet")


def _describe(cmd: Sequence[str]) -> str | None:
  """The command's output, or None when the resource does not exist (any other failure is an error)."""
  result = subprocess.run(list(cmd), capture_output=True, text=True)
  if result.returncode == 0:
    return result.stdout.strip()
  if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
    return None
  _fail(f"{shlex.join(cmd)} failed:\n{result.stderr.strip()[-800:]}")


def _node(args) -> tuple[str | None, str]:
  """The VM's state (None: no such VM) and the short name of the queued resource that made it, if any."""
  out = _describe(_node_describe(args))
  if out is None:
    return None, ""
  fields = out.split()
  return (fields[0] if fields else "STATE_UNSPECIFIED"), (fields[1].rsplit("/", 1)[-1] if len(fields) > 1 else "")


def _qr_state(args) -> str | None:
  return _describe(_qr_describe(args))


def _note(run: common.Runner, text: str) -> None:
  """What a dry run cannot decide (it depends on what exists), as a comment before the commands it guards."""
  if run.dry_run:
    print(f"# {text}", flush=True)


def _wait(args, what: str, probe: Callable[[], str | None], done: Callable[[str | None], bool],
          fail: Callable[[str | None], str]) -> str | None:
  """Polls `probe` until `done`; an error when `fail` names a reason, or after --timeout_minutes."""
  deadline = time.monotonic() + 60 * args.timeout_minutes
  while True:
    state = probe()
    if done(state):
      return state
    reason = fail(state)
    if reason:
      _fail(f"{what}: {reason}")
    if time.monotonic() + args.poll_seconds > deadline:
      _fail(f"{what} is still {state} after {args.timeout_minutes} min (--timeout_minutes). Nothing was "
            "deleted: `create` again goes on waiting, `delete` gives up.")
    print(f"{what}: {state}; next look in {args.poll_seconds}s", flush=True)
    time.sleep(args.poll_seconds)


def _wait_gone(args, what: str, probe: Callable[[], str | None]) -> None:
  _wait(args, what, probe, lambda state: state is None, lambda state: "")


# ---------------------------------------------------------------- create

def create(args: argparse.Namespace, run: common.Runner) -> None:
  """Creates the slice, replacing a dead one of that name, and waits until it can be used."""
  generation(args.accelerator_type)  # refuses v5e's wrong spellings and TPU7x, --runtime_version or not
  version = args.runtime_version or runtime_for(args.accelerator_type)
  (_create_queued if args.queued else _create_vm)(args, run, version)
  if not run.dry_run:
    print(f"{args.name} is ready. A new VM is blank: next `python -m launch.tpu setup --name={args.name} "
          f"--zone={args.zone}`.", flush=True)


def _qr_wait_failure(state: str | None) -> str:
  if state is None:
    return "the request disappeared (deleted by someone else?)."
  if state in QR_DEAD or state == "SUSPENDING":
    return (f"the request is {state}: its VM was deleted or never came (a Spot preemption, a failed "
            "provisioning). `create` again replaces it; `gcloud compute tpus queued-resources describe` says why.")
  if state == "DELETING":
    return "the request is being deleted."
  return ""


def _create_queued(args, run: common.Runner, version: str) -> None:
  spot = ["--spot"] if args.spot else []
  create_cmd = _tpus("queued-resources", "create", args.name, f"--node-id={args.name}", *_where(args),
                     f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}", *spot)
  what = f"queued resource {args.name}"
  if run.dry_run:
    _note(run, f"Is there a request of that name already (one {'/'.join(QR_LEAVING)} is waited out first)?")
    run(_qr_describe(args))
    _note(run, f"if it is {' or '.join(QR_DEAD)} it can never run again: it is replaced (deleted, then created):")
    run(_qr_delete(args))
    _note(run, f"if there is none (or it was just deleted); one waiting ({'/'.join(QR_WAITING)}) or ACTIVE is "
               "kept:")
    run(create_cmd)
    _note(run, f"then, every {args.poll_seconds}s for at most {args.timeout_minutes} min, until it prints ACTIVE:")
    run(_qr_describe(args))
    return
  state = _wait(args, what, lambda: _qr_state(args), lambda s: s not in QR_LEAVING, lambda s: "")
  if state in QR_DEAD:
    print(f"{what} is {state}: it can never run again (its VM is gone); replacing it: delete, then create.",
          flush=True)
    run(_qr_delete(args))
    _wait_gone(args, what, lambda: _qr_state(args))
    state = None
  if state is None:
    run(create_cmd)
  elif state == "ACTIVE":
    print(f"{what} is already ACTIVE; nothing to create.", flush=True)
    return
  else:
    print(f"{what} is already requested ({state}); waiting for it rather than asking twice.", flush=True)
  _wait(args, what, lambda: _qr_state(args), lambda s: s == "ACTIVE", _qr_wait_failure)


def _create_vm(args, run: common.Runner, version: str) -> None:
  spot = ["--spot"] if args.spot else []
  create_cmd = _tpus("tpu-vm", "create", args.name, *_where(args), f"--accelerator-type={args.accelerator_type}",
                     f"--version={version}", *spot)
  what = f"TPU VM {args.name}"
  if run.dry_run:
    _note(run, "Is there a VM of that name already (one DELETING is waited out first)?")
    run(_node_describe(args))
    _note(run, f"if it is {' or '.join(NODE_DEAD)} it can never run again: it is replaced (deleted, through its "
               "queued resource with --force when one made it, then created):")
    run(_node_delete(args))
    _note(run, f"if there is none (or it was just deleted); a READY one is kept, one {'/'.join(NODE_BUSY)} "
               "is waited for:")
    run(create_cmd)
    return
  node_state = lambda: _node(args)[0]
  state = _wait(args, what, node_state, lambda s: s != "DELETING", lambda s: "")
  if state in NODE_DEAD:
    queued = _node(args)[1]
    print(f"{what} is {state}: it can never run again (a Spot or preemptible VM is recreated, not restarted); "
          f"replacing it: delete{' its queued resource ' + queued if queued else ''}, then create.", flush=True)
    run(_qr_delete(args, queued) if queued else _node_delete(args))
    _wait_gone(args, what, node_state)
    state = None
  if state is None:
    run(create_cmd)  # gcloud returns once the VM is READY
  elif state == "READY":
    print(f"{what} is already READY; nothing to create.", flush=True)
  elif state in NODE_BUSY:
    print(f"{what} is {state}; waiting until it is READY.", flush=True)
    _wait(args, what, node_state, lambda s: s == "READY",
          lambda s: "" if s in NODE_BUSY else f"it went {s} instead of READY; `create` again deals with it.")
  elif state in NODE_STOPPED:
    _fail(f"{what} is {state}: start it (`gcloud compute tpus tpu-vm start {args.name} --zone={args.zone}`) "
          "or delete it (`python -m launch.tpu delete`).")
  else:
    _fail(f"{what} is {state}, which this launcher does not handle: delete it (`python -m launch.tpu delete`), "
          "then create it again.")


# ---------------------------------------------------------------- setup

def _busy_guard() -> str:
  """Shell: stop if a detached run is still going on this worker (setup would pull its code away)."""
  pid = f"{RUN_DIR}/pid"
  return (f'if [ -f {pid} ] && [ ! -f {RUN_DIR}/exit_status ] && kill -0 "$(cat {pid})" 2>/dev/null; then echo '
          f'"$(hostname): a detached run is still going (pid $(cat {pid})); wait for it or stop it first" >&2; '
          'exit 1; fi')


def setup(args: argparse.Namespace, run: common.Runner) -> None:
  """Installs the code at --ref and the pinned packages into a fresh Python 3.11 environment on every worker."""
  new = f"{REMOTE_DIR}.new"
  if args.repo_url:
    fetch = (f'rm -rf "{new}" && git init -q "{new}" && git -C "{new}" fetch -q --depth=1 '
             f'{shlex.quote(args.repo_url)} {shlex.quote(args.ref)} && git -C "{new}" checkout -q --detach FETCH_HEAD')
  else:
    run(["git", "archive", "--format=tar.gz", f"--output={ARCHIVE}", args.ref])
    run(_tpus("tpu-vm", "scp", ARCHIVE, f"{args.name}:~/", *_where(args), "--worker=all"))
    fetch = f'rm -rf "{new}" && mkdir -p "{new}" && tar -xzf ~/{os.path.basename(ARCHIVE)} -C "{new}"'
  swap = f'rm -rf "{REMOTE_DIR}" && mv "{new}" "{REMOTE_DIR}"'
  # uv itself goes to the user site of the image's python3 (PEP 668 images refuse that without the variable).
  uv = f"PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user {UV}"
  venv = f'rm -rf "{VENV}" && python3 -m uv venv -q --python {PYTHON_VERSION} --seed "{VENV}"'
  install = (f'python3 -m uv pip install -q --python "{PYTHON}" {" ".join(shlex.quote(p) for p in PINS)} '
             f'-e "{REMOTE_DIR}[gcs]"')
  check = f'"{PYTHON}" -c \'import sys, jax; print(sys.version.split()[0], "jax", jax.__version__)\''
  run(_ssh(args, " && ".join([_busy_guard(), fetch, swap, uv, venv, install, check])))


# ---------------------------------------------------------------- run, status, logs

def _remote_python(*argv: str) -> str:
  """`cd` to the code and run the environment's python (its path must stay out of quotes: it has $HOME)."""
  return f'cd {REMOTE_DIR} && {PYTHON} {shlex.join(argv)}'


def _job_flags(args) -> list[str]:
  return [f"--config={args.config}", f"--workdir={args.workdir}", *(["--", *args.overrides] if args.overrides else [])]


def run_config(args: argparse.Namespace, run: common.Runner) -> None:
  """Every sweep point on every worker: one after the other over SSH, or all detached at once."""
  if not args.workdir.startswith("gs://"):
    _fail(f"--workdir={args.workdir!r} must be a gs:// URL: every worker of the slice writes checkpoints and "
          "logs there.")
  todo = common.jobs(args.config, args.workdir, args.overrides)
  if args.detach:
    _note(run, "on every worker, in a session of its own, one after the other:")
    for _, workdir, overrides in todo:
      _note(run, f"  {PYTHON} " + shlex.join(common.main_command(args.config, workdir, overrides)[1:]))
    run(_ssh(args, _remote_python("-m", "launch.tpu", "_start", *_job_flags(args))))
    if not run.dry_run:
      print(f"Started on every worker. Follow: python -m launch.tpu logs --name={args.name} --zone={args.zone} "
            f"--follow; state: python -m launch.tpu status --name={args.name} --zone={args.zone}", flush=True)
    return
  for _, workdir, overrides in todo:
    command = common.main_command(args.config, workdir, overrides, python="python")[1:]
    try:
      run(_ssh(args, f"cd {REMOTE_DIR} && MINISTRAL_JAX_MULTIHOST=1 {PYTHON} {shlex.join(command)}"))
    except subprocess.CalledProcessError as e:
      # 255 is SSH's own failure: the VM went away mid-job (a preemption takes it without a word) or is unreachable.
      meaning = EXIT_MEANING.get(e.returncode, "SSH failed: was the VM preempted? `status` says" if e.returncode == 255
                                 else "failed: see the output above")
      print(f"{workdir}: exit status {e.returncode} ({meaning}).", file=sys.stderr, flush=True)
      raise SystemExit(e.returncode) from None


def status(args: argparse.Namespace, run: common.Runner) -> None:
  """The slice's state, then (if it is READY) each worker's detached run."""
  if run.dry_run:
    run(_node_describe(args))
    _note(run, "if there is no VM: whether a queued resource of that name is left (waiting, SUSPENDED, FAILED):")
    run(_qr_describe(args))
    _note(run, "if it is READY:")
    run(_ssh(args, _remote_python("-m", "launch.tpu", "_status"), args.worker))
    return
  state, queued = _node(args)
  made_by = f" (made by queued resource {queued})" if queued else ""
  if state is None:
    qr = _qr_state(args)
    print(f"{args.name}: no TPU VM" + (f"; queued resource {args.name} is {qr}." if qr else "."), flush=True)
    if qr in QR_DEAD:
      print("It can never run again: `create --queued` replaces it, then `setup` and `run` again (every job "
            "resumes from its gs:// workdir).", flush=True)
    return
  print(f"{args.name}: TPU VM {state}{made_by}.", flush=True)
  if state in NODE_DEAD:
    print("Preempted or terminated: `create` replaces it, then `setup` (the new VM is blank) and `run` again; "
          "every job resumes from its gs:// workdir. Logs so far: <workdir>/logs/.", flush=True)
  elif state == "READY":
    run(_ssh(args, _remote_python("-m", "launch.tpu", "_status"), args.worker))


def logs(args: argparse.Namespace, run: common.Runner) -> None:
  """The end of each worker's detached-run log (`--follow`: then what comes, until the run ends)."""
  argv = ["-m", "launch.tpu", "_logs", f"--lines={args.lines}"] + (["--follow"] if args.follow else [])
  run(_ssh(args, _remote_python(*argv), args.worker))


# ---------------------------------------------------------------- delete

def delete(args: argparse.Namespace, run: common.Runner) -> None:
  """Deletes the VM and the queued resource that made it, if one did."""
  if args.queued:
    run(_qr_delete(args))
    return
  if run.dry_run:
    _note(run, "Did a queued resource make this VM (then deleting it deletes the VM, and no request lingers)?")
    run(_node_describe(args))
    _note(run, "if one did, or there is no VM but a queued resource of that name (looked up with the next line):")
    run(_qr_describe(args))
    run(_qr_delete(args))
    _note(run, "otherwise:")
    run(_node_delete(args))
    return
  state, queued = _node(args)
  if queued:
    print(f"{args.name} was made by queued resource {queued}: deleting that (--force deletes its VM too).",
          flush=True)
    run(_qr_delete(args, queued))
  elif state is not None:
    run(_node_delete(args))
  elif _qr_state(args) is not None:
    print(f"No TPU VM {args.name}, but a queued resource of that name: deleting it.", flush=True)
    run(_qr_delete(args))
  else:
    print(f"No TPU VM or queued resource named {args.name} in {args.zone}; nothing to delete.", flush=True)


# ---------------------------------------------------------------- on a worker (through `run --detach`)

def _run_dir() -> str:
  return os.path.expanduser(RUN_DIR)


def _running_pid() -> int | None:
  """The detached run's pid while it runs (its exit status, written last, says it has ended)."""
  if os.path.exists(os.path.join(_run_dir(), "exit_status")):
    return None
  try:
    with open(os.path.join(_run_dir(), "pid")) as f:
      pid = int(f.read())
    os.kill(pid, 0)
    return pid
  except (OSError, ValueError):
    return None


def worker_start(args: argparse.Namespace) -> None:
  """Starts `_jobs` in a new session (no terminal: SSH leaving sends it nothing), its output to the log."""
  host = socket.gethostname()
  pid = _running_pid()
  if pid:
    _fail(f"{host}: a detached run is still going (pid {pid}); `status` / `logs` show it. Wait for it, or stop "
          f"it (`kill -TERM -- -{pid}` on every worker: the job saves, then exits with status 75).")
  state = _run_dir()
  os.makedirs(state, exist_ok=True)
  log = os.path.join(state, "worker.log")
  if os.path.exists(log):
    os.replace(log, log + ".1")  # the previous run's log, one generation
  for stale in ("exit_status", "pid"):
    if os.path.exists(os.path.join(state, stale)):
      os.remove(os.path.join(state, stale))
  argv = [sys.executable, "-m", "launch.tpu", "_jobs", f"--python={args.python}", *_job_flags(args)]
  with open(log, "ab") as out:
    child = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
  with open(os.path.join(state, "pid"), "w") as f:
    f.write(str(child.pid))
  print(f"{host}: started (pid {child.pid}); log {log}", flush=True)


def _upload(log: str, dest: str) -> None:
  """Best effort: a log that cannot be copied now is copied at the next sync."""
  try:
    from etils import epath
    path = epath.Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(open(log, "rb").read())
  except Exception as e:  # noqa: BLE001 - a failed copy must never stop the job
    print(f"(log copy to {dest} failed: {e})", flush=True)


def _stamp() -> str:
  return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _sync_log(log: str, dest: str, stop: threading.Event) -> None:
  """So that a preempted VM, which takes its disk along, still leaves most of its log in the workdir."""
  while not stop.wait(LOG_SYNC_SECONDS):
    _upload(log, dest)


def worker_jobs(args: argparse.Namespace) -> int:
  """Every sweep point, one after the other, stopping at the first failure; records the exit status."""
  state = _run_dir()
  log = os.path.join(state, "worker.log")
  dest = common.join_path(common.join_path(args.workdir, "logs"), f"{socket.gethostname()}.log")
  stop = threading.Event()
  # A preemption (or `kill -TERM`) reaches the job too: let it save and exit 75, start no further job.
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  threading.Thread(target=_sync_log, args=(log, dest, stop), daemon=True).start()
  rc = 0
  for name, workdir, overrides in common.jobs(args.config, args.workdir, args.overrides):
    if stop.is_set():
      rc = rc or errors.EXIT_PREEMPTED
      break
    command = common.main_command(args.config, workdir, overrides, python=args.python)
    print(f"[{_stamp()}] {name}: {shlex.join(command)}", flush=True)
    rc = subprocess.run(command, cwd=REPO, env={**os.environ, "MINISTRAL_JAX_MULTIHOST": "1"}).returncode
    print(f"[{_stamp()}] {name}: exit status {rc} ({EXIT_MEANING.get(rc, 'failed')})", flush=True)
    if rc:
      break
  stop.set()
  _upload(log, dest)
  with open(os.path.join(state, "exit_status"), "w") as f:
    f.write(str(rc))
  return rc


def worker_status(args: argparse.Namespace) -> None:
  del args
  host, state = socket.gethostname(), _run_dir()
  log = os.path.join(state, "worker.log")
  last = ""
  if os.path.exists(log):
    lines = open(log, errors="replace").read().splitlines()
    last = f"; last line: {lines[-1]}" if lines else ""
  pid = _running_pid()
  if pid:
    print(f"{host}: running (pid {pid}){last}", flush=True)
  elif os.path.exists(os.path.join(state, "exit_status")):
    rc = int(open(os.path.join(state, "exit_status")).read())
    print(f"{host}: ended, exit status {rc} ({EXIT_MEANING.get(rc, 'failed: see the log')}){last}", flush=True)
  elif os.path.exists(os.path.join(state, "pid")):
    print(f"{host}: stopped without an exit status (killed, or the VM restarted){last}", flush=True)
  else:
    print(f"{host}: no detached run here", flush=True)


def worker_logs(args: argparse.Namespace) -> None:
  """Each line prefixed by the host: `--worker=all` interleaves the workers' output."""
  host = socket.gethostname()
  log = os.path.join(_run_dir(), "worker.log")
  if not os.path.exists(log):
    print(f"[{host}] no log at {log}", flush=True)
    return
  with open(log, errors="replace") as f:
    for line in f.read().splitlines()[-args.lines:] if args.lines > 0 else []:
      print(f"[{host}] {line}", flush=True)
    while args.follow:
      line = f.readline()
      if line:
        print(f"[{host}] {line.rstrip()}", flush=True)
      elif _running_pid() is None:
        return
      else:
        time.sleep(1)


# ---------------------------------------------------------------- command line

COMMANDS = {"create": create, "setup": setup, "run": run_config, "status": status, "logs": logs, "delete": delete}
ON_WORKER = {"_start": worker_start, "_jobs": worker_jobs, "_status": worker_status, "_logs": worker_logs}


def _add_flags(name: str, s: argparse.ArgumentParser) -> None:
  if name in ("_start", "_jobs"):
    common.add_job_flags(s)
    s.add_argument("--python", default=sys.executable, help="the jobs' interpreter")
    return
  if name == "_logs":
    s.add_argument("--lines", type=int, default=50)
    s.add_argument("--follow", action="store_true")
  if name.startswith("_"):
    return
  s.add_argument("--dry_run", action="store_true", help="print the exact commands instead of running them")
  s.add_argument("--name", required=True, help="the TPU VM / queued resource name")
  s.add_argument("--zone", required=True)
  s.add_argument("--project", default="", help="default: gcloud's configured project")
  if name in ("create", "delete"):
    s.add_argument("--queued", action="store_true", help="through a queued resource (how to wait for capacity)")
  if name == "create":
    s.add_argument("--accelerator_type", default="v5p-8", help="e.g. v4-32, v5p-32, v5litepod-16 (v5e), v6e-8")
    s.add_argument("--runtime_version", default="", help="default: the generation's TPU VM software version")
    s.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, preemptible")
  if name == "create":
    s.add_argument("--poll_seconds", type=int, default=60)
    s.add_argument("--timeout_minutes", type=float, default=120, help="how long to wait for the slice")
  if name == "setup":
    s.add_argument("--repo_url", default="", help="clone this instead of copying the local checkout")
    s.add_argument("--ref", default="HEAD", help="branch, tag or commit (default: this checkout's HEAD, or the "
                                                 "default branch of --repo_url)")
  if name == "run":
    common.add_job_flags(s)
    s.add_argument("--detach", action="store_true", help="start and return: SSH going away does not stop it")
  if name in ("status", "logs"):
    s.add_argument("--worker", default="all", help="all, or a worker index (0 prints process 0's output)")
  if name == "logs":
    s.add_argument("--lines", type=int, default=50)
    s.add_argument("--follow", action="store_true", help="then print what comes, until the run ends")


def main(argv: Sequence[str] | None = None) -> int | None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
  for name, fn in {**COMMANDS, **ON_WORKER}.items():
    if name.startswith("_"):
      s = sub.add_parser(name)  # what `run --detach`, `status` and `logs` start on each worker
    else:
      s = sub.add_parser(name, help=fn.__doc__, description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_flags(name, s)
  args = p.parse_args(argv)
  if args.command.startswith("_"):
    return ON_WORKER[args.command](args)
  return COMMANDS[args.command](args, common.Runner(args.dry_run))


if __name__ == "__main__":
  sys.exit(main())
