"""The shared training loop as a user meets it: exact resume after SIGKILL/SIGTERM, errors, distillation."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ministral_jax import configs, faults, sharding
from ministral_jax.checkpoint import orbax_io
from ministral_jax.model import config, transformer
from ministral_jax.train import distill


# Every test here shares the module's fixtures: one xdist worker builds them once (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("train_straight")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = [  # a few seconds of training per run: 1 layer, 32 tokens, 16 steps
    "--config=configs/pretrain_tiny.py", "--config.train.steps=16", "--config.train.log_every=2",
    "--config.train.checkpoint_every=4", "--config.train.eval_every=8", "--config.train.eval_batches=1",
    "--config.model.n_layers=1", "--config.model.d_model=32", "--config.model.d_ffn=64",
    "--config.data.seq_len=32", "--config.train.global_batch=4", "--config.data.spm_vocab_size=512",
    "--config.model.vocab_size=512", "--config.data.max_documents=200", "--config.optimizer.warmup_steps=2",
]
HISTORY_KEYS = ("step", "loss", "grad_norm", "update_norm", "lr", "eval_loss")


def _start(workdir, *extra, env=None):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
         **(env or {})}
  return subprocess.Popen([sys.executable, "-m", "ministral_jax.main", *TINY_RUN, f"--workdir={workdir}",
                           "--config.mesh.data=2", *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-4000:]
  return out


def _history(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: r[k] for k in HISTORY_KEYS if k in r} for r in rows]


def _params(workdir):
  params, _ = orbax_io.load_params(workdir / "params")
  return jax.tree.map(np.asarray, params)


def _wait_for_step(workdir, step, proc):
  deadline = time.time() + 300
  while time.time() < deadline:
    path = workdir / "metrics.jsonl"
    if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines() if l):
      return
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  raise TimeoutError(f"step {step} never logged")


@pytest.fixture(scope="module")
def straight_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  _finish(_start(workdir))
  return workdir


@pytest.fixture(scope="module")
def uninterrupted(straight_workdir):
  return _history(straight_workdir), _params(straight_workdir)


# Each run dies at one phase boundary (faults.py); the next run of the same command picks up from there.
# (fault, exit status): SIGKILL is -9, a SIGTERM'd job saves and exits 75, a full disk is a clear error (2).
KILL_CHAIN = [
    ("loop.after_step:1", -9),                  # before the first checkpoint
    ("loop.after_step:6:sigterm", 75),          # preempted between checkpoints: saves step 6
    ("checkpoint.save_started:2", -9),          # during the step-12 save (the step-8 one committed)
    ("loop.after_final_checkpoint:1", -9),      # the last checkpoint committed, params/ not yet written
    ("params.before_commit:1:enospc", 2),       # the disk fills while params/ is written
    ("params.before_commit:1", -9),             # killed with params/ complete under its temporary name
]


def test_killed_at_every_phase_boundary_a_rerun_ends_bitwise_equal_to_an_uninterrupted_run(uninterrupted, tmp_path):
  history, params = uninterrupted
  for fault, status in KILL_CHAIN:
    proc = _start(tmp_path, env={faults.ENV: fault})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == status, (fault, err[-3000:])
    assert not (tmp_path / "params").exists(), fault
    if status == 75:
      assert "Preempted" in err and "run the same command again" in err
    if status == 2:
      assert "no space left on device" in err and "Traceback" not in err
  out = _finish(_start(tmp_path))
  assert "resumed from step 16 of 16" in out  # only params/ was left to write
  assert _history(tmp_path) == history
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_params(tmp_path))):
    np.testing.assert_array_equal(a, b)
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name == "lock.json") == []


def test_a_damaged_latest_checkpoint_is_set_aside_and_training_resumes_from_the_one_before(
    straight_workdir, uninterrupted, tmp_path):
  history, params = uninterrupted
  run = tmp_path / "run"
  shutil.copytree(straight_workdir, run)
  shutil.rmtree(run / "params")  # unfinished: the re-run resumes from its newest checkpoint (step 16)
  chunk = max((p for p in (run / "checkpoints" / "16" / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
              key=lambda p: p.stat().st_size)  # the largest tensor data file
  data = bytearray(chunk.read_bytes())
  data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
  chunk.write_bytes(bytes(data))
  proc = _start(run)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "Training checkpoint step 16" in err and "damaged" in err and "damaged_checkpoints" in err
  assert "resumed from step 12 of 16" in out
  assert [p.name.split(".")[0] for p in (run / "damaged_checkpoints").iterdir()] == ["16"]
  assert _history(run) == history
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_params(run))):
    np.testing.assert_array_equal(a, b)


def test_workdir_of_another_experiment_is_rejected_before_any_step(uninterrupted, tmp_path):
  proc = _start(tmp_path, "--config.train.steps=4", "--config.train.checkpoint_every=2")
  _finish(proc)
  other = _start(tmp_path, "--config.train.steps=8", "--config.model.d_ffn=96")
  _, err = other.communicate(timeout=300)
  assert other.returncode != 0 and "different experiment" in err and "d_ffn" in err


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  proc = _start(tmp_path, "--config.optimizer.lr=1e30", "--config.optimizer.clip_norm=0",
                "--config.train.checkpoint_every=1", "--config.train.log_every=1")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode != 0 and "Non-finite" in err and "is intact" in err
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and not (tmp_path / "params").exists()


def test_global_batch_the_mesh_cannot_split_fails_before_the_first_step(tmp_path):
  proc = _start(tmp_path, "--config.train.global_batch=3")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode != 0 and "Global batch 3 cannot be split" in err
  assert not (tmp_path / "checkpoints").exists()


def test_distillation_loss_on_8_devices_equals_one_device(tmp_path):
  student_cfg = config.preset("tiny_shard", n_layers=1)
  teacher_cfg = config.preset("tiny_shard", d_ffn=256)
  student = transformer.init_params(student_cfg, jax.random.key(0))
  orbax_io.save_params(tmp_path / "teacher", transformer.init_params(teacher_cfg, jax.random.key(1)),
                       teacher_cfg)
  rng = np.random.RandomState(0)
  batch = {"inputs": rng.randint(0, 256, (8, 32)), "targets": rng.randint(0, 256, (8, 32)),
           "positions": np.tile(np.arange(32), (8, 1)), "segment_ids": np.ones((8, 32), np.int32)}
  batch = {k: v.astype(np.int32) for k, v in batch.items()}
  batch["segment_ids"][:, 28:] = 0  # padding contributes nothing
  cfg = configs.load(os.path.join(REPO, "configs", "distill_tiny.py"))
  cfg.distill.teacher = str(tmp_path / "teacher")
  cfg.loss.seq_chunk, cfg.loss.vocab_chunk = 8, 96
  values = []
  for shape in [(1, 1, 1), (2, 2, 2)]:
    devices = jax.devices()[:int(np.prod(shape))]
    part = sharding.Partitioner(sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices))
    task = distill.make_task(cfg, student_cfg, part)
    sharded_student, sharded_batch = part.shard_params(student, student_cfg), part.shard_batch(batch)
    with part.activate():
      loss_sum, count, _ = jax.jit(task.loss_fn)(sharded_student, sharded_batch, task.frozen, jax.random.key(0))
    values.append(float(loss_sum / count))
    assert float(count) == 8 * 28
  assert values[0] > 0 and values[1] == pytest.approx(values[0], rel=1e-5)


def test_gradient_accumulation_gives_the_update_of_the_whole_batch():
  from ministral_jax.train import loop, optimizer, pretrain
  cfg = config.preset("tiny", n_layers=1)
  params = transformer.init_params(cfg, jax.random.key(0))
  rng = np.random.RandomState(1)
  batch = {k: rng.randint(0, cfg.vocab_size, (4, 16)).astype(np.int32) for k in ("inputs", "targets")}
  batch["positions"] = np.tile(np.arange(16, dtype=np.int32), (4, 1))
  batch["segment_ids"] = np.ones((4, 16), np.int32)
  batch["segment_ids"][0, 10:] = 0  # uneven token counts across microbatches
  task = loop.Task("pretrain", pretrain.make_loss(cfg, pretrain.loss_config()))
  tx, _ = optimizer.make_optimizer(optimizer.optimizer_config(lr=1e-2), 10)
  state = loop.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  results = [jax.jit(loop.make_train_step(task, tx, accum, seed=0))(state, batch, None) for accum in (1, 2, 4)]
  for new_state, out in results[1:]:
    np.testing.assert_allclose(out["loss"], results[0][1]["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(results[0][0].params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)



def test_eval_task_reports_loss_on_the_eval_split_and_on_a_user_file(straight_workdir, tmp_path):
  text = tmp_path / "extra.txt"
  text.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    pass\n")
  proc = _start(straight_workdir, "--config.task=eval", f"--config.eval.files={text}",
                "--config.eval.batch_size=2")
  out = _finish(proc)
  results = json.loads((straight_workdir / "eval.json").read_text())["results"]
  assert set(results) == {"eval_split", str(text)} and "perplexity" in out
  for r in results.values():
    assert r["tokens"] > 0 and np.isclose(r["perplexity"], np.exp(r["loss"]))
  # A trained model beats the uniform distribution over its 512 ids.
  assert results["eval_split"]["loss"] < np.log(512)


def test_training_with_a_tokenizer_larger_than_the_model_fails_before_the_first_step(tmp_path):
  proc = _start(tmp_path, "--config.model.vocab_size=300")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode != 0 and "512" in err and "300" in err
  assert not (tmp_path / "checkpoints").exists()


def test_missing_teacher_or_teacher_with_another_vocabulary_is_rejected(tmp_path):
  student = config.preset("tiny")
  cfg = ml_collections.ConfigDict({"distill": distill.distill_config(str(tmp_path / "nope"))})
  with pytest.raises(ValueError, match="does not exist"):
    distill.load_teacher(cfg, student, None)
  other = config.preset("tiny", vocab_size=256)
  orbax_io.save_params(tmp_path / "t", transformer.init_params(other, jax.random.key(0)), other)
  cfg.distill.teacher = str(tmp_path / "t")
  with pytest.raises(ValueError, match=r"teacher's vocabulary \(256\) differs from the student's \(512\)"):
    distill.load_teacher(cfg, student, None)
