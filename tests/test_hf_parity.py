"""Checkpoint import/export: logits parity with transformers, the native q/k permutation, bad input.

Tiny random transformers models (fp32, CPU) with YaRN and the query
temperature active on 96-token sequences (original context 32), so every
RoPE / temperature path is exercised past L0.
"""

import hashlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import (AutoModelForCausalLM, Ministral3Config, Ministral3ForCausalLM, MistralConfig,
                          MistralForCausalLM)

from ministral_jax.checkpoint import convert, hf, native, safetensors_io
from ministral_jax.model import config, transformer

VOCAB, D_MODEL, D_FFN, LAYERS, SEQ, L0 = 512, 64, 128, 2, 96, 32
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, SEQ)).astype(np.int32)
TOL = 1e-4

# name -> (model_type, heads, kv_heads, head_dim, tied, yarn mscale pair given)
HF_CASES = {
    "ministral3-mha-untied": ("ministral3", 4, 4, 16, False, True),
    "ministral3-gqa2-tied": ("ministral3", 4, 2, 32, True, True),
    "ministral3-gqa4-untied-no-mscale": ("ministral3", 8, 2, 16, False, False),
    "mistral-mha-tied": ("mistral", 4, 4, 16, True, True),
    "mistral-gqa2-untied": ("mistral", 4, 2, 32, False, True),
    "mistral-gqa4-untied": ("mistral", 8, 2, 16, False, True),
}


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------
def make_hf_model(model_type="ministral3", heads=4, kv_heads=2, head_dim=32, tied=False, mscale=True,
                  seed=0):
  """A tiny random transformers CausalLM in eval mode, norms randomised so that swapping them shows."""
  common = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FFN, num_hidden_layers=LAYERS,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                max_position_embeddings=4 * L0, tie_word_embeddings=tied)
  if model_type == "ministral3":
    rope = dict(type="yarn", rope_type="yarn", rope_theta=1e6, factor=4.0,
                original_max_position_embeddings=L0, beta_fast=32.0, beta_slow=1.0, llama_4_scaling_beta=0.1)
    rope.update(dict(mscale=1.0, mscale_all_dim=1.0) if mscale else {})
    model_cfg, cls = Ministral3Config(rope_parameters=rope, **common), Ministral3ForCausalLM
  else:
    model_cfg = MistralConfig(rope_parameters=dict(rope_type="default", rope_theta=1e6), sliding_window=None,
                              **common)
    cls = MistralForCausalLM
  torch.manual_seed(seed)
  model = cls(model_cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  return model


def random_params(cfg, seed):
  """Host numpy params of `cfg`'s shapes (faster than init_params for I/O tests)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), transformer.abstract_params(cfg))


def hf_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def our_logits(params, cfg, tokens=TOKENS):
  fwd = jax.jit(lambda p, t: transformer.Transformer(cfg).apply({"params": p}, t)[0])
  return np.asarray(fwd(params, jnp.asarray(tokens)))


def assert_close(a, b, tol=TOL):
  assert np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))) <= tol


def assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def dir_digest(path):
  """Names, contents and mtimes of every file under `path`."""
  return {str(f.relative_to(path)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
          for f in sorted(Path(path).rglob("*")) if f.is_file()}


def rewrite_tensors(file, rename=lambda n: n, add=None, drop=()):
  """Rewrites one safetensors file with renamed / extra / dropped tensors."""
  tensors = safetensors.numpy.load_file(str(file))
  tensors = {rename(k): v for k, v in tensors.items() if k not in drop}
  tensors.update(add or {})
  Path(file).unlink()
  safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})


def edit_json(file, **changes):
  d = json.loads(Path(file).read_text())
  d.update(changes)
  Path(file).write_text(json.dumps(d))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A saved untied ministral3 checkpoint (read-only: tests copy it before editing)."""
  model = make_hf_model()
  path = tmp_path_factory.mktemp("hf") / "ckpt"
  model.save_pretrained(path)
  return path


@pytest.fixture
def hf_copy(hf_dir, tmp_path):
  return Path(shutil.copytree(hf_dir, tmp_path / "copy"))


# --------------------------------------------------------------------------
# Parity with transformers.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("case", HF_CASES, ids=list(HF_CASES))
def test_hf_import_matches_transformers_logits_and_export_reloads_in_transformers(case, tmp_path):
  model_type, heads, kv, head_dim, tied, mscale = HF_CASES[case]
  model = make_hf_model(model_type, heads, kv, head_dim, tied, mscale)
  model.save_pretrained(tmp_path / "src")
  ref = hf_logits(model)

  params, cfg = hf.load_hf(tmp_path / "src")
  assert cfg.tie_embeddings == tied and ("output" in params) != tied
  assert (cfg.rope_scaling, bool(cfg.query_temperature_beta)) == (
      ("yarn", True) if model_type == "ministral3" else ("none", False))
  assert_close(our_logits(params, cfg), ref)

  sharded = model_type == "ministral3"  # also covers transformers reading our index file
  hf.save_hf(params, cfg, tmp_path / "out", max_shard_bytes=50_000 if sharded else hf.DEFAULT_MAX_SHARD_BYTES)
  assert (tmp_path / "out" / hf.INDEX_FILE).exists() == sharded
  reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert type(reloaded) is type(model)
  assert_close(hf_logits(reloaded), ref)


def test_native_save_then_load_gives_identical_params_and_config(tmp_path):
  cfg = config.preset("tiny")
  params = random_params(cfg, 1)
  native.save_native(params, cfg, tmp_path / "native")
  loaded, loaded_cfg = native.load_native(tmp_path / "native")
  assert_same_params(loaded, params)
  assert loaded_cfg == cfg


def _native_from_hf_by_spec(model, path):
  """A consolidated checkpoint written straight from the spec (not by save_native):
  per head, native row 2j = HF row j and native row 2j+1 = HF row d/2 + j."""
  c = model.config
  d = c.head_dim
  order = np.empty(d, int)
  order[0::2], order[1::2] = np.arange(d // 2), np.arange(d // 2) + d // 2

  def to_native(w, heads):
    return w.reshape(heads, d, -1)[:, order].reshape(w.shape)

  renames = {"embed_tokens": "tok_embeddings", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attention.wq",
             "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
             "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3", "lm_head": "output"}
  tensors = {}
  for name, value in model.state_dict().items():
    w = value.numpy()
    if ".q_proj." in name:
      w = to_native(w, c.num_attention_heads)
    elif ".k_proj." in name:
      w = to_native(w, c.num_key_value_heads)
    name = name.removeprefix("model.")
    for old, new in renames.items():
      name = name.replace(old, new)
    tensors[name] = np.ascontiguousarray(w)
  tensors["vision_encoder.ln_pre.weight"] = np.ones(8, np.float32)  # must be ignored
  path.mkdir()
  safetensors.numpy.save_file(tensors, str(path / "consolidated.safetensors"), metadata={"format": "pt"})
  rp = c.rope_parameters
  (path / "params.json").write_text(json.dumps(dict(
      dim=c.hidden_size, n_layers=c.num_hidden_layers, head_dim=d, hidden_dim=c.intermediate_size,
      n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, norm_eps=c.rms_norm_eps,
      vocab_size=c.vocab_size, rope_theta=rp["rope_theta"], tied_embeddings=False,
      max_position_embeddings=c.max_position_embeddings,
      yarn=dict(factor=rp["factor"], original_max_position_embeddings=L0, beta=32.0, alpha=1.0,
                apply_scale=False),
      llama_4_scaling=dict(original_max_position_embeddings=L0, beta=0.1),
      vision_encoder=dict(hidden_size=8))))


def test_native_checkpoint_from_hf_by_the_spec_permutation_gives_hf_logits(tmp_path):
  """Proves the permutation direction on import (logits) and on export (bytes)."""
  model = make_hf_model(heads=4, kv_heads=2, head_dim=32)
  _native_from_hf_by_spec(model, tmp_path / "native")
  params, cfg = native.load_native(tmp_path / "native", text_only=True)  # its vision block is a stub
  assert_close(our_logits(params, cfg), hf_logits(model))
  native.save_native(params, cfg, tmp_path / "again")
  ours = safetensors.numpy.load_file(str(tmp_path / "again" / "consolidated.safetensors"))
  spec = safetensors.numpy.load_file(str(tmp_path / "native" / "consolidated.safetensors"))
  for name in ("layers.0.attention.wq.weight", "layers.1.attention.wk.weight"):
    np.testing.assert_array_equal(ours[name], spec[name])


# --------------------------------------------------------------------------
# Formats, shards, dtypes, prefixes.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["hf", "native"])
def test_sharded_save_and_load_round_trip_preserves_params(fmt, tmp_path):
  save, load, pattern = ((hf.save_hf, hf.load_hf, "model-*-of-*.safetensors") if fmt == "hf"
                         else (native.save_native, native.load_native, "consolidated-*-of-*.safetensors"))
  cfg = config.preset("tiny_tied")
  params = random_params(cfg, 2)
  save(params, cfg, tmp_path / "ckpt", max_shard_bytes=60_000)
  shards = sorted((tmp_path / "ckpt").glob(pattern))
  assert len(shards) > 2 and all(f.stat().st_size < 60_000 + 10_000 for f in shards[1:])
  loaded, loaded_cfg = load(tmp_path / "ckpt")
  assert_same_params(loaded, params)
  assert safetensors_io.relevant_arch(loaded_cfg) == safetensors_io.relevant_arch(cfg)


def test_bf16_checkpoint_keeps_its_dtype_or_casts_when_asked(tmp_path):
  model = make_hf_model().to(torch.bfloat16)
  model.save_pretrained(tmp_path / "bf16")
  params, cfg = hf.load_hf(tmp_path / "bf16")
  assert cfg.param_dtype == "bfloat16"
  assert {np.asarray(x).dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
  params32, cfg32 = hf.load_hf(tmp_path / "bf16", dtype="float32")
  assert cfg32.param_dtype == "float32"
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params32)):
    assert y.dtype == np.float32
    np.testing.assert_array_equal(x.astype(np.float32), y)
  assert_close(our_logits(params32, cfg32), hf_logits(model.float()))


@pytest.mark.parametrize("prefix,lm_head,vision", [
    ("model.language_model.", "lm_head.weight", "model.vision_tower.ln_pre.weight"),
    ("language_model.model.", "language_model.lm_head.weight", "vision_tower.ln_pre.weight"),
])
def test_multimodal_checkpoint_loads_text_weights_and_skips_vision(prefix, lm_head, vision, hf_dir, hf_copy):
  rename = lambda n: lm_head if n == "lm_head.weight" else prefix + n.removeprefix("model.")  # noqa: E731
  rewrite_tensors(hf_copy / "model.safetensors", rename,
                  add={vision: np.ones(8, np.float32),
                       "multi_modal_projector.linear_1.weight": np.ones((2, 2), np.float32)})
  text = json.loads((hf_dir / "config.json").read_text())
  (hf_copy / "config.json").write_text(json.dumps(
      {"model_type": "mistral3", "text_config": text, "vision_config": {"model_type": "pixtral"}}))
  params, cfg = hf.load_hf(hf_copy, text_only=True)  # the stub vision_config (a GELU ViT) is not even read
  expected, expected_cfg = hf.load_hf(hf_dir)
  assert_same_params(params, expected)
  assert cfg == expected_cfg


def test_load_with_shardings_puts_each_leaf_on_its_sharding(hf_dir):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  by_vocab = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", None))
  _, cfg = hf.load_hf(hf_dir)
  shardings = jax.tree.map(lambda _: replicated, transformer.abstract_params(cfg))
  shardings["tok_embeddings"] = by_vocab
  params, _ = hf.load_hf(hf_dir, shardings=shardings)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
  assert params["tok_embeddings"].sharding == by_vocab
  assert params["layers"]["attention"]["wq"].sharding == replicated


def test_given_config_must_agree_and_keeps_its_execution_fields(hf_dir):
  _, found = hf.load_hf(hf_dir)
  _, cfg = hf.load_hf(hf_dir, cfg=found.replace(scan_layers=False, remat_policy="full"))
  assert (cfg.scan_layers, cfg.remat_policy) == (False, "full")
  with pytest.raises(ValueError, match="d_ffn: given 96, checkpoint 128"):
    hf.load_hf(hf_dir, cfg=found.replace(d_ffn=96))


@pytest.mark.parametrize("preset", ["tiny", "tiny_tied", "mistral_small_3_1_24b", "ministral3_14b"])
def test_config_round_trips_through_hf_and_params_json(preset):
  cfg = config.preset(preset)
  via_hf = hf.config_from_hf(hf.config_to_hf(cfg))
  via_native = native.config_from_params_json(native.config_to_params_json(cfg))
  for other in (via_hf, via_native):
    assert safetensors_io.relevant_arch(other) == safetensors_io.relevant_arch(cfg)


@pytest.mark.parametrize("model_type,cls,extra", [
    ("ministral3", Ministral3Config, {}), ("mistral", MistralConfig, dict(sliding_window=None))])
def test_absent_hf_config_keys_take_the_transformers_class_defaults(model_type, cls, extra):
  minimal = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FFN, num_hidden_layers=LAYERS,
                 num_attention_heads=8, **extra)
  ours = hf.config_from_hf(dict(model_type=model_type, **minimal))
  assert ours == hf.config_from_hf(cls(**minimal).to_dict())


# --------------------------------------------------------------------------
# Bad input fails early with a precise message.
# --------------------------------------------------------------------------
def test_tensor_shape_disagreeing_with_config_raises_naming_the_tensor(hf_copy):
  edit_json(hf_copy / "config.json", intermediate_size=96)
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[128, 64\] "
                                       r"but the config implies \[96, 64\]"):
    hf.load_hf(hf_copy)


def test_missing_shard_file_raises_naming_the_file(hf_dir, tmp_path):
  params, cfg = hf.load_hf(hf_dir)
  hf.save_hf(params, cfg, tmp_path / "ckpt", max_shard_bytes=50_000)
  victim = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(FileNotFoundError, match=victim.name):
    hf.load_hf(tmp_path / "ckpt")


def test_missing_and_unexpected_tensors_are_listed(hf_copy):
  rewrite_tensors(hf_copy / "model.safetensors", drop={"model.layers.1.mlp.up_proj.weight"},
                  add={"model.layers.0.self_attn.q_norm.weight": np.ones(4, np.float32)})
  with pytest.raises(ValueError, match=r"(?s)missing: model\.layers\.1\.mlp\.up_proj\.weight.*"
                                       r"unexpected: model\.layers\.0\.self_attn\.q_norm\.weight"):
    hf.load_hf(hf_copy)


def test_untied_config_without_lm_head_raises(hf_copy):
  rewrite_tensors(hf_copy / "model.safetensors", drop={"lm_head.weight"})
  with pytest.raises(ValueError, match="not tied.*lm_head.weight"):
    hf.load_hf(hf_copy)


def test_missing_config_json_raises(hf_copy):
  (hf_copy / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_hf(hf_copy)


@pytest.mark.parametrize("changes,message", [
    (dict(model_type="llama"), "Unsupported model_type 'llama'"),
    (dict(model_type="mistral", sliding_window=4096), "sliding-window attention is not supported"),
    (dict(model_type="mistral", sliding_window="absent"), "default for 'mistral'.*is 4096"),
    (dict(quantization_config={"quant_method": "fp8"}), "FP8"),
    (dict(model_type="mistral3", text_config={}, quantization_config={"quant_method": "fp8"}), "FP8"),
])
def test_unsupported_hf_configs_raise_clear_errors(changes, message):
  d = hf.config_to_hf(config.preset("tiny"))
  d.update(changes)
  if d.get("sliding_window") == "absent":
    del d["sliding_window"]
  with pytest.raises(ValueError, match=message):
    hf.config_from_hf(d)


def test_save_refuses_a_non_empty_destination_unless_overwrite(hf_dir, tmp_path):
  params, cfg = hf.load_hf(hf_dir)
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "precious.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    hf.save_hf(params, cfg, dst)
  assert [f.name for f in dst.iterdir()] == ["precious.txt"]
  hf.save_hf(params, cfg, dst, overwrite=True)
  assert sorted(f.name for f in dst.iterdir()) == ["config.json", "model.safetensors"]
  assert [p.name for p in tmp_path.iterdir()] == ["dst"]  # no temporary siblings left


def test_import_does_not_modify_the_source_directory(hf_dir):
  before = dir_digest(hf_dir)
  hf.load_hf(hf_dir)
  hf.load_hf(hf_dir, dtype="bfloat16")
  assert dir_digest(hf_dir) == before


def test_convert_cli_round_trips_hf_native_orbax_hf(hf_dir, tmp_path):
  steps = [("hf", "native", hf_dir, tmp_path / "native"),
           ("native", "orbax", tmp_path / "native", tmp_path / "orbax"),
           ("orbax", "hf", tmp_path / "orbax", tmp_path / "hf")]
  for src_fmt, dst_fmt, src, dst in steps:
    convert.main([f"--from={src_fmt}", f"--to={dst_fmt}", f"--src={src}", f"--dst={dst}"])
  params, cfg = hf.load_hf(tmp_path / "hf")
  expected, expected_cfg = hf.load_hf(hf_dir)
  assert_same_params(params, expected)
  assert cfg == expected_cfg
  convert.main(["--from=hf", "--to=hf", f"--src={hf_dir}", f"--dst={tmp_path / 'bf16'}", "--dtype=bfloat16"])
  assert hf.load_hf(tmp_path / "bf16")[1].param_dtype == "bfloat16"
