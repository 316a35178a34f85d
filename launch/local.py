"""Run an experiment, or every point of its sweep one after the other, on this machine (CPU or GPU).

    python -m launch.local --config=configs/pretrain_tiny.py --workdir=/tmp/sweep [--dry_run] [-- --config.train.steps=50]

A config that declares a sweep (`get_hyper`) runs one job per point, each in
`<workdir>/<its overrides>`, and then writes `<workdir>/sweep.md` (one row per
point: the final loss, eval loss, or the cascade's children) and `sweep.json`.
A point that already finished resumes and stops at once, so re-running a
killed sweep continues it.
"""

from launch import common


def main(argv=None) -> None:
  p = common.parser(__doc__)
  common.add_job_flags(p)
  common.run_jobs(p.parse_args(argv))


if __name__ == "__main__":
  main()
