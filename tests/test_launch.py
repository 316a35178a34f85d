"""Launchers (their dry runs: there is no cloud here), sweeps, and gs:// workdirs passed through unchanged."""

import json
import os
import subprocess
import sys

import pytest
from etils import epath

from launch import common
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
                                         ("tpu", ["delete"]), ("local", []), ("gpu", [])])
def test_every_launcher_has_help(module, args):
  result = _launch(module, *args, "--help")
  assert result.returncode == 0 and "usage:" in result.stdout
  assert ("{create,setup,run,delete}" if module == "tpu" and not args else "--dry_run") in result.stdout


def test_tpu_dry_run_prints_the_exact_gcloud_commands_of_a_spot_pod_slice():
  where = ["--name=mj", "--zone=us-east5-a", "--project=proj", "--dry_run"]
  assert _lines(_launch("tpu", "create", *where, "--accelerator_type=v5p-32", "--spot", "--queued")) == [
      "gcloud compute tpus queued-resources create mj --node-id=mj --zone=us-east5-a --project=proj "
      "--accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5 --spot",
      "# then, every 60s until it prints ACTIVE:",
      "gcloud compute tpus queued-resources describe mj --zone=us-east5-a --project=proj "
      "'--format=value(state.state)'"]
  assert _lines(_launch("tpu", "create", *where, "--accelerator_type=v4-8")) == [
      "gcloud compute tpus tpu-vm create mj --zone=us-east5-a --project=proj --accelerator-type=v4-8 "
      "--version=tpu-ubuntu2204-base"]
  setup = _lines(_launch("tpu", "setup", *where))
  assert setup[0] == "git archive --format=tar.gz --output=/tmp/ministral_jax.tar.gz HEAD"
  assert setup[1] == ("gcloud compute tpus tpu-vm scp /tmp/ministral_jax.tar.gz 'mj:~/' --zone=us-east5-a "
                      "--project=proj --worker=all")
  assert "--worker=all" in setup[2] and 'pip install -U "jax[tpu]"' in setup[2] and '$HOME/ministral_jax[gcs]' in setup[2]
  run = _lines(_launch("tpu", "run", *where, "--config=configs/cascade_ministral3.py", "--workdir=gs://b/cascade",
                       "--", "--config.parent.checkpoint=gs://b/ckpt"))
  assert run == ["gcloud compute tpus tpu-vm ssh mj --zone=us-east5-a --project=proj --worker=all "
                 "'--command=cd $HOME/ministral_jax && MINISTRAL_JAX_MULTIHOST=1 python3 -m ministral_jax.main "
                 "--config=configs/cascade_ministral3.py --workdir=gs://b/cascade "
                 "--config.parent.checkpoint=gs://b/ckpt'"]
  assert _lines(_launch("tpu", "delete", *where, "--queued")) == [
      "gcloud compute tpus queued-resources delete mj --zone=us-east5-a --project=proj --force --quiet"]


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
