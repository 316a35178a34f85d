"""Run an experiment (or its sweep, point after point) on every GPU of one host.

    python -m launch.gpu --config=configs/describe.py:ministral3_3b --workdir=/tmp/run [--dry_run] [-- overrides]

The mesh takes every local GPU (`mesh.data=-1` or `mesh.fsdp=-1` in the
config). XLA overlaps collectives with compute (latency-hiding scheduler) and
keeps 10% of GPU memory free for cuDNN workspaces. Sweeps run as with
`launch.local` and write the same summary table.
"""

import os

from launch import common


def env() -> dict[str, str]:
  flags = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_latency_hiding_scheduler=true").strip()
  return {"XLA_FLAGS": flags, "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")}


def main(argv=None) -> None:
  p = common.parser(__doc__)
  common.add_job_flags(p)
  common.run_jobs(p.parse_args(argv), env=env())


if __name__ == "__main__":
  main()
