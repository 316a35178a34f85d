"""The cascade as a user runs it: the quick default end to end, exact resume after a kill, bad input,
and the paper's real-size recipe built stage by stage without weights."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ministral_jax import configs, faults, sharding
from ministral_jax.cascade import task as cascade
from ministral_jax.checkpoint import orbax_io
from ministral_jax.model import config, transformer
from ministral_jax.prune import pruner, rewrite


# Every test here shares the module's fixtures: one xdist worker builds them once (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("quick_cascade")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRA_EVAL = os.path.join(REPO, "README.md")  # an extra eval file the report must score every model on


def _config(name, arg=""):
  return configs.load(os.path.join(REPO, "configs", f"{name}.py") + (f":{arg}" if arg else ""))


def _start(workdir, *extra, env=None):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
         **(env or {})}
  return subprocess.Popen([sys.executable, "-m", "ministral_jax.main", "--config=configs/cascade_tiny.py:quick",
                           f"--workdir={workdir}", f"--config.eval.files={EXTRA_EVAL}", *extra], cwd=REPO, env=env,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-4000:]
  return out


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cascade")
  proc = _start(workdir)
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-4000:]
  return workdir, out, err


def test_quick_cascade_writes_the_report_table_and_plot(quick):
  workdir, out, err = quick
  report = json.loads((workdir / "report.json").read_text())
  rows = report["rows"]
  assert list(rows) == ["parent", "child_a (pruned, before distillation)", "child_a/short", "child_a/long",
                        "child_b (pruned, before distillation)", "child_b/short", "baseline_child_a",
                        "baseline_child_b"]
  assert (rows["child_a/long"]["n_layers"], rows["child_a/long"]["d_model"], rows["child_a/long"]["d_ffn"]) == (2, 48, 96)
  # The baseline trains on as many tokens as its child saw in distillation (short + long stage).
  assert rows["child_a/long"]["tokens"] == 10 * 8 * 64 + 2 * 8 * 128 == rows["baseline_child_a"]["tokens"]
  for r in rows.values():
    assert set(r["loss"]) == {"eval_split", EXTRA_EVAL, "eval_split@128"} and all(map(np.isfinite, r["loss"].values()))
  md = (workdir / "report.md").read_text()
  assert "| child_b/short | 1 | 48 | 64 |" in md and "from-scratch baseline" in md
  assert (workdir / "eval_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "[cascade 3/8 child_a/short] step 10:" in out and "tokens_seen=5120" in out and "eta_min" in out
  assert "total_eta_min" in out  # the whole cascade's, not just the job's
  # A quiet console: our progress lines, the prune summaries and the report; no library log lines at all.
  assert err == "", err[:2000]
  assert all(line.startswith(("[cascade ", "|", "Parameters", "Wrote ", "#", "Parent:", "- ")) or not line.strip()
             for line in out.splitlines()), out


def test_one_data_stream_no_document_is_trained_on_twice_and_none_is_left_out(quick):
  from ministral_jax.data import pipeline
  workdir, *_ = quick
  jobs = ("parent", "child_a/short", "child_a/long", "child_b/short")
  read = [pipeline.read_positions(_data_state(workdir / job)) for job in jobs]
  for i, a in enumerate(read):
    assert a and all(a.isdisjoint(b) for b in read[i + 1:])  # no document twice
  frontier = _data_state(workdir / jobs[-1])["next_document"]
  assert set(range(frontier)) <= set().union(*read)  # none skipped before where the stream stopped
  for before, after in zip(jobs, jobs[1:]):  # each job starts exactly where the one before it stopped
    end, start = _data_state(workdir / before), _data_state(workdir / after)["pipeline"]
    assert (start["start_document"], start["skip_documents"]) == (end["next_document"], end["skip_documents"])
  baseline = _data_state(workdir / "baseline_child_a")["pipeline"]
  child = _data_state(workdir / "child_a/short")["pipeline"]
  assert (baseline["start_document"], baseline["skip_documents"]) == (child["start_document"], child["skip_documents"])


def _data_state(job_dir):
  from ministral_jax.train import checkpointing
  return checkpointing.latest_data_state(str(job_dir))


# One fault per run, at each phase boundary of the cascade's jobs; every re-run of the same command continues.
KILL_CHAIN = [
    ("loop.after_step:5:sigterm", 75),           # the parent preempted mid-job: it saves, the cascade stops
    ("checkpoint.save_started:2", -9),           # during the parent's step-20 save
    ("loop.after_final_checkpoint:1", -9),       # the parent's last checkpoint committed, its params/ not written
    ("prune.after_calibration:1", -9),           # inside child_a's pruning pass
    ("cascade.between_jobs:2", -9),              # child_a pruned, child_a/short not started
    ("params.before_commit:1", -9),              # child_a/short's params/ complete under its temporary name
    ("params.before_commit:1:enospc", 2),        # the disk fills while child_a/short's params/ is written
    ("loop.after_step:1:sigterm", 75),           # child_a/long preempted after its first step
]


def test_killed_at_every_phase_boundary_the_cascade_resumes_to_the_same_result(quick, tmp_path):
  workdir, *_ = quick
  for fault, status in KILL_CHAIN:
    proc = _start(tmp_path, env={faults.ENV: fault})
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == status, (fault, err[-3000:])
    assert not (tmp_path / "report.json").exists()
    if status == 75:
      assert "Preempted" in err and "Traceback" not in err
  out = _finish(_start(tmp_path))
  assert "[cascade 4/8 child_a/long]" in out and "[cascade 1/8 parent]" not in out  # resumed, not restarted
  assert json.loads((tmp_path / "report.json").read_text()) == json.loads((workdir / "report.json").read_text())
  for job in ("parent", "child_a/short", "child_a/long", "child_b/short", "baseline_child_b"):
    a, _ = orbax_io.load_params(tmp_path / job / "params")
    b, _ = orbax_io.load_params(workdir / job / "params")
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_running_again_finds_every_job_done(quick):
  workdir, *_ = quick
  stamp = (workdir / "child_a" / "short" / "params" / "model_config.json").stat().st_mtime_ns
  out = _finish(_start(workdir))
  assert "step " not in out  # nothing trained
  assert (workdir / "child_a" / "short" / "params" / "model_config.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change,message", [
    (lambda c: c.stages[1].model.update(d_model=64), "must decrease in every dimension"),
    (lambda c: c.stages[1].model.update(n_heads=2), "heads are never pruned"),
    (lambda c: c.distill.update(teacher="/nonexistent/teacher"), "does not exist"),
    (lambda c: c.parent.update(checkpoint="/nonexistent/parent"), "does not exist"),
    (lambda c: c.update(stages=[]), "stages is empty"),
    (lambda c: c.stages[1].update(short_steps=0), r"short_steps=0 must be >= 1"),
    (lambda c: c.parent.update(steps=0), r"parent\.steps=0"),
    (lambda c: c.distill_optimizer.update(lr=0.0), r"optimizer\.lr=0\.0"),
    (lambda c: c.long.update(seq_len=32), r"long\.seq_len=32 must exceed"),
])
def test_bad_cascade_config_is_one_clear_error_before_any_work(tmp_path, change, message):
  cfg = _config("cascade_tiny", "quick")
  change(cfg)
  with pytest.raises(ValueError, match=message):
    cascade.run(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_an_eval_file_added_to_a_finished_cascade_is_scored_for_every_model(quick, tmp_path, capsys):
  workdir, *_ = quick
  copy = tmp_path / "cascade"
  shutil.copytree(workdir, copy)
  notes = tmp_path / "notes.txt"
  notes.write_text("def area(r):\n    return 3.14159 * r * r\n\nprint(area(2.0))\n")
  cfg = _config("cascade_tiny", "quick")
  cfg.eval.files = f"{EXTRA_EVAL},{notes}"
  cfg.train.log_every = 5  # how a run logs is not part of the experiment either
  before = json.loads((copy / "report.json").read_text())["rows"]
  rows = cascade.run(cfg, str(copy))["rows"]
  for name, row in rows.items():
    assert np.isfinite(row["loss"][str(notes)])
    assert row["loss"]["eval_split"] == before[name]["loss"]["eval_split"]  # the others are not recomputed
  assert "step " not in capsys.readouterr().out  # no job trained again


def test_a_workdir_holding_a_different_experiment_is_refused(quick, tmp_path):
  workdir, *_ = quick
  cfg = _config("cascade_tiny", "quick")
  cfg.eval.files = EXTRA_EVAL
  cfg.stages[0].short_steps = 11
  with pytest.raises(ValueError, match="holds a different cascade.*stages"):
    cascade.run(cfg, str(workdir))
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("a training run")
  with pytest.raises(ValueError, match="not a cascade's"):
    cascade.run(_config("cascade_tiny", "quick"), str(tmp_path / "other"))


def test_the_papers_cascade_builds_stage_by_stage_without_weights():
  """24B -> 14B -> 8B -> 3B: every prune gives the next shape, every model shards on 8 devices."""
  cfg = _config("cascade_ministral3")
  part = sharding.Partitioner.from_config(dict(data=1, fsdp=4, tensor=2))
  parent = cascade.parent_config(_no_checkpoint(cfg))
  plan = cascade.stages(cfg, parent)
  assert [s.name for s in plan] == ["ministral3_14b", "ministral3_8b", "ministral3_3b"]
  prev = parent
  for s in plan:
    published = config.preset(s.name)
    for field in ("n_layers", "d_model", "d_ffn", "n_heads", "n_kv_heads", "head_dim", "rope_theta", "tie_embeddings"):
      assert getattr(s.short, field) == getattr(published, field), field
    assert s.short.rope_scaling == "none" and not s.short.query_temperature_beta  # the parent's short context
    assert s.long.rope_scaling == "yarn" and s.long.yarn_factor == 16 and s.long.yarn_original_max_len == 16384
    assert s.long.query_temperature_beta == 0.1 and s.long.max_seq_len == 262144
    order = pruner.shrinking_steps(cfg.prune, prev, s.short)
    plan_shapes = rewrite.Plan(
        layers=jax.ShapeDtypeStruct((s.short.n_layers,), np.int32) if "layers" in order.order else None,
        rotation=jax.ShapeDtypeStruct((prev.d_model, s.short.d_model), np.float32) if "hidden" in order.order else None,
        ffn=jax.ShapeDtypeStruct((s.short.n_layers, s.short.d_ffn), np.int32))
    out = jax.eval_shape(lambda p, pl: rewrite.apply_plan(p, pl, tie=s.short.tie_embeddings),
                         transformer.abstract_params(prev), plan_shapes)
    assert jax.tree.map(lambda x: x.shape, out) == jax.tree.map(lambda x: x.shape, transformer.abstract_params(s.short))
    for model in (s.short, s.long):
      shardings = part.param_shardings(model)  # every dimension divides the mesh
      wq = shardings["layers"]["attention"]["wq"].shard_shape((model.n_layers, model.d_model, 32, 128))
      assert wq == (model.n_layers, model.d_model // 4, 16, 128)
    prev = s.short
  sizes = [config.param_count(s.short) for s in plan]
  assert sizes == sorted(sizes, reverse=True) and plan[-1].short.tie_embeddings


def _no_checkpoint(cfg):
  c = cfg.copy_and_resolve_references()
  c.parent.checkpoint = ""
  return c

