"""Orbax params checkpoints: cross-mesh restore, atomic writes, clear errors."""

import json
import os

import jax
import numpy as np
import pytest

from ministral_jax import sharding
from ministral_jax.checkpoint import orbax_io
from ministral_jax.model import config, transformer

CFG = config.preset("tiny_shard")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  params = transformer.init_params(CFG, jax.random.key(2))
  on_fsdp = sharding.Partitioner.from_config(dict(data=1, fsdp=8, tensor=1))
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  orbax_io.save_params(path, on_fsdp.shard_params(params, CFG), CFG)
  return path, params


def test_checkpoint_saved_on_one_mesh_restores_on_another_with_identical_values(saved):
  path, params = saved
  other = sharding.Partitioner.from_config(dict(data=2, fsdp=1, tensor=4))
  restored, cfg = orbax_io.load_params(path, other)
  assert cfg == CFG
  wq = restored["layers"]["attention"]["wq"]
  assert wq.sharding.spec == other.param_shardings(CFG)["layers"]["attention"]["wq"].spec
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_execution_fields_may_change_on_load_but_architecture_may_not(saved):
  path, _ = saved
  _, cfg = orbax_io.load_params(path, dtype="bfloat16", remat_policy="full")
  assert cfg.dtype == "bfloat16" and cfg.remat_policy == "full"
  with pytest.raises(ValueError, match="Cannot override architecture fields \\['d_model'\\]"):
    orbax_io.load_params(path, d_model=32)


def test_checkpoint_whose_shapes_disagree_with_its_config_is_rejected(saved, tmp_path):
  path, params = saved
  bad = tmp_path / "bad"
  orbax_io.save_params(bad, params, CFG)
  cfg_file = bad / orbax_io.CONFIG_FILE
  cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "d_ffn": 96}))
  with pytest.raises(ValueError, match=r"\['feed_forward'\]\['w1'\]: shape \(2, 64, 128\) but the config implies \(2, 64, 96\)"):
    orbax_io.load_params(bad)


def test_missing_or_incomplete_checkpoint_gives_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint at"):
    orbax_io.load_params(tmp_path / "nothing")
  (tmp_path / "half").mkdir()
  with pytest.raises(ValueError, match="model_config.json is missing"):
    orbax_io.load_params(tmp_path / "half")


def test_save_refuses_to_overwrite_and_a_failed_save_leaves_nothing(saved, tmp_path, monkeypatch):
  path, params = saved
  with pytest.raises(FileExistsError, match="already exists"):
    orbax_io.save_params(path, params, CFG)

  def crash(*args, **kwargs):
    raise RuntimeError("simulated crash while writing metadata")
  monkeypatch.setattr(orbax_io, "_write_json", crash)
  target = tmp_path / "crashed"
  with pytest.raises(RuntimeError, match="simulated crash"):
    orbax_io.save_params(target, params, CFG)
  assert not target.exists() and os.listdir(tmp_path) == []


def test_saving_params_that_do_not_match_the_config_is_rejected(saved, tmp_path):
  _, params = saved
  with pytest.raises(ValueError, match="missing \\['output'\\]"):
    orbax_io.save_params(tmp_path / "x", {k: v for k, v in params.items() if k != "output"}, CFG)
