"""The entry point as a user runs it: the built-in default, resume, and config errors."""

import json
import os
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, devices=1):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "ministral_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_default_sample_job_runs_on_a_mesh_and_resumes_from_its_workdir(tmp_path):
  workdir = tmp_path / "run"
  args = ["--config=configs/tiny_sample.py", f"--workdir={workdir}", "--config.max_new_tokens=6",
          "--config.model.n_layers=1"]
  first = _main(*args, "--config.mesh.fsdp=2", devices=2)
  assert first.returncode == 0, first.stderr[-3000:]
  saved = json.loads((workdir / "samples.json").read_text())
  assert saved["mesh"] == {"data": 1, "fsdp": 2, "context": 1, "tensor": 1}
  assert all(1 <= len(s["tokens"]) <= 6 for s in saved["samples"])
  stamp = (workdir / "params" / "model_config.json").stat().st_mtime_ns
  second = _main(*args, devices=1)  # a different mesh: the checkpoint restores onto it
  assert second.returncode == 0, second.stderr[-3000:]
  assert (workdir / "params" / "model_config.json").stat().st_mtime_ns == stamp
  assert json.loads((workdir / "samples.json").read_text())["samples"] == saved["samples"]


def test_unknown_config_override_fails_before_any_work(tmp_path):
  result = _main("--config=configs/tiny_sample.py", f"--workdir={tmp_path / 'x'}",
                 "--config.model.d_modle=8")
  assert result.returncode != 0
  assert "d_modle" in result.stderr
  assert not (tmp_path / "x").exists()


def test_tokenizer_that_does_not_fit_the_model_fails_before_any_work(tmp_path):
  result = _main("--config=configs/tiny_sample.py", f"--workdir={tmp_path / 'x'}",
                 "--config.model.vocab_size=512")
  assert result.returncode != 0
  assert "131072" in result.stderr and "512" in result.stderr
  assert not (tmp_path / "x").exists()


def test_every_config_file_loads_and_names_its_own_command_at_the_top():
  import glob
  import re

  from ministral_jax import configs, main

  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    name = os.path.basename(path)
    head = open(path).read(2000)
    command = re.search(r"^COMMAND: (.*)$", head, re.MULTILINE)
    assert command and f"--config=configs/{name}" in command.group(1), name
    arg = re.search(rf"--config=configs/{re.escape(name)}(:\S+)?", command.group(1)).group(1) or ""
    cfg = configs.load(path + arg)
    assert cfg.task in main.TASKS, (name, cfg.task)
