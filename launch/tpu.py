"""Cloud TPU: create a TPU VM or a multi-host pod slice, install the package on every worker, run any
config on all workers at once with its workdir on GCS, tear down.

    python -m launch.tpu create --name=mj --zone=us-east5-a --accelerator_type=v5p-32 [--spot] [--queued]
    python -m launch.tpu setup  --name=mj --zone=us-east5-a            # this checkout, on every worker
    python -m launch.tpu run    --name=mj --zone=us-east5-a --config=configs/cascade_ministral3.py \\
        --workdir=gs://BUCKET/cascade [-- --config.parent.checkpoint=gs://BUCKET/ckpt/ms31]
    python -m launch.tpu delete --name=mj --zone=us-east5-a [--queued]

Add `--dry_run` to any of them to print the exact gcloud commands instead.
`--queued` asks for capacity through queued resources (the way to get spot
slices); `create` then waits until the slice is ACTIVE. `setup` copies the
committed tree (`git archive HEAD`) to every worker and installs it with
jax[tpu] and the GCS extras (orbax, TensorBoard and epath write gs://).
`run` starts the same command on every worker (`--worker=all`); each process
joins the others through `sharding.initialize_distributed` and the mesh spans
the whole slice. A config with a sweep (`get_hyper`) runs its points one
after the other, each in `<workdir>/<its overrides>`. A spot slice that is
preempted: create it again and re-issue `run`: every job resumes from its
workdir.
"""

from __future__ import annotations

import argparse
import shlex

from launch import common

ARCHIVE = "/tmp/ministral_jax.tar.gz"
REMOTE_DIR = "$HOME/ministral_jax"  # expanded by the worker's shell, quoted or not
# The TPU VM software version that goes with each generation.
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
            "v6e": "v2-alpha-tpuv6e"}


def runtime_for(accelerator_type: str) -> str:
  generation = accelerator_type.rsplit("-", 1)[0]
  if generation not in RUNTIMES:
    raise SystemExit(f"error: no default runtime for {accelerator_type!r}; pass --runtime_version "
                     f"(known generations: {sorted(RUNTIMES)}).")
  return RUNTIMES[generation]


def _where(args) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _ssh(args, command: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_where(args), "--worker=all",
          f"--command={command}"]


def create(args, run: common.Runner) -> None:
  version = args.runtime_version or runtime_for(args.accelerator_type)
  spot = ["--spot"] if args.spot else []
  if not args.queued:
    run(["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args),
         f"--accelerator-type={args.accelerator_type}", f"--version={version}", *spot])
    return
  run(["gcloud", "compute", "tpus", "queued-resources", "create", args.name, f"--node-id={args.name}",
       *_where(args), f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}", *spot])
  describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, *_where(args),
              "--format=value(state.state)"]
  if run.dry_run:
    print(f"# then, every {args.poll_seconds}s until it prints ACTIVE:")
    run(describe)
    return
  import subprocess
  import time
  while (state := subprocess.run(describe, check=True, capture_output=True, text=True).stdout.strip()) != "ACTIVE":
    if state in ("FAILED", "SUSPENDED"):
      raise SystemExit(f"error: queued resource {args.name} is {state}.")
    print(f"{args.name}: {state or 'WAITING'}", flush=True)
    time.sleep(args.poll_seconds)


def setup(args, run: common.Runner) -> None:
  if args.repo_url:
    fetch = (f"(git clone --depth=1 --branch={shlex.quote(args.ref)} {shlex.quote(args.repo_url)} {REMOTE_DIR} || "
             f"git -C {REMOTE_DIR} pull)")
  else:
    run(["git", "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"])
    run(["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{args.name}:~/", *_where(args), "--worker=all"])
    fetch = f"mkdir -p {REMOTE_DIR} && tar -xzf ~/ministral_jax.tar.gz -C {REMOTE_DIR}"
  install = f'pip install -U "jax[tpu]" && pip install -e "{REMOTE_DIR}[gcs]"'
  run(_ssh(args, f"{fetch} && {install}"))


def run_config(args, run: common.Runner) -> None:
  if not args.workdir.startswith("gs://"):
    raise SystemExit(f"error: --workdir={args.workdir!r} must be a gs:// URL: every worker of the slice writes "
                     "checkpoints and logs there.")
  for _, workdir, overrides in common.jobs(args.config, args.workdir, args.overrides):
    command = common.main_command(args.config, workdir, overrides, python="python3")
    run(_ssh(args, f"cd {REMOTE_DIR} && MINISTRAL_JAX_MULTIHOST=1 {shlex.join(command)}"))


def delete(args, run: common.Runner) -> None:
  if args.queued:
    run(["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_where(args), "--force", "--quiet"])
  else:
    run(["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args), "--quiet"])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  steps = {"create": create, "setup": setup, "run": run_config, "delete": delete}
  for name, fn in steps.items():
    s = sub.add_parser(name, help=fn.__name__, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--dry_run", action="store_true", help="print the exact commands instead of running them")
    s.add_argument("--name", required=True, help="the TPU VM / queued resource name")
    s.add_argument("--zone", required=True)
    s.add_argument("--project", default="", help="default: gcloud's configured project")
    if name in ("create", "delete"):
      s.add_argument("--queued", action="store_true", help="queued resources (spot capacity)")
    if name == "create":
      s.add_argument("--accelerator_type", default="v5p-8", help="e.g. v4-32, v5p-32, v5litepod-16, v6e-8")
      s.add_argument("--runtime_version", default="", help="default: the generation's TPU VM image")
      s.add_argument("--spot", action="store_true")
      s.add_argument("--poll_seconds", type=int, default=60)
    if name == "setup":
      s.add_argument("--repo_url", default="", help="clone this instead of copying the local checkout")
      s.add_argument("--ref", default="main")
    if name == "run":
      common.add_job_flags(s)
  args = p.parse_args(argv)
  steps[args.command](args, common.Runner(args.dry_run))


if __name__ == "__main__":
  main()
