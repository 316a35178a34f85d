"""Every job as 2 JAX processes x 4 CPU devices against 1 process x 8 devices.

The pod runs go through `launch.local_pod`: the entry point and environment the TPU launcher gives each
host (`MINISTRAL_JAX_MULTIHOST=1`), a local coordinator, gloo collectives between the processes. The
input pipeline makes the same global batches on any process count (row slots), so the two runs see
the same data; what differs is who adds up the gradients: XLA inside one process, or gloo across
two, in another order. Hence the tolerances: after a few steps the losses agree to ~1e-7 relative and
the params to ~1e-7 absolute (measured: 9e-8 after 8 steps); the bounds below leave 10-100x room. Two
pod runs of the same job add in the same order, so a killed and restarted pod run is compared bitwise.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch import local_pod
from ministral_jax.checkpoint import orbax_io
from ministral_jax.model import config, transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = [
    "--config=configs/pretrain_tiny.py", "--config.train.steps=8", "--config.train.log_every=2",
    "--config.train.checkpoint_every=4", "--config.train.eval_every=4", "--config.train.eval_batches=1",
    "--config.model.n_layers=1", "--config.model.d_model=32", "--config.model.d_ffn=64", "--config.data.seq_len=32",
    "--config.train.global_batch=8", "--config.data.spm_vocab_size=512", "--config.model.vocab_size=512",
    "--config.data.max_documents=200", "--config.optimizer.warmup_steps=2",
]
HISTORY = ("step", "loss", "grad_norm", "update_norm", "lr", "eval_loss")


def _single(args, devices=8, check=True):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "ministral_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def _pod(args, tmp_path, env=None, check=True, timeout=900):
  procs = local_pod.start(args, processes=2, devices_per_process=4, logdir=str(tmp_path / "logs"), env=env)
  status = local_pod.wait(procs, timeout=timeout)
  if check:
    assert status == 0, procs[0].output()[-3000:] + procs[1].output()[-3000:]
  return status, procs


def _history(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: r[k] for k in HISTORY if k in r} for r in rows]


def _params(path):
  params, _ = orbax_io.load_params(path)
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def _assert_histories_close(a, b, rtol):
  assert [sorted(r) for r in a] == [sorted(r) for r in b]
  for ra, rb in zip(a, b):
    for k in ra:
      np.testing.assert_allclose(ra[k], rb[k], rtol=rtol, err_msg=f"step {ra['step']} {k}")


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
  single, pod = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("pod")
  _single([*PRETRAIN, f"--workdir={single}"])
  _pod([*PRETRAIN, f"--workdir={pod}"], tmp_path_factory.mktemp("pod_logs"))
  return single, pod


@pytest.mark.xdist_group("pod_pretrain")  # one worker builds the shared runs
def test_pretraining_on_two_processes_matches_one_process_with_the_same_devices(pretrain_runs):
  single, pod = pretrain_runs
  _assert_histories_close(_history(pod), _history(single), rtol=1e-5)
  for a, b in zip(_params(pod / "params"), _params(single / "params")):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.xdist_group("pod_pretrain")  # one worker builds the shared runs
def test_each_process_saves_its_own_rows_and_one_process_resumes_them(pretrain_runs, tmp_path):
  """The checkpoint holds both processes' iterator states (rows 0-3 and 4-7); one process x 8 devices
  resumes from them and trains the same steps as the pod would have."""
  from ministral_jax.train import checkpointing
  import orbax.checkpoint as ocp
  _, pod = pretrain_runs
  with ocp.CheckpointManager(checkpointing.checkpoint_dir(str(pod)), item_names=checkpointing.ITEMS) as mngr:
    data = mngr.restore(8, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
  assert [sorted(map(int, p["slots"])) for p in data["processes"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  import shutil
  resumed = tmp_path / "resumed"
  shutil.copytree(pod, resumed)
  shutil.rmtree(resumed / "params")
  shutil.rmtree(resumed / "checkpoints" / "8")  # back to step 4: one process finishes what two began
  _single([*PRETRAIN, f"--workdir={resumed}"])
  _assert_histories_close(_history(resumed), _history(pod), rtol=1e-5)


@pytest.mark.xdist_group("pod_pretrain")  # one worker builds the shared runs
def test_killing_every_process_and_restarting_ends_bitwise_equal_to_an_uninterrupted_pod_run(pretrain_runs, tmp_path):
  _, pod = pretrain_runs
  workdir = tmp_path / "run"
  procs = local_pod.start([*PRETRAIN, f"--workdir={workdir}"], logdir=str(tmp_path / "logs1"))
  deadline = time.time() + 600
  while not (workdir / "metrics.jsonl").exists() or not any(
      json.loads(line)["step"] >= 6 for line in (workdir / "metrics.jsonl").read_text().splitlines() if line):
    assert time.time() < deadline and all(p.popen.poll() is None for p in procs), procs[0].output()[-2000:]
    time.sleep(0.05)
  local_pod.signal_all(procs, signal.SIGKILL)  # between the step-4 and step-8 checkpoints
  assert local_pod.wait(procs) != 0
  _pod([*PRETRAIN, f"--workdir={workdir}"], tmp_path / "logs2")
  assert _history(workdir) == _history(pod)
  for a, b in zip(_params(workdir / "params"), _params(pod / "params")):
    np.testing.assert_array_equal(a, b)


@pytest.mark.xdist_group("pod_pretrain")  # one worker builds the shared runs
def test_sigterm_to_one_process_makes_every_process_save_the_same_step_and_exit_75(pretrain_runs, tmp_path):
  _, pod = pretrain_runs
  workdir = tmp_path / "run"
  # Process 1 alone is told to stop after step 3 (as if only its host got the preemption notice).
  status, procs = _pod([*PRETRAIN, f"--workdir={workdir}"], tmp_path / "logs1", check=False,
                       env={"MINISTRAL_JAX_FAULT_PROCESS": "1", "MINISTRAL_JAX_FAULT": "loop.after_step:3:sigterm"})
  assert status == 75 and all(p.returncode == 75 for p in procs), [p.returncode for p in procs]
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] in (4, 5) and not (workdir / "params").exists()  # one agreed step, past the notice
  assert all("Preempted" in p.output() for p in procs)
  _pod([*PRETRAIN, f"--workdir={workdir}"], tmp_path / "logs2")
  for a, b in zip(_params(workdir / "params"), _params(pod / "params")):
    np.testing.assert_array_equal(a, b)


@pytest.mark.xdist_group("pod_pretrain")  # one worker builds the shared runs
def test_the_eval_task_on_two_processes_matches_one_process(pretrain_runs, tmp_path):
  single, pod = pretrain_runs
  args = [*PRETRAIN, "--config.task=eval", f"--config.eval.checkpoint={single / 'params'}",
          f"--config.eval.files={os.path.join(REPO, 'README.md')}"]
  _single([*args, f"--workdir={tmp_path / 'one'}"])
  _pod([*args, f"--workdir={tmp_path / 'two'}"], tmp_path)
  one, two = (json.loads((tmp_path / d / "eval.json").read_text())["results"] for d in ("one", "two"))
  assert one.keys() == two.keys()
  for name in one:
    assert two[name]["tokens"] == one[name]["tokens"]
    np.testing.assert_allclose(two[name]["loss"], one[name]["loss"], rtol=1e-6)


@pytest.mark.xdist_group("pod_pretrain")
def test_lm_eval_on_two_processes_scores_what_one_process_scores(pretrain_runs, tmp_path):
  single, _ = pretrain_runs
  args = ["--config=configs/lm_eval_tiny.py", f"--config.eval.checkpoint={single / 'params'}",
          "--config.eval.local_docs=6", "--config.eval.batch_size=4", "--config.eval.log_samples=true"]
  _single([*args, f"--workdir={tmp_path / 'one'}"])
  _pod([*args, f"--workdir={tmp_path / 'two'}"], tmp_path)
  one, two = (json.loads((tmp_path / d / "lm_eval.json").read_text()) for d in ("one", "two"))
  assert one["n-samples"] == two["n-samples"]
  for task in one["results"]:
    a, b = (sorted(r["samples"][task], key=lambda s: s["doc_id"]) for r in (one, two))
    assert [s["filtered_resps"] for s in a if isinstance(s["filtered_resps"][0], str)] == \
        [s["filtered_resps"] for s in b if isinstance(s["filtered_resps"][0], str)]  # generated text: equal
    for key, value in one["results"][task].items():
      if isinstance(value, float):
        np.testing.assert_allclose(two["results"][task][key], value, rtol=1e-6, err_msg=f"{task} {key}")


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
  """A random 2-layer parent to prune (pruning needs no trained weights to be compared)."""
  cfg = config.preset("cpu_tiny", vocab_size=512, n_layers=2, d_model=64, d_ffn=128)
  path = tmp_path_factory.mktemp("parent") / "params"
  orbax_io.save_params(path, transformer.init_params(cfg, jax.random.key(3)), cfg)
  return path


def test_a_pruning_pass_on_two_processes_gives_the_child_of_one_process(parent, tmp_path):
  args = ["--config=configs/prune_tiny.py", f"--config.prune.parent={parent}", "--config.model.vocab_size=512",
          "--config.model.n_layers=1", "--config.model.d_model=48", "--config.model.d_ffn=96",
          "--config.data.spm_vocab_size=512", "--config.data.max_documents=200", "--config.data.seq_len=64",
          "--config.prune.calibration_batches=2", "--config.prune.ffn_scorer=magnitude"]  # a scorer that reads params
  _single([*args, f"--workdir={tmp_path / 'one'}"])
  _pod([*args, f"--workdir={tmp_path / 'two'}"], tmp_path)
  one, two = (json.loads((tmp_path / d / "params" / "prune_report.json").read_text()) for d in ("one", "two"))
  assert two["layers"]["removed"] == one["layers"]["removed"]
  np.testing.assert_allclose(two["layers"]["scores"], one["layers"]["scores"], rtol=1e-6)
  for a, b in zip(_params(tmp_path / "two" / "params"), _params(tmp_path / "one" / "params")):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # the PCA basis of a second moment summed in another order


def test_sampling_on_two_processes_gives_the_samples_of_one_process(tmp_path):
  args = ["--config=configs/tiny_sample.py", "--config.model.n_layers=1", "--config.max_new_tokens=6",
          "--config.tokenizer=spm_v3", "--config.model.vocab_size=32768", "--config.model.d_model=64"]
  _single([*args, f"--workdir={tmp_path / 'one'}"])
  _pod([*args, f"--workdir={tmp_path / 'two'}"], tmp_path)
  one, two = (json.loads((tmp_path / d / "samples.json").read_text())["samples"] for d in ("one", "two"))
  assert [s["tokens"] for s in two] == [s["tokens"] for s in one]


def test_the_quick_cascade_on_two_processes_reports_what_one_process_does(tmp_path):
  # The quick cascade with fewer steps and no baselines (pretraining is tested above): a pretrained parent,
  # two pruned and distilled children (one with a long-context stage), the report's evaluations.
  args = ["--config=configs/cascade_tiny.py:quick", "--config.parent.steps=10", "--config.stages[0].short_steps=4",
          "--config.stages[0].long_steps=1", "--config.stages[1].short_steps=4", "--config.train.checkpoint_every=5",
          "--config.train.log_every=5", "--config.train.eval_every=5", "--config.baselines=False"]
  _single([*args, f"--workdir={tmp_path / 'one'}"])
  _pod([*args, f"--workdir={tmp_path / 'two'}"], tmp_path, timeout=1500)
  one, two = (json.loads((tmp_path / d / "report.json").read_text())["rows"] for d in ("one", "two"))
  assert one.keys() == two.keys()
  for name in one:
    assert two[name]["tokens"] == one[name]["tokens"] and two[name]["start_document"] == one[name]["start_document"]
    for source, loss in one[name]["loss"].items():
      np.testing.assert_allclose(two[name]["loss"][source], loss, rtol=1e-4, err_msg=f"{name} {source}")


SFT_QUICK = ["--config=configs/sft_tiny.py:quick", "--config.train.steps=6", "--config.train.log_every=2",
             "--config.train.checkpoint_every=3", "--config.train.eval_every=3", "--config.train.eval_batches=1",
             "--config.tasks.train=64", "--config.tasks.eval=8"]


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory):
  """A quick SFT run on one process: its parent is the student below and its result the teacher."""
  root = tmp_path_factory.mktemp("sft_inputs")
  _single([*SFT_QUICK, "--config.parent.steps=6", f"--workdir={root}"])
  return root


@pytest.mark.xdist_group("pod_sft")  # one worker builds the shared SFT run
def test_sft_with_distillation_and_eval_generate_on_two_processes_match_one_process(sft_inputs, tmp_path):
  args = [*SFT_QUICK, f"--config.init_from={sft_inputs / 'parent' / 'params'}", "--config.data.tokenizer=init_from",
          f"--config.sft.teacher={sft_inputs / 'params'}", "--config.sft.kd_weight=0.5"]
  _single([*args, f"--workdir={tmp_path / 'one'}"])
  _pod([*args, f"--workdir={tmp_path / 'two'}"], tmp_path)
  _assert_histories_close(_history(tmp_path / "two"), _history(tmp_path / "one"), rtol=1e-5)
  for a, b in zip(_params(tmp_path / "two" / "params"), _params(tmp_path / "one" / "params")):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  generate = [*args, "--config.task=eval_generate", "--config.generate.n=8", "--config.generate.max_new_tokens=12"]
  _single([*generate, f"--workdir={tmp_path / 'one'}"])
  _pod([*generate, f"--workdir={tmp_path / 'two'}"], tmp_path)
  one, two = (json.loads((tmp_path / d / "eval_generate.json").read_text()) for d in ("one", "two"))
  assert [e["output"] for e in two["examples"]] == [e["output"] for e in one["examples"]]
  assert {k: two[k] for k in ("accuracy", "mean_length", "looping")} == {k: one[k] for k in ("accuracy",
                                                                                            "mean_length", "looping")}


def test_sft_with_images_on_two_processes_matches_one_process(tmp_path):
  """The image path: patch buffers split over the processes' rows, the ViT and the held-out answers."""
  args = ["--config=configs/vision_tiny.py:quick", "--config.train.steps=4", "--config.train.log_every=2",
          "--config.train.eval_every=4", "--config.train.checkpoint_every=4", "--config.train.eval_batches=1",
          "--config.shapes.train=64", "--config.shapes.heldout=16", "--config.eval.answers.n=16"]
  _single([*args, f"--workdir={tmp_path / 'one'}"])
  _pod([*args, f"--workdir={tmp_path / 'two'}"], tmp_path)
  _assert_histories_close(_history(tmp_path / "two"), _history(tmp_path / "one"), rtol=1e-5)
  for a, b in zip(_params(tmp_path / "two" / "params"), _params(tmp_path / "one" / "params")):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  def accuracy(run):
    rows = map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
    return [r["eval_answer_accuracy"] for r in rows if "eval_answer_accuracy" in r]
  assert accuracy("two") == accuracy("one") and len(accuracy("one")) == 1


@pytest.mark.xdist_group("pod_sft")  # one worker builds the shared SFT run
def test_grpo_on_two_processes_matches_one_process(sft_inputs, tmp_path):
  """Rollouts split over the processes' devices, rewards scored by each process for its own rows,
  advantages and metrics on the devices: the same samples, rewards and (to reduction order) updates."""
  args = ["--config=configs/grpo_tiny.py:quick", f"--config.init_from={sft_inputs / 'params'}",
          "--config.data.tokenizer=init_from", "--config.train.steps=4", "--config.train.log_every=1",
          "--config.grpo.format_gate=False", "--config.grpo.rewards=('digits',)",
          "--config.grpo.sampling.max_new_tokens=16", "--config.tasks.train=64", "--config.tasks.eval=8",
          "--config.grpo.eval_problems=8"]
  env = {"PYTHONPATH": os.path.join(REPO, "tests")}  # grpo_digits_main: main with a `digits` reward
  result = subprocess.run([sys.executable, "-m", "grpo_digits_main", *args, f"--workdir={tmp_path / 'one'}"], cwd=REPO,
                          env={**os.environ, **env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                               "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  procs = local_pod.start([*args, f"--workdir={tmp_path / 'two'}"], processes=2, devices_per_process=4,
                          logdir=str(tmp_path / "logs"), env=env, module="grpo_digits_main")
  assert local_pod.wait(procs, timeout=900) == 0, procs[0].output()[-3000:] + procs[1].output()[-3000:]
  one, two = (_grpo_history(tmp_path / d) for d in ("one", "two"))
  assert sum(r.get("updated", 0) for r in one) >= 3  # the policy moved: the comparison is not vacuous
  assert [r["step"] for r in one if "eval_accuracy" in r] == [0, 4]  # held-out eval at the start and the end
  exact = ("step", "accuracy", "mean_length", "max_length", "groups_dropped", "eval_accuracy", "eval_mean_length")
  assert [{k: r[k] for k in exact if k in r} for r in two] == [{k: r[k] for k in exact if k in r} for r in one]
  for a, b in zip(two, one):
    for k in ("reward_mean", "loss", "grad_norm", "entropy"):
      if k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-7, err_msg=f"step {b['step']} {k}")
  for a, b in zip(_params(tmp_path / "two" / "params"), _params(tmp_path / "one" / "params")):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def _grpo_history(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# ---- bad input: one clear error on every process, before any work ----

@pytest.mark.xdist_group("pod_sft")  # one worker builds the shared SFT run
def test_dpo_on_two_processes_matches_one_process(sft_inputs, tmp_path):
  """Pairs split over the processes (each holds whole pairs), policy and frozen reference on one mesh."""
  args = ["--config=configs/dpo_tiny.py:quick", f"--config.init_from={sft_inputs / 'params'}",
          "--config.train.steps=3", "--config.train.log_every=1", "--config.train.eval_every=3",
          "--config.train.checkpoint_every=3", "--config.pairs.train=24", "--config.pairs.eval=8"]
  _single([*args, f"--workdir={tmp_path / 'one'}"])
  _pod([*args, f"--workdir={tmp_path / 'two'}"], tmp_path)
  timing = ("tokens_per_s", "eta_min")
  one, two = ([{k: v for k, v in r.items() if k not in timing} for r in _grpo_history(tmp_path / d)]
              for d in ("one", "two"))
  assert any(abs(r.get("margin", 0.0)) > 1e-4 for r in one)  # the policy moved away from its reference
  # Every metric: loss, margin, implicit rewards, ranking accuracy, eval. The margin and rewards are beta times
  # differences of log-prob sums of about -100 (fp32 ulp ~1e-5): reduction order moves them by ~1e-6 absolute.
  assert [sorted(r) for r in two] == [sorted(r) for r in one]
  for a, b in zip(two, one):
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=2e-6, err_msg=f"step {b['step']} {k}")
  for a, b in zip(_params(tmp_path / "two" / "params"), _params(tmp_path / "one" / "params")):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_a_process_count_the_coordinator_never_reaches_is_one_clear_error(tmp_path):
  port = local_pod.free_port()
  env = {**local_pod.process_env(0, 2, 4, port), "MINISTRAL_JAX_INIT_TIMEOUT": "5"}
  result = subprocess.run([sys.executable, "-m", "ministral_jax.main", *PRETRAIN, f"--workdir={tmp_path / 'w'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "could not join 2 processes" in result.stderr and "JAX_NUM_PROCESSES" in result.stderr
  assert not (tmp_path / "w").exists()


def test_a_mesh_larger_than_the_pod_is_one_error_on_every_process(tmp_path):
  status, procs = _pod([*PRETRAIN, "--config.mesh.data=16", f"--workdir={tmp_path / 'w'}"], tmp_path, check=False)
  assert status == 2 and all(p.returncode == 2 for p in procs)
  for p in procs:
    assert "needs 16 devices but 8 are available" in p.output() and "Traceback" not in p.output()
  assert not (tmp_path / "w").exists()


def test_a_workdir_that_is_not_shared_by_every_process_is_one_error_on_every_process(tmp_path):
  port = local_pod.free_port()
  procs = []
  for i in range(2):  # each "host" sees its own directory under the same name
    env = local_pod.process_env(i, 2, 4, port)
    procs.append(subprocess.Popen([sys.executable, "-m", "ministral_jax.main", *PRETRAIN,
                                   f"--workdir={tmp_path / f'host{i}' / 'w'}"], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [2, 2], outputs
  for out in outputs:
    assert "is not shared by all 2 processes: process 1" in out and "Traceback" not in out
  assert not (tmp_path / "host0" / "w").exists() and not (tmp_path / "host1" / "w").exists()
