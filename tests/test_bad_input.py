"""Bad input as a demanding new user gives it: one clear error naming the problem (and the fix), before
any work, with nothing written and no input modified.

Every case changes one thing in a tiny, otherwise valid job. The jobs run in-process (the checks are
the same code `main` runs); the command-line cases run `python -m ministral_jax.main` and also check
that the message is one `error:` line without a traceback. More bad-input cases live beside their
subjects: checkpoints (test_checkpoint_integrity), the sample task (test_sample_task), the workdir
lock (test_workdir_lock), pruning (test_prune_pass) and the cascade (test_cascade).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ministral_jax import configs
from ministral_jax.checkpoint import orbax_io
from ministral_jax.data import spm_train, tokenizers
from ministral_jax.errors import UserError
from ministral_jax.eval import task as eval_task
from ministral_jax.model import config, transformer
from ministral_jax.train import distill, pretrain


# Every test here shares the module's fixtures: one xdist worker builds them once (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("bad_input_trained")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"train.steps": 8, "train.log_every": 4, "train.checkpoint_every": 4, "train.eval_every": 8,
        "train.eval_batches": 1, "train.global_batch": 8, "model.n_layers": 1, "model.d_model": 32,
        "model.d_ffn": 64, "model.vocab_size": 512, "data.seq_len": 32, "data.spm_vocab_size": 512,
        "data.max_documents": 200, "optimizer.warmup_steps": 2}


def _set(cfg, **changes):
  for dotted, value in changes.items():
    *blocks, field = dotted.replace("__", ".").split(".")
    target = cfg
    for b in blocks:
      target = target[b]
    target[field] = value
  return cfg


def _tiny(name="pretrain_tiny", **changes):
  cfg = configs.load(os.path.join(REPO, "configs", f"{name}.py"))
  return _set(cfg, **{**TINY, **changes})


def _snapshot(*roots):
  """Every file under `roots` by path and content hash (what "nothing modified" compares)."""
  out = {}
  for root in roots:
    root = str(root)
    if os.path.isfile(root):
      out[root] = hashlib.sha256(open(root, "rb").read()).hexdigest()
    for dirpath, _, names in os.walk(root):
      for n in names:
        p = os.path.join(dirpath, n)
        out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny pretraining run: checkpoints at steps 4 and 8, params/, its SentencePiece."""
  workdir = tmp_path_factory.mktemp("trained")
  pretrain.run(_tiny(), str(workdir))
  spm = next((workdir / "tokenizer").glob("*.model"))
  return workdir, str(spm)


@pytest.fixture(scope="module")
def other_spm(tmp_path_factory):
  """Another SentencePiece (400 ids) trained on the same corpus: fits the model, means other tokens."""
  from ministral_jax.data import pipeline
  cfg = _tiny()
  docs = pipeline.documents(cfg.data, "train")
  return str(spm_train.train_or_load((docs[i] for i in range(len(docs))), 400, tmp_path_factory.mktemp("spm400")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  (root / "train.jsonl").write_text("".join(json.dumps({"text": f"document {i}: " + "words " * 40}) + "\n"
                                            for i in range(20)))
  (root / "empty.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
  (root / "nofield.jsonl").write_text(json.dumps({"body": "text under another key"}) + "\n")
  (root / "empty.txt").write_text("")
  return root


def _teacher(tmp_path, tokenizer_path, **kwargs):
  """A tiny teacher checkpoint recording `tokenizer_path` as its tokenizer."""
  cfg = config.preset("tiny", vocab_size=512, n_layers=1, d_model=32, d_ffn=64, n_heads=4, n_kv_heads=2, head_dim=8)
  params = transformer.init_params(cfg, jax.random.key(1))
  if kwargs.pop("nan", False):
    params["norm"]["scale"] = params["norm"]["scale"].at[0].set(np.nan)
    kwargs["allow_non_finite"] = True
  ident = tokenizers.load_tokenizer(tokenizer_path).identity()
  return str(orbax_io.save_params(tmp_path / "teacher", params, cfg, extra_metadata={"tokenizer": ident}, **kwargs))


def _distill(spm, teacher, **changes):
  cfg = _tiny("distill_tiny", **changes)
  cfg.distill.teacher = teacher
  cfg.data.tokenizer = spm
  return cfg


# (case id, change to the tiny pretraining job, what the message must say)
CONFIG_CASES = [
    ("steps_zero", {"train.steps": 0}, r"train\.steps=0: train for at least 1 step"),
    ("steps_negative", {"train.steps": -5}, r"train\.steps=-5"),
    ("keep_zero_checkpoints", {"train.keep_checkpoints": 0}, r"keep_checkpoints=0.*delete each one"),
    ("checkpoint_every_zero", {"train.checkpoint_every": 0}, r"train\.checkpoint_every=0"),
    ("log_every_zero", {"train.log_every": 0}, r"train\.log_every=0"),
    ("eval_every_negative", {"train.eval_every": -1}, r"train\.eval_every=-1"),
    ("grad_accum_zero", {"train.grad_accum": 0}, r"train\.grad_accum=0"),
    ("lr_zero", {"optimizer.lr": 0.0}, r"optimizer\.lr=0\.0: a positive learning rate"),
    ("lr_negative", {"optimizer.lr": -1e-3}, r"optimizer\.lr=-0\.001"),
    ("unknown_schedule", {"optimizer.schedule": "linear"}, r"optimizer\.schedule='linear'.*'cosine', 'wsd'"),
    ("b2_one", {"optimizer.b2": 1.0}, r"optimizer\.b2=1\.0"),
    ("negative_warmup", {"optimizer.warmup_steps": -1}, r"optimizer\.warmup_steps=-1"),
    ("clip_negative", {"optimizer.clip_norm": -1.0}, r"optimizer\.clip_norm=-1\.0"),
    ("seq_len_one", {"data.seq_len": 1}, r"data\.seq_len=1"),
    ("seq_len_past_max", {"model.max_seq_len": 16}, r"data\.seq_len=32 exceeds the model's max_seq_len=16"),
    ("unknown_source", {"data.source": "csv"}, r"data\.source='csv'"),
    ("text_source_without_paths", {"data.source": "text"}, r"data\.paths=''.*required for source='text'"),
    ("spm_larger_than_model", {"data.spm_vocab_size": 2048}, r"spm_vocab_size=2048 exceeds model\.vocab_size=512"),
    ("spm_too_small", {"data.spm_vocab_size": 100}, r"spm_vocab_size=100 is too small"),
    ("loss_chunk_zero", {"loss.seq_chunk": 0}, r"loss\.seq_chunk=0"),
    ("batch_the_mesh_cannot_split", {"train.global_batch": 3}, r"Global batch 3 cannot be split"),
    ("accum_that_does_not_divide", {"train.grad_accum": 3}, r"grad_accum=3"),
    ("mesh_that_does_not_fit", {"mesh.tensor": 3}, r"tensor"),
    ("missing_init_from", {"init_from": "/nonexistent/ckpt"}, r"init_from='/nonexistent/ckpt' does not exist"),
    ("start_document_negative", {"data.start_document": -1}, r"data\.start_document=-1"),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_training_setting_is_one_error_before_anything_is_written(tmp_path, change, message):
  cfg = _set(_tiny(), **change)
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match=message):
    pretrain.run(cfg, str(workdir))
  assert not workdir.exists()


DATA_CASES = [
    ("paths_matching_nothing", {"data.source": "jsonl", "data.paths": "{root}/nothing*.jsonl"}, r"matches no files"),
    ("corpus_without_documents", {"data.source": "jsonl", "data.paths": "{root}/empty.jsonl"},
     r"empty\.jsonl is empty \(no non-blank text\)"),
    ("record_without_the_field", {"data.source": "jsonl", "data.paths": "{root}/nofield.jsonl"},
     r"no string field 'text' \(set data\.jsonl_field\)"),
    ("empty_eval_split", {"data.source": "jsonl", "data.paths": "{root}/train.jsonl",
                          "data.eval_paths": "{root}/empty.jsonl"}, r"empty\.jsonl is empty.*periodic eval.*eval_every=0"),
    ("text_unit_unknown", {"data.source": "jsonl", "data.paths": "{root}/train.jsonl", "data.text_unit": "page"},
     r"data\.text_unit='page'"),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_is_one_error_before_anything_is_written(tmp_path, corpus, change, message):
  cfg = _tiny(**{k: v.format(root=corpus) if isinstance(v, str) else v for k, v in change.items()})
  before = _snapshot(corpus)
  with pytest.raises(UserError, match=message):
    pretrain.run(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists() and _snapshot(corpus) == before


def test_an_empty_workdir_name_or_a_file_as_workdir_is_refused(tmp_path):
  with pytest.raises(UserError, match="--workdir is empty"):
    pretrain.run(_tiny(), "")
  (tmp_path / "file").write_text("not a directory")
  with pytest.raises(UserError, match="is a file, not a directory"):
    pretrain.run(_tiny(), str(tmp_path / "file"))
  assert (tmp_path / "file").read_text() == "not a directory"


RESUME_CASES = [
    ("changed_learning_rate", {"optimizer.lr": 1e-2}, r"optimizer\.lr: 0\.003 in the checkpoint, 0\.01 now"),
    ("changed_schedule", {"optimizer.schedule": "wsd"}, r"optimizer\.schedule: 'cosine' in the checkpoint, 'wsd' now"),
    ("more_steps", {"train.steps": 12}, r"(?s)train\.steps: 8 in the checkpoint, 12 now.*allow_resume_changes=True"),
    ("other_seed", {"seed": 3}, r"seed: 0 in the checkpoint, 3 now"),
    ("other_model", {"model.d_ffn": 96}, r"(?s)different experiment.*d_ffn: 64 != 96"),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_resuming_with_other_settings_is_an_error_naming_the_fields(trained, change, message):
  workdir, spm = trained
  (workdir / "params").rename(workdir / "params.aside")  # unfinished: the run would resume from step 8
  try:
    before = _snapshot(workdir)
    with pytest.raises(UserError, match=message):
      pretrain.run(_tiny(**{"data.tokenizer": spm, **change}), str(workdir))
    assert _snapshot(workdir) == before
  finally:
    (workdir / "params.aside").rename(workdir / "params")


def test_allow_resume_changes_continues_a_finished_run_with_more_steps(trained, tmp_path):
  workdir, spm = trained
  copy = tmp_path / "longer"
  shutil.copytree(workdir, copy)
  last = pretrain.run(_tiny(**{"data.tokenizer": spm, "train.steps": 10, "train.allow_resume_changes": True}),
                      str(copy))
  assert np.isfinite(last["loss"])
  assert json.loads((copy / "params" / "metadata.json").read_text())["step"] == 10


def test_resuming_with_another_tokenizer_is_refused(trained, other_spm):
  workdir, _ = trained
  before = _snapshot(workdir)
  with pytest.raises(UserError, match="tokenizer mismatch.*400 ids"):
    pretrain.run(_tiny(**{"data.tokenizer": other_spm, "train.steps": 12}), str(workdir))
  assert _snapshot(workdir) == before


def test_a_teacher_trained_with_another_sentencepiece_is_refused(trained, other_spm, tmp_path):
  """Both vocabularies fit the 512-row embedding, so only the recorded identity can tell."""
  _, spm = trained
  teacher = _teacher(tmp_path, other_spm)
  before = _snapshot(teacher)
  with pytest.raises(UserError, match=r"tokenizer mismatch: distill\.teacher=.*400 ids.*512 ids"):
    distill.run(_distill(spm, teacher), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists() and _snapshot(teacher) == before


def test_a_hugging_face_teacher_is_checked_against_the_tokenizer_file_it_ships(trained, other_spm, tmp_path):
  """HF and native directories carry their tokenizer beside the weights; conversion to orbax records it."""
  from ministral_jax.checkpoint import convert
  _, spm = trained
  hf_dir = tmp_path / "teacher_hf"
  convert.convert("orbax", "hf", _teacher(tmp_path, spm), str(hf_dir))
  shutil.copy(other_spm, hf_dir / "tokenizer.model")
  with pytest.raises(UserError, match=r"tokenizer mismatch: distill\.teacher=.*teacher_hf.*400 ids"):
    distill.run(_distill(spm, str(hf_dir)), str(tmp_path / "run"))
  convert.convert("hf", "orbax", str(hf_dir), str(tmp_path / "back"))
  recorded = orbax_io.read_metadata(tmp_path / "back")["tokenizer"]
  assert recorded == tokenizers.load_tokenizer(str(hf_dir / "tokenizer.model")).identity()


def test_a_teacher_with_non_finite_weights_is_refused_naming_the_tensor(trained, tmp_path):
  _, spm = trained
  teacher = _teacher(tmp_path, spm, nan=True)
  with pytest.raises(UserError, match=r"non-finite.*\['norm'\]\['scale'\]"):
    distill.run(_distill(spm, teacher), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_damaged_teacher_is_named_not_misread(trained, tmp_path):
  _, spm = trained
  teacher = _teacher(tmp_path, spm)
  manifest = next(p for p in (tmp_path / "teacher" / "params").rglob("*") if p.name == "_METADATA")
  manifest.write_bytes(manifest.read_bytes()[:20])
  with pytest.raises(UserError, match=r"teacher.*damaged"):
    distill.run(_distill(spm, teacher), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_teacher_is_named(trained, tmp_path):
  _, spm = trained
  with pytest.raises(UserError, match=r"distill\.teacher='/nonexistent/teacher' does not exist"):
    distill.run(_distill(spm, "/nonexistent/teacher"), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_distillation_settings_out_of_range_are_named(trained, tmp_path):
  _, spm = trained
  cfg = _distill(spm, str(trained[0] / "params"), **{"distill.temperature": 0.0, "distill.ce_weight": 1.5})
  with pytest.raises(UserError, match=r"distill\.temperature=0\.0(.|\n)*distill\.ce_weight=1\.5"):
    distill.run(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_evaluating_with_another_tokenizer_is_refused(trained, other_spm, tmp_path):
  workdir, _ = trained
  cfg = _tiny(**{"data.tokenizer": other_spm, "task": "eval"})
  cfg.eval.checkpoint = str(workdir / "params")
  with pytest.raises(UserError, match=r"tokenizer mismatch: checkpoint .*params.*512 ids.*400 ids"):
    eval_task.run(cfg, str(tmp_path / "eval"))
  assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("setup,message", [
    (lambda cfg, root: cfg.eval.update(checkpoint=str(root / "nowhere")), r"no checkpoint to evaluate"),
    (lambda cfg, root: cfg.eval.update(files=str(root / "missing.txt")), r"missing\.txt, which does not exist"),
    (lambda cfg, root: cfg.eval.update(files=str(root / "empty.txt")), r"empty\.txt is empty"),
    (lambda cfg, root: cfg.eval.update(batch_size=0), r"eval\.batch_size=0"),
], ids=["no_checkpoint", "missing_file", "empty_file", "batch_size_zero"])
def test_bad_eval_input_is_one_error_before_the_weights_are_read(trained, corpus, tmp_path, setup, message):
  workdir, spm = trained
  cfg = _tiny(**{"data.tokenizer": spm, "task": "eval"})
  cfg.eval.checkpoint = str(workdir / "params")
  setup(cfg, corpus)
  with pytest.raises(UserError, match=message):
    eval_task.run(cfg, str(tmp_path / "eval"))
  assert not (tmp_path / "eval").exists()


def test_a_line_cut_short_in_metrics_jsonl_does_not_block_resume(trained, tmp_path):
  workdir, spm = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "params")  # the final params are all that is left to write
  history = (copy / "metrics.jsonl").read_text()
  (copy / "metrics.jsonl").write_text(history + '{"step": 9, "loss": 4.')
  pretrain.run(_tiny(**{"data.tokenizer": spm}), str(copy))
  assert (copy / "metrics.jsonl").read_text() == history and (copy / "params").exists()


# ---- the command line: one `error:` line, no traceback, nothing written ----

def _main(*args):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "ministral_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def taskless_config(tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "taskless.py"
  path.write_text("import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict({'seed': 0})\n")
  return str(path)


CLI_CASES = [
    ("missing_config_file", ["--config=configs/pretrain_tiyn.py"], r"there is no file 'configs/pretrain_tiyn\.py'"),
    ("config_without_task", ["--config={taskless}"], r"no `task` field"),
    ("unknown_task", ["--config=configs/pretrain_tiny.py", "--config.task=pretrian"], r"Unknown task 'pretrian'"),
    ("unknown_field", ["--config=configs/pretrain_tiny.py", "--config.train.stpes=5"], r"stpes"),
    ("value_of_the_wrong_type", ["--config=configs/pretrain_tiny.py", "--config.train.steps=many"], r"train\.steps"),
    ("empty_workdir", ["--config=configs/pretrain_tiny.py", "--workdir="], r"--workdir is empty"),
    ("zero_steps", ["--config=configs/pretrain_tiny.py", "--config.train.steps=0"], r"train\.steps=0"),
]


@pytest.mark.parametrize("args,message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_a_command_line_mistake_is_one_message_without_a_traceback(tmp_path, taskless_config, args, message):
  args = [a.format(taskless=taskless_config) for a in args]
  workdir = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path / 'run'}"]
  result = _main(*args, *workdir)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert any(line.startswith(("error:", "FATAL Flags parsing error")) for line in result.stderr.splitlines())
  import re
  assert re.search(message, result.stderr), result.stderr[-2000:]
  assert not (tmp_path / "run").exists()
  assert not os.path.exists(os.path.join(REPO, "checkpoints"))  # an empty --workdir never trains into the repo


def test_verbosity_shows_the_traceback_a_quiet_run_hides(tmp_path):
  result = _main("--config=configs/pretrain_tiny.py", "--config.train.steps=0", f"--workdir={tmp_path / 'run'}",
                 "--verbosity=0")
  assert result.returncode == 2 and "Traceback" in result.stderr and "train.steps=0" in result.stderr
