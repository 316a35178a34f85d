"""Checkpoints are handed out intact or not at all: fingerprints, damaged files, NaN weights, config types,
file modes."""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ministral_jax import sharding
from ministral_jax.checkpoint import convert, hf, integrity, native, orbax_io
from ministral_jax.errors import EXIT_USER_ERROR, UserError
from ministral_jax.model import config, transformer

# A failed orbax restore leaves coroutines that complain when garbage-collected; the error itself is tested.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
CFG = config.preset("tiny")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # zarr chunks (tensor data); OCDBT tree nodes start with 0x0cdb20de


@pytest.fixture(scope="module")
def params():
  return transformer.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, params):
  """An orbax params checkpoint written from 8 devices (read-only: tests copy it before damaging it)."""
  on_8 = sharding.Partitioner.from_config(dict(data=1, fsdp=4, tensor=2))
  path = tmp_path_factory.mktemp("orbax") / "ckpt"
  orbax_io.save_params(path, on_8.shard_params(params, CFG), CFG)
  return path


@pytest.fixture
def damaged_copy(saved, tmp_path):
  return Path(shutil.copytree(saved, tmp_path / "copy"))


def with_nan(params, leaf=("layers", "attention", "wq")):
  """`params` with one NaN in `leaf`."""
  out = jax.tree.map(np.array, params)
  target = out
  for key in leaf[:-1]:
    target = target[key]
  target[leaf[-1]].flat[3] = np.nan
  return out


def digest(path):
  return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
          for f in sorted(Path(path).rglob("*")) if f.is_file()}


def truncate(file, keep=0.5):
  data = Path(file).read_bytes()
  Path(file).write_bytes(data[:int(len(data) * keep)])


def tensor_range(file, name):
  """Absolute byte range of tensor `name` in a safetensors file."""
  with open(file, "rb") as fh:
    size = struct.unpack("<Q", fh.read(8))[0]
    begin, end = json.loads(fh.read(size))[name]["data_offsets"]
  return 8 + size + begin, 8 + size + end


# --------------------------------------------------------------------------
# Orbax: fingerprints on any mesh, damage is one clear error.
# --------------------------------------------------------------------------
def test_params_saved_on_8_devices_restore_and_verify_on_1_and_on_another_mesh(saved, params):
  recorded = orbax_io.read_metadata(saved)["fingerprints"]
  assert recorded == integrity.fingerprints(params)  # computed from the sharded arrays, equal to 1 device's
  one, _ = orbax_io.load_params(saved)
  other = sharding.Partitioner.from_config(dict(data=2, fsdp=2, tensor=2))
  eight, _ = orbax_io.load_params(saved, other)
  assert eight["layers"]["attention"]["wq"].sharding.spec == (
      other.param_shardings(CFG)["layers"]["attention"]["wq"].spec)
  assert integrity.fingerprints(one) == integrity.fingerprints(eight) == recorded


def test_a_param_dtype_override_is_verified_in_the_saved_dtype_then_cast(saved, params):
  restored, cfg = orbax_io.load_params(saved, param_dtype="bfloat16")
  assert cfg.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(restored)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_array_equal(np.asarray(restored["norm"]["scale"], np.float32),
                                np.asarray(params["norm"]["scale"].astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("file", ["params/manifest.ocdbt", "params/_METADATA", "metadata.json",
                                  "model_config.json"])
@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_a_truncated_manifest_or_metadata_file_is_reported_as_damaged_naming_the_checkpoint(
    damaged_copy, file, keep):
  truncate(damaged_copy / file, keep)
  with pytest.raises(UserError) as e:
    orbax_io.load_params(damaged_copy)
  message = str(e.value)
  assert f"checkpoint {damaged_copy} is damaged or incomplete: " in message
  assert "Restore it from a copy" in message and "does not match its model config" not in message
  assert len(message.splitlines()) == 1


def test_flipped_bytes_in_the_tensor_data_are_reported_as_damaged_never_returned(damaged_copy):
  chunks = [f for f in (damaged_copy / "params").rglob("*")
            if f.is_file() and f.parent.name == "d" and f.read_bytes()[:4] == ZSTD_MAGIC]
  assert chunks, "orbax wrote no zstd data file under params/ (layout changed?)"
  victim = max(chunks, key=lambda f: f.stat().st_size)
  data = bytearray(victim.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  victim.write_bytes(bytes(data))
  # A decode error, a non-finite value or a fingerprint mismatch: all three say "damaged".
  with pytest.raises(UserError, match=r"damaged"):
    orbax_io.load_params(damaged_copy)


def test_a_checkpoint_without_fingerprints_still_loads_with_the_finite_check(damaged_copy, params):
  meta_file = damaged_copy / orbax_io.METADATA_FILE
  meta = json.loads(meta_file.read_text())
  del meta["fingerprints"]
  meta_file.write_text(json.dumps(meta))
  restored, _ = orbax_io.load_params(damaged_copy)
  assert integrity.fingerprints(restored) == integrity.fingerprints(params)


def test_save_params_refuses_nan_naming_the_tensor_and_accepts_it_when_allowed(params, tmp_path):
  bad = with_nan(params)
  with pytest.raises(UserError, match=r"NaN or Inf in 1 tensor\(s\): \['layers'\]\['attention'\]\['wq'\]"):
    orbax_io.save_params(tmp_path / "nan", bad, CFG, extra_metadata={"tokenizer": {"kind": "test"}})
  assert os.listdir(tmp_path) == []
  orbax_io.save_params(tmp_path / "nan", bad, CFG, extra_metadata={"tokenizer": {"kind": "test"}},
                       allow_non_finite=True)
  assert orbax_io.read_metadata(tmp_path / "nan")["tokenizer"] == {"kind": "test"}
  with pytest.raises(UserError, match=r"non-finite.*\['layers'\]\['attention'\]\['wq'\]"):
    orbax_io.load_params(tmp_path / "nan")
  restored, _ = orbax_io.load_params(tmp_path / "nan", allow_non_finite=True)
  assert np.isnan(np.asarray(restored["layers"]["attention"]["wq"])).sum() == 1


def test_a_failure_just_before_the_commit_leaves_no_checkpoint(params, tmp_path, monkeypatch):
  monkeypatch.setenv("MINISTRAL_JAX_FAULT", "params.before_commit:1:enospc")
  with pytest.raises(OSError, match="No space left"):
    orbax_io.save_params(tmp_path / "ckpt", params, CFG)
  assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------
# Safetensors (HF / native): NaN and truncation named by tensor and file.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, params):
  path = tmp_path_factory.mktemp("hf") / "ckpt"
  hf.save_hf(jax.tree.map(np.asarray, params), CFG, path)
  return path


def test_convert_refuses_a_tensor_overwritten_with_ff_bytes_and_writes_nothing(hf_dir, tmp_path):
  src = Path(shutil.copytree(hf_dir, tmp_path / "src"))
  name = "model.layers.1.self_attn.q_proj.weight"
  begin, end = tensor_range(src / "model.safetensors", name)
  with open(src / "model.safetensors", "r+b") as fh:
    fh.seek(begin + 4 * 7)
    fh.write(b"\xff" * 8)  # two float32 NaNs
  assert begin + 4 * 9 <= end
  before = digest(src)
  dst = tmp_path / "dst"
  run = subprocess.run([sys.executable, "-m", "ministral_jax.checkpoint.convert", "--from=hf", "--to=orbax",
                        f"--src={src}", f"--dst={dst}"], capture_output=True, text=True, timeout=120)
  assert run.returncode == EXIT_USER_ERROR, run.stderr
  assert f"error: HF checkpoint {src}: tensor '{name}' in {src / 'model.safetensors'} holds NaN" in run.stderr
  assert "Traceback" not in run.stderr
  assert not dst.exists() and digest(src) == before
  convert.main(["--from=hf", "--to=native", f"--src={src}", f"--dst={dst}", "--allow_non_finite"])
  loaded, _ = native.load_native(dst, allow_non_finite=True)
  assert np.isnan(loaded["layers"]["attention"]["wq"][1]).sum() == 2
  assert digest(src) == before


def test_savers_refuse_non_finite_params_unless_allowed(params, tmp_path):
  bad = with_nan(jax.tree.map(np.asarray, params), ("layers", "feed_forward", "w2"))
  for save in (hf.save_hf, native.save_native):
    with pytest.raises(UserError, match=r"\['layers'\]\['feed_forward'\]\['w2'\]\[0\]"):
      save(bad, CFG, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save(bad, CFG, tmp_path / "out", allow_non_finite=True)
    shutil.rmtree(tmp_path / "out")


def test_a_truncated_safetensors_file_is_one_clear_error_naming_the_file(hf_dir, tmp_path):
  src = Path(shutil.copytree(hf_dir, tmp_path / "src"))
  truncate(src / "model.safetensors", 0.6)
  with pytest.raises(UserError, match="truncated") as e:
    hf.load_hf(src)
  assert str(src / "model.safetensors") in str(e.value)


# --------------------------------------------------------------------------
# Config value types.
# --------------------------------------------------------------------------
def test_a_string_head_count_in_config_json_names_the_field_and_the_file(hf_dir, tmp_path):
  src = Path(shutil.copytree(hf_dir, tmp_path / "src"))
  d = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps({**d, "num_attention_heads": "4"}))
  with pytest.raises(UserError, match=r'config\.json: num_attention_heads="4" is a str; an integer is expected'):
    hf.load_hf(src)
  with pytest.raises(UserError, match=r"params\.json: rope_theta=true is a bool; a number is expected"):
    native.config_from_params_json({**native.config_to_params_json(CFG), "rope_theta": True})


@pytest.mark.parametrize("field,value,message", [
    ("n_heads", "4", 'n_heads="4" is a str; an integer is expected'),
    ("n_layers", 2.0, "n_layers=2.0 is a float; an integer is expected"),
    ("d_model", True, "d_model=true is a bool; an integer is expected"),
    ("norm_eps", "1e-5", 'norm_eps="1e-5" is a str; a number is expected'),
    ("tie_embeddings", 1, "tie_embeddings=1 is an int; true or false is expected"),
    ("dtype", None, "dtype=null is a NoneType; a string is expected"),
])
def test_model_config_fields_must_have_their_type(field, value, message):
  with pytest.raises(UserError, match=f"Model config field {message}"):
    CFG.replace(**{field: value})


def test_float_fields_store_ints_as_floats_so_equal_configs_stay_equal():
  cfg = CFG.replace(rope_theta=10_000, norm_eps=np.float64(1e-5), d_model=np.int64(64))
  assert type(cfg.rope_theta) is float and type(cfg.d_model) is int
  assert cfg == CFG.replace(rope_theta=10_000.0) and hash(cfg) == hash(CFG.replace(rope_theta=10_000.0))
  assert json.loads(json.dumps(cfg.to_dict()))["rope_theta"] == 10_000.0


# --------------------------------------------------------------------------
# Exported files' permissions.
# --------------------------------------------------------------------------
def test_exported_hf_and_native_files_are_mode_0644_under_umask_022(params, tmp_path):
  host = jax.tree.map(np.asarray, params)
  old = os.umask(0o022)
  try:
    hf.save_hf(host, CFG, tmp_path / "hf", max_shard_bytes=200_000)
    native.save_native(host, CFG, tmp_path / "native")
  finally:
    os.umask(old)
  files = [f for f in tmp_path.rglob("*") if f.is_file()]
  assert len([f for f in files if f.suffix == ".safetensors"]) > 2
  assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o644" for f in files}
