"""Entry point: `python -m ministral_jax.main --config=configs/<experiment>.py[:arg] --workdir=<dir>`.

Every config field can be overridden on the command line, e.g.
`--config.model.n_layers=4 --config.mesh.fsdp=8`. `config.task` picks what runs.

What a user sees: our progress lines and real warnings. Library INFO chatter
(orbax, absl, jax) stays off unless `--verbosity` is given (`--verbosity=0`
shows INFO, `1` debug). A problem the user can fix (a bad field, a missing or
damaged checkpoint, a busy workdir, a full disk) ends with one `error: ...`
message and exit status 2, without a traceback (any `--verbosity` adds it).
A preempted job (SIGTERM) saves, says so and exits with status 75, so a
launcher knows to run it again. One job per workdir: a second one is refused
with the holder's host and pid.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from ministral_jax import config_checks, errors, sharding

TASKS = {
    "sample": "ministral_jax.sample.task",
    "describe": "ministral_jax.model.abstract",
    "pretrain": "ministral_jax.train.pretrain",
    "distill": "ministral_jax.train.distill",
    "sft": "ministral_jax.train.sft",
    "grpo": "ministral_jax.train.grpo",
    "dpo": "ministral_jax.train.dpo",
    "train_pwrm": "ministral_jax.train.pwrm",
    "odpo": "ministral_jax.train.odpo",
    "eval_generate": "ministral_jax.eval.generate",
    "eval": "ministral_jax.eval.task",
    "lm_eval": "ministral_jax.eval.harness",
    "prune": "ministral_jax.prune.task",
    "prune_ablation": "ministral_jax.prune.ablation",
    "cascade": "ministral_jax.cascade.task",
    "posttrain": "ministral_jax.posttrain.task",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.mark_flags_as_required(["config", "workdir"])


def _verbose() -> bool:
  return flags.FLAGS["verbosity"].present


def _exit(status: int, message: str = "", exc: BaseException | None = None) -> None:
  """Prints `message` (and the traceback when verbose) and leaves at once: after an error, library
  threads (async checkpoint writers, loggers) must not print hundreds of frames while Python shuts down."""
  if exc is not None and _verbose():
    traceback.print_exception(exc)
  if message:
    print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with the config file checked first: a missing file otherwise ends in
  "Failed loading config file config_config"."""
  spec = _flag_value(argv, "config")
  if spec is not None:
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
      _exit(errors.EXIT_USER_ERROR, f"error: --config={spec}: there is no file {path!r} (from {os.getcwd()}). "
            "Experiment configs live in configs/, e.g. --config=configs/pretrain_tiny.py")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit(errors.EXIT_USER_ERROR, f"error: {e}\nSee --helpfull for every flag; config fields are "
          "--config.<block>.<field>=<value>.")
  except errors.UserError as e:  # raised by get_config(arg)
    _exit(errors.EXIT_USER_ERROR, f"error: --config={spec}: {e}", e)
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no field of the config
    inner = e.args[0] if e.args else e
    inner = inner.args[0] if isinstance(inner, KeyError) and inner.args else inner
    overrides = " ".join(a.split("=", 1)[0] for a in argv if a.startswith("--config."))
    hint = " ".join(str(inner).split())
    _exit(errors.EXIT_USER_ERROR, f"error: unknown config field {hint} (overrides given: {overrides}). Each "
          "--config.<block>.<field> must name a field the config file defines.", e)


def _check(cfg, workdir: str) -> None:
  if "task" not in cfg:
    raise errors.UserError(f"The config has no `task` field; set `c.task` in get_config to one of {sorted(TASKS)}.")
  if cfg.task not in TASKS:
    raise errors.UserError(f"Unknown task {cfg.task!r}. Known tasks: {sorted(TASKS)}.")
  config_checks.require(config_checks.workdir(workdir), "--workdir")


def main(argv) -> None:
  del argv
  if not _verbose():  # our own warnings (python logging) stay; libraries logging through absl go quiet
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
  cfg, workdir = _CONFIG.value, _WORKDIR.value
  try:
    _check(cfg, workdir)
    sharding.initialize_distributed()
    from ministral_jax import multihost, workdir_lock
    multihost.check_shared_workdir(workdir)
    from ministral_jax.train import preemption
    preemption.install()
    with workdir_lock.hold(workdir):
      importlib.import_module(TASKS[cfg.task]).run(cfg, workdir)
  except errors.Preempted as e:
    _exit(errors.EXIT_PREEMPTED, str(e))
  except (errors.UserError, FileNotFoundError, FileExistsError) as e:
    _exit(errors.EXIT_USER_ERROR, f"error: {e}", e)
  except Exception as e:  # noqa: BLE001 - only a full disk is handled; anything else is a bug to show whole
    if not _disk_full(e):
      raise
    _exit(errors.EXIT_USER_ERROR, f"error: no space left on device ({_first_line(e)}). Free space (or move "
          "--workdir) and run the same command again: the job resumes from its last intact checkpoint.", e)


def _quiet_closed_loops(hook):
  """After an orbax write fails, tensorstore's pending callbacks each report an unraisable "RuntimeError:
  Event loop is closed" with a traceback; the failure itself is reported by the job, so these stay off
  the console."""
  def quiet(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    hook(unraisable)
  return quiet


def _disk_full(e: BaseException | None) -> bool:
  """ENOSPC, raised directly or wrapped by a library (tensorstore reports it in its message)."""
  seen = 0
  while e is not None and seen < 10:
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
      return True
    e, seen = e.__cause__ or e.__context__, seen + 1
  return False


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0][:300] if lines else type(e).__name__


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
