"""SFT on conversations with images, through the real job (`configs/vision_tiny.py:quick`, a few steps):
the frozen ViT stays bitwise unchanged while the projector trains, and bad image input stops the job before
any step."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ministral_jax import configs
from ministral_jax.checkpoint import orbax_io
from ministral_jax.errors import UserError
from ministral_jax.model import config, transformer
from ministral_jax.train import sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--config=configs/vision_tiny.py:quick", "--config.train.steps=4", "--config.train.log_every=2",
         "--config.train.eval_every=4", "--config.train.checkpoint_every=4", "--config.train.eval_batches=1",
         "--config.shapes.train=64", "--config.shapes.heldout=16", "--config.eval.answers.n=16"]


def _main(args):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "ministral_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


@pytest.mark.xdist_group("vision_sft")
def test_sft_with_images_leaves_the_frozen_vit_bitwise_unchanged_and_trains_the_projector(tmp_path):
  cfg = config.ModelConfig.from_dict(configs.load(os.path.join(REPO, "configs/vision_tiny.py:quick")).model).replace(
      train_vision_encoder=False)
  start = transformer.init_params(cfg, jax.random.key(7))
  orbax_io.save_params(tmp_path / "start", start, cfg)
  result = _main([*QUICK, f"--config.init_from={tmp_path / 'start'}", "--config.model.train_vision_encoder=False",
                  f"--workdir={tmp_path / 'run'}"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "eval_answer_accuracy" in result.stdout + result.stderr  # the held-out answers were scored
  end, _ = orbax_io.load_params(tmp_path / "run" / "params")
  for a, b in zip(jax.tree.leaves(start["vision_encoder"]), jax.tree.leaves(end["vision_encoder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for name in ("w_in", "w_out", "merging_layer"):
    assert not np.array_equal(np.asarray(start["projector"][name]), np.asarray(end["projector"][name]))
  assert not np.array_equal(np.asarray(start["tok_embeddings"]), np.asarray(end["tok_embeddings"]))


def test_image_data_for_a_text_only_model_is_one_clear_error_before_any_work(tmp_path):
  cfg = configs.load(os.path.join(REPO, "configs/vision_tiny.py:quick"))
  with cfg.unlocked():
    cfg.model.vision_layers = 0
  with pytest.raises(UserError, match=r"data.image_slots=64: the data carries images but the model has no"):
    sft.check(cfg)
  assert not (tmp_path / "data").exists()


@pytest.mark.xdist_group("vision_sft")
def test_image_token_ids_that_disagree_with_the_tokenizer_stop_the_job_naming_the_fix(tmp_path):
  result = _main([*QUICK, "--config.model.image_token_id=12", f"--workdir={tmp_path}"])
  assert result.returncode != 0
  assert "set model.image_token_id=9" in result.stderr
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
