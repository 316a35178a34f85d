"""Task `sample` does what its config says: init_from in place, the workdir's own random model or a refusal,
prompts from the command line or a file, and every bad value refused before anything is written."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from absl import flags
from ml_collections import config_flags

from ministral_jax import configs
from ministral_jax.checkpoint import convert, hf, native, orbax_io
from ministral_jax.data import images, tokenizers
from ministral_jax.errors import UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ModelConfig
from ministral_jax.sample import sampler, task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  """The built-in default, shrunk: one layer, and a 32,768-id SentencePiece file (a quarter of Tekken's
  embedding to initialise)."""
  cfg = configs.load(os.path.join(REPO, "configs/tiny_sample.py"))
  cfg.update_from_flattened_dict({"model.n_layers": 1, "model.vocab_size": 32_768, "tokenizer": "spm_v3",
                                  "max_new_tokens": 4, **overrides})
  return cfg


def _snapshot(root):
  """Every file under `root` with its size and mtime: equal snapshots mean nothing was written."""
  return {os.path.relpath(os.path.join(d, f), root): (os.stat(os.path.join(d, f)).st_size,
                                                      os.stat(os.path.join(d, f)).st_mtime_ns)
          for d, _, names in os.walk(root) for f in names}


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizers.load_tokenizer("spm_v3")


def _save_checkpoint(path, tokenizer):
  """An orbax checkpoint whose architecture is not the config's (another d_ffn)."""
  model_cfg = ModelConfig.from_dict(_config().model).replace(d_ffn=96)
  params = jax.jit(transformer.init_params, static_argnums=0)(model_cfg, jax.random.key(7))
  orbax_io.save_params(path, params, model_cfg, extra_metadata={"tokenizer": tokenizer.identity()})
  return params, model_cfg


def test_init_from_is_sampled_in_place_with_its_own_architecture(tmp_path, tokenizer):
  params, model_cfg = _save_checkpoint(str(tmp_path / "orbax"), tokenizer)
  hf.save_hf(params, model_cfg, tmp_path / "hf")
  native.save_native(params, model_cfg, tmp_path / "native")
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("Once upon a time\r\nThe capital of France is\n")
  prompts = ["Once upon a time", "The capital of France is"]
  expected = sampler.generate(params, model_cfg, [tokenizer.encode(p, bos=True) for p in prompts], 4, 0.0,
                              jax.random.key(0), eos_id=tokenizer.eos_id)
  for fmt in ("orbax", "hf", "native"):
    workdir = tmp_path / f"run_{fmt}"
    result = task.run(_config(init_from=str(tmp_path / fmt), prompts="", prompt_file=str(prompt_file)),
                      str(workdir))
    assert [s["prompt"] for s in result["samples"]] == prompts
    assert [s["tokens"] for s in result["samples"]] == expected, fmt
    assert result["checkpoint"] == str(tmp_path / fmt)
    assert sorted(os.listdir(workdir)) == ["samples.json"]  # nothing copied
    assert json.loads((workdir / "samples.json").read_text())["samples"] == result["samples"]


def test_a_checkpoint_made_with_another_tokenizer_is_refused(tmp_path, tokenizer):
  # The check reads the checkpoint's JSON files only, so they are all this checkpoint needs.
  path = tmp_path / "model"
  path.mkdir()
  (path / orbax_io.CONFIG_FILE).write_text(json.dumps(ModelConfig.from_dict(_config().model).to_dict()))
  (path / orbax_io.METADATA_FILE).write_text(json.dumps({"format": orbax_io.FORMAT, "layout": transformer.LAYOUT,
                                                         "tokenizer": tokenizer.identity()}))
  with pytest.raises(UserError, match="tokenizer mismatch"):
    task.run(_config(init_from=str(path), tokenizer="spm_v7"), str(tmp_path / "run"))  # as many ids
  assert not (tmp_path / "run").exists()


def test_the_random_model_is_kept_and_another_model_or_seed_is_refused(tmp_path):
  workdir = tmp_path / "run"
  first = task.run(_config(prompts="Once upon a time"), str(workdir))
  assert [s["prompt"] for s in first["samples"]] == ["Once upon a time"]
  meta = json.loads((workdir / "params" / "metadata.json").read_text())
  assert meta["task"] == "sample" and meta["seed"] == 0 and meta["tokenizer"]["kind"] == "sentencepiece"
  before = _snapshot(workdir)
  for change, named in (({"seed": 1}, "seed: 0 there, 1 in the config"),
                        ({"model.d_ffn": 96}, "model.d_ffn: 128 there, 96 in the config"),
                        ({"seed": 2, "model.n_layers": 2}, "model.n_layers")):
    with pytest.raises(UserError, match="new --workdir") as e:
      task.run(_config(prompts="Once upon a time", **change), str(workdir))
    assert named in str(e.value)
  with pytest.raises(UserError, match="tokenizer mismatch"):
    task.run(_config(prompts="Once upon a time", tokenizer="spm_v7"), str(workdir))
  assert _snapshot(workdir) == before
  again = task.run(_config(prompts="Once upon a time"), str(workdir))  # the same config restores it
  assert again["samples"] == first["samples"]
  assert _snapshot(workdir / "params") == {k[len("params/"):]: v for k, v in before.items()
                                          if k.startswith("params/")}


@pytest.mark.parametrize("flags_,expected", [
    (["--config.prompts=Once upon a time"], ["Once upon a time"]),
    (["--config.prompts=Once upon a time\nThe capital, of France is"],
     ["Once upon a time", "The capital, of France is"]),
    (["--config.prompt_file=PROMPT_FILE", "--config.prompts="], ["from a file", "two"]),
])
def test_prompts_can_be_set_on_the_command_line(tmp_path, flags_, expected):
  (tmp_path / "prompts.txt").write_text("from a file\ntwo\n")
  argv = ["main", f"--config={REPO}/configs/tiny_sample.py",
          *(f.replace("PROMPT_FILE", str(tmp_path / "prompts.txt")) for f in flags_)]
  values = flags.FlagValues()  # as main defines it, but not on the global flags
  config = config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                           sys_argv=argv)
  values(argv)
  assert task.read_prompts(config.value) == expected


@pytest.mark.parametrize("prompts,expected", [
    ("Once upon a time", ["Once upon a time"]),
    ("Once upon a time\nThe capital, of France is\n", ["Once upon a time", "The capital, of France is"]),
    (("a tuple", "set in Python"), ["a tuple", "set in Python"]),
])
def test_prompts_are_one_per_line(prompts, expected):
  cfg = _config()
  with cfg.ignore_type():
    cfg.prompts = prompts
  assert task.read_prompts(cfg) == expected


@pytest.mark.parametrize("overrides,message", [
    ({"max_new_tokens": 0}, "max_new_tokens is 0"),
    ({"max_new_tokens": -3}, "max_new_tokens is -3"),
    ({"temperature": -0.5}, "temperature is -0.5"),
    ({"prompts": ""}, "No prompts"),
    ({"prompts": "a\n\nb"}, "Prompt 2 of config.prompts is empty"),
    ({"prompts": "  "}, "Prompt 1 of config.prompts is empty"),
    ({"prompts": "", "prompt_file": "/no/such/prompts.txt"}, "does not exist"),
    ({"prompt_file": "PROMPT_FILE"}, "both set"),
    ({"prompts": "", "prompt_file": "EMPTY_FILE"}, "No prompts"),
    ({"max_new_tokens": 125}, "more than the model's max_seq_len 128: lower max_new_tokens to"),
    ({"init_from": "/no/such/checkpoint"}, "not a checkpoint directory"),
    ({"model.vocab_size": 512}, "32768 ids but the model's embedding has only 512"),
])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, overrides, message):
  (tmp_path / "prompts.txt").write_text("Once upon a time\n")
  (tmp_path / "empty.txt").write_text("")
  names = {"PROMPT_FILE": str(tmp_path / "prompts.txt"), "EMPTY_FILE": str(tmp_path / "empty.txt")}
  overrides = {k: names.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
  with pytest.raises(UserError, match=message):
    task.run(_config(**overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_an_image_goes_after_bos_as_its_img_layout_and_is_sampled_as_the_sampler_samples_it(tmp_path):
  path = tmp_path / "noise.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)).save(path)
  result = task.run(_vision_config(path, prompts="A picture of"), str(tmp_path / "run"))
  processed = images.preprocess_mistral(images.load_image(path), 64, 4, 2)  # tiny_vision: 64 px, patch 4
  assert processed.grid == (5, 8)  # 40 x 60 px -> 40 x 64 (multiples of 8): 5 rows of 8 [IMG] + a separator
  tekken = tokenizers.load_tokenizer("tekken")
  prompt = tekken.encode("A picture of", bos=True)
  params, model_cfg = convert.load_any(str(tmp_path / "run" / "params"))
  expected = sampler.generate(params, model_cfg, [prompt[:1] + images.image_tokens(5, 8) + prompt[1:]], 4,
                              eos_id=tekken.eos_id, images=[[processed.pixels]])[0]
  assert result["samples"][0]["tokens"] == expected


def test_images_with_a_tokenizer_that_numbers_image_tokens_otherwise_are_refused_before_any_write(tmp_path):
  path = tmp_path / "noise.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
  with pytest.raises(UserError, match=r"set model.image_token_id=10, model.image_break_id=14"):
    task.run(_vision_config(path, tokenizer="spm_v7", **{"model.vocab_size": 32_768}), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def _vision_config(image, **overrides):
  """configs/tiny_sample.py:tiny_vision (Tekken ids for the image tokens), one layer, 4 new tokens."""
  cfg = configs.load(os.path.join(REPO, "configs/tiny_sample.py:tiny_vision"))
  cfg.update_from_flattened_dict({"model.n_layers": 1, "max_new_tokens": 4, "images": str(image), **overrides})
  return cfg
