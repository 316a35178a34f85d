"""Entry point: `python -m ministral_jax.main --config=configs/<experiment>.py[:arg] --workdir=<dir>`.

Every config field can be overridden on the command line, e.g.
`--config.model.n_layers=4 --config.mesh.fsdp=8`. `config.task` picks what runs.
"""

from __future__ import annotations

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

from ministral_jax import sharding

TASKS = {
    "sample": "ministral_jax.sample.task",
    "describe": "ministral_jax.model.abstract",
    "pretrain": "ministral_jax.train.pretrain",
    "distill": "ministral_jax.train.distill",
    "eval": "ministral_jax.eval.task",
    "prune": "ministral_jax.prune.task",
    "prune_ablation": "ministral_jax.prune.ablation",
    "cascade": "ministral_jax.cascade.task",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cfg = _CONFIG.value
  if cfg.task not in TASKS:
    raise app.UsageError(f"Unknown task '{cfg.task}'. Known tasks: {sorted(TASKS)}.")
  sharding.initialize_distributed()
  logging.info("Task %s, workdir %s", cfg.task, _WORKDIR.value)
  importlib.import_module(TASKS[cfg.task]).run(cfg, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
