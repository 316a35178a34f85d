"""The post-training pipeline as a user runs it: the quick default end to end, exact resume after a kill, the
new jobs (PWRM, Online DPO, the pipeline) on two processes against one, and bad stage lists."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from launch import local_pod
from ministral_jax import configs, faults
from ministral_jax.checkpoint import orbax_io
from ministral_jax.errors import UserError
from ministral_jax.posttrain import task as posttrain

# One xdist worker builds the quick run and runs every test that reads it (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("quick_posttrain")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "configs/posttrain_tiny.py:quick"
STAGES = ["instruct/sft", "instruct/odpo", "instruct/dpo", "reasoning/sft", "reasoning/grpo", "reasoning/odpo"]


def _run(workdir, *extra, env=None, check=True):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         **(env or {})}
  result = subprocess.run([sys.executable, "-m", "ministral_jax.main", f"--config={QUICK}", f"--workdir={workdir}",
                           *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("posttrain")
  return workdir, _run(workdir).stdout


def _report(workdir):
  return json.loads((workdir / "report.json").read_text())


def _copy_jobs(src, dst, jobs):
  for job in jobs:
    shutil.copytree(src / job, dst / job)


def test_quick_posttrain_runs_both_recipes_and_reports_every_stage(quick):
  workdir, out = quick
  report = _report(workdir)
  assert list(report["stages"]) == STAGES
  for name, row in report["stages"].items():
    assert set(row) == {"accuracy", "win_rate", "mean_length", "truncated", "loop_rate", "pairs"}, name
    assert all(0 <= row[k] <= 1 for k in ("accuracy", "win_rate", "truncated", "loop_rate"))
  assert report["stages"]["instruct/sft"]["win_rate"] == 0.5 == report["stages"]["reasoning/sft"]["win_rate"]
  assert report["stages"]["instruct/odpo"]["pairs"] == report["stages"]["instruct/dpo"]["pairs"] > 0
  assert set(report["pwrm"]) >= {"temperature", "accuracy", "ece_before", "ece_after"}
  assert (workdir / "report.md").read_text().count("|") > 40 and (workdir / "posttrain.png").stat().st_size > 1000
  for i, job in enumerate(["base", "instruct/sft", "pwrm", "instruct/odpo", "instruct/dpo", "reasoning/sft",
                           "reasoning/grpo", "reasoning/odpo"]):
    assert f"[posttrain {i + 1}/8 {job}]" in out
    assert (workdir / job / "params").exists()


def test_killed_mid_job_the_pipeline_resumes_to_the_report_of_an_uninterrupted_run(quick, tmp_path):
  """SIGKILL in the Online DPO job after its step 3 (its last checkpoint: step 2); the same command again
  resumes that job from its checkpoint and runs the rest: every number in the report is the same. (The jobs
  before it and the reasoning recipe are copied from the uninterrupted run: a done job is skipped.)"""
  workdir, _ = quick
  _copy_jobs(workdir, tmp_path, ["base", "instruct/sft", "pwrm", "reasoning"])
  killed = _run(tmp_path, env={faults.ENV: "loop.after_step:3"}, check=False)
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert not (tmp_path / "instruct" / "odpo" / "params").exists() and not (tmp_path / "report.json").exists()
  out = _run(tmp_path).stdout
  assert "[posttrain 4/8 instruct/odpo] resumed from step 2" in out
  assert _report(tmp_path) == _report(workdir)
  a, _ = orbax_io.load_params(tmp_path / "instruct" / "odpo" / "params")
  b, _ = orbax_io.load_params(workdir / "instruct" / "odpo" / "params")
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _history(workdir):
  drop = ("tokens_per_s", "eta_min")
  return [{k: v for k, v in json.loads(line).items() if k not in drop}
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_the_pwrm_online_dpo_and_the_pipeline_on_two_processes_match_one_process(quick, tmp_path):
  """The instruct recipe's new jobs (PWRM, Online DPO, the offline-DPO baseline) and the report, as 2 processes x
  4 devices, from the same base and SFT model as the 1-process x 8-device run: the same metrics at every step
  (sums in another order: the tolerances of the DPO pod test), the same report."""
  workdir, _ = quick
  _copy_jobs(workdir, tmp_path / "two", ["base", "instruct/sft"])
  procs = local_pod.start([f"--config={QUICK}", f"--workdir={tmp_path / 'two'}", "--config.posttrain.recipes.reasoning=()"],
                          processes=2, devices_per_process=4, logdir=str(tmp_path / "logs"))
  assert local_pod.wait(procs, timeout=900) == 0, procs[0].output()[-3000:] + procs[1].output()[-3000:]
  for job in ("pwrm", "instruct/odpo", "instruct/dpo"):
    a, b = _history(tmp_path / "two" / job), _history(workdir / job)
    assert [sorted(r) for r in a] == [sorted(r) for r in b], job
    for x, y in zip(a, b):
      for k in y:
        np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=2e-6, err_msg=f"{job} step {y['step']} {k}")
  two, one = _report(tmp_path / "two"), _report(workdir)
  assert two["stages"] == {k: v for k, v in one["stages"].items() if k.startswith("instruct/")}
  for k, v in one["pwrm"].items():  # the quick PWRM's T sits at its lower bound, 0.05: 1/T scales differences 20x
    assert two["pwrm"][k] == pytest.approx(v, rel=1e-4), k


@pytest.mark.parametrize("recipes,message", [
    ({"reasoning": ("sft", "odpo", "grpo")}, r"posttrain\.recipes\.reasoning=\('sft', 'odpo', 'grpo'\) is out of order"),
    ({"instruct": ("odpo",)}, r"posttrain\.recipes\.instruct=\('odpo',\) is out of order: a recipe starts with sft"),
    ({"instruct": ("sft", "odpo", "odpo")}, r"is out of order"),
    ({"instruct": ("sft", "ppo")}, r"posttrain\.recipes\.instruct has \['ppo'\]"),
    ({"vision": ("sft",)}, r"posttrain\.recipes has 'vision'"),
], ids=["grpo_after_odpo", "no_sft", "twice", "unknown_stage", "unknown_recipe"])
def test_a_stage_list_out_of_order_is_one_error_before_any_work(tmp_path, recipes, message):
  cfg = configs.load(os.path.join(REPO, QUICK.split(":")[0]) + ":quick")
  cfg.posttrain.recipes = {**cfg.posttrain.recipes.to_dict(), **recipes}
  with pytest.raises(UserError, match=message):
    posttrain.run(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_a_job_config_with_a_bad_field_is_one_error_before_the_pipeline_starts(tmp_path):
  cfg = configs.load(os.path.join(REPO, QUICK.split(":")[0]) + ":quick")
  cfg.jobs.odpo.odpo.beta = 0.0
  with pytest.raises(UserError, match=r"odpo\.beta=0\.0"):
    posttrain.run(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
