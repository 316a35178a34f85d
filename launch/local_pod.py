"""A pod slice on one machine: N JAX processes x K CPU devices, started the way `launch.tpu run` starts one
process per TPU host, with CPU collectives (gloo) between them.

    python -m launch.local_pod --processes=2 --devices_per_process=4 --config=configs/pretrain_tiny.py \\
        --workdir=/tmp/ministral_jax/pod [-- --config.train.steps=50]

Every process runs `python -m ministral_jax.main` with `MINISTRAL_JAX_MULTIHOST=1` (as on a TPU worker)
plus the coordinator's address and its process id (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`, which a TPU slice's metadata provides there). Process 0's output streams to the
console; each process's whole output goes to `<logdir>/process_<i>.log`. When one process fails, the
others are stopped (they would wait on it forever in their next collective), as a pod scheduler does.
The exit status is the first failing process's, or 0. Use it to try a multi-host config, its data
sharding and its checkpoints, before paying for a slice; the tests run every job through it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lines gloo prints for every connection it makes; they say nothing a user needs.
_NOISE = ("[Gloo] Rank",)


@dataclasses.dataclass
class Process:
  index: int
  popen: subprocess.Popen
  log: str
  returncode: int | None = None

  def output(self) -> str:
    with open(self.log, errors="replace") as f:
      return f.read()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(index: int, processes: int, devices_per_process: int, port: int,
                extra: dict[str, str] | None = None) -> dict[str, str]:
  """What process `index` of the local pod gets: the TPU launcher's flag plus a local coordinator."""
  return {**os.environ, "MINISTRAL_JAX_MULTIHOST": "1", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
          "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(index), "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}", **(extra or {})}


def start(args: Sequence[str], processes: int = 2, devices_per_process: int = 4, logdir: str | None = None,
          env: dict[str, str] | None = None, module: str = "ministral_jax.main") -> list[Process]:
  """Starts `python -m <module> <args>` as `processes` JAX processes; returns at once."""
  logdir = logdir or tempfile.mkdtemp(prefix="ministral_jax_pod_")
  os.makedirs(logdir, exist_ok=True)
  port = free_port()
  out = []
  for i in range(processes):
    log = os.path.join(logdir, f"process_{i}.log")
    with open(log, "w") as f:
      popen = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                               env=process_env(i, processes, devices_per_process, port, env))
    out.append(Process(i, popen, log))
  return out


def wait(procs: list[Process], timeout: float = 3600, grace: float = 30, echo: bool = False) -> int:
  """Waits for every process; once one fails, the rest get `grace` seconds, then SIGKILL. Returns the
  first failing process's status (or 0). `echo` streams process 0's log to stdout as it grows."""
  stop = threading.Event()
  if echo:
    threading.Thread(target=_tail, args=(procs[0].log, stop), daemon=True).start()
  deadline, failed_at = time.time() + timeout, None
  while any(p.returncode is None for p in procs):
    for p in procs:
      if p.returncode is None:
        p.returncode = p.popen.poll()
    failing = [p for p in procs if p.returncode not in (None, 0)]
    if failing and failed_at is None:
      failed_at = time.time()
    if (failed_at is not None and time.time() > failed_at + grace) or time.time() > deadline:
      for p in procs:
        if p.returncode is None:
          p.popen.kill()
          p.returncode = p.popen.wait()
    time.sleep(0.05)
  stop.set()
  time.sleep(0.2 if echo else 0)
  return next((p.returncode for p in procs if p.returncode != 0), 0)


def signal_all(procs: list[Process], sig: int) -> None:
  for p in procs:
    if p.popen.poll() is None:
      p.popen.send_signal(sig)


def _tail(path: str, stop: threading.Event) -> None:
  with open(path, errors="replace") as f:
    while True:
      line = f.readline()
      if line:
        if not line.startswith(_NOISE):
          sys.stdout.write(line)
          sys.stdout.flush()
      elif stop.is_set():
        return
      else:
        time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--processes", type=int, default=2, help="JAX processes (the hosts of the pod)")
  p.add_argument("--devices_per_process", type=int, default=4, help="simulated CPU devices per process")
  p.add_argument("--config", required=True, help="configs/<experiment>.py[:arg]")
  p.add_argument("--workdir", required=True, help="the job's workdir, shared by every process")
  p.add_argument("--logdir", default=None, help="where process_<i>.log go (default: a new temporary directory)")
  p.add_argument("overrides", nargs="*", help="extra --config.<field>=<value> flags (after --)")
  args = p.parse_args(argv)
  if args.processes < 1 or args.devices_per_process < 1:
    p.error("--processes and --devices_per_process must be at least 1")
  procs = start([f"--config={args.config}", f"--workdir={args.workdir}", *args.overrides], args.processes,
                args.devices_per_process, args.logdir)
  print(f"{args.processes} processes x {args.devices_per_process} CPU devices; logs in "
        f"{os.path.dirname(procs[0].log)}", flush=True)
  signal.signal(signal.SIGTERM, lambda *_: signal_all(procs, signal.SIGTERM))  # a preemption reaches every host
  sys.exit(wait(procs, echo=True))


if __name__ == "__main__":
  main()
