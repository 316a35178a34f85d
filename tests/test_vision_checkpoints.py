"""Multimodal checkpoints: HF Mistral3ForConditionalGeneration and Mistral-native (`vision_encoder`) import and
export of the Pixtral ViT + projector, logits parity with transformers, the native q/k interleave per vision
head, text-only loads of multimodal checkpoints, and bad input.

The models are `vision_fixtures`' tiny random ones (fp32, CPU); one token row holds two images of different
sizes around text, so per-image attention, 2D RoPE, the patch merger and the `[IMG]` scatter all count.
"""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import Mistral3ForConditionalGeneration

import vision_fixtures as vf
from test_checkpoint_multihost import assert_block_readers_exact
from test_hf_parity import assert_close, assert_same_params
from ministral_jax import sharding
from ministral_jax.checkpoint import convert, hf, native, safetensors_io
from ministral_jax.errors import UserError
from ministral_jax.model import config, transformer, vision

IMAGES = vf.images()  # 16x24 and 8x8 pixels: 6 + 1 [IMG] tokens
V5_ROOTS = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head.weight")


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------
def token_row(images=IMAGES):
  """Text, image 1, text, image 2, text: one batch row."""
  row = [1, 5, 7] + vf.image_layout(images[0]) + [20, 21] + vf.image_layout(images[1]) + [30, 31, 32]
  return np.array([row], np.int32)


def our_logits(params, cfg, images=IMAGES):
  patches = sum(im.shape[1] * im.shape[2] for im in images) // vf.PATCH ** 2
  slots = -(-(patches + 1) // 4) * 4  # at least one padding slot
  packed = vision.pack_images([images], slots, vf.PATCH)
  logits, _ = transformer.Transformer(cfg).apply({"params": params}, token_row(images), images=packed)
  return np.asarray(logits)


def hf_logits(model, images=IMAGES):
  pixels, sizes = vf.hf_pixel_batch(images)
  with torch.no_grad():
    return model(input_ids=torch.tensor(token_row(images), dtype=torch.long), pixel_values=pixels,
                 image_sizes=sizes).logits.float().numpy()


def random_params(cfg, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), transformer.abstract_params(cfg))


def tensor_names(path):
  names = []
  for f in sorted(Path(path).glob("*.safetensors")):
    names += safetensors.numpy.load_file(str(f)).keys()
  return set(names)


def rewrite_tensors(file, rename=lambda n: n, drop=()):
  tensors = {rename(k): v for k, v in safetensors.numpy.load_file(str(file)).items() if k not in drop}
  Path(file).unlink()
  safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})


def edit_json(file, edit):
  d = json.loads(Path(file).read_text())
  edit(d)
  Path(file).write_text(json.dumps(d))


def interleave_by_spec(w, heads):
  """HF rows -> native rows, per head: native row 2j = HF row j, native row 2j+1 = HF row d/2 + j."""
  d = w.shape[0] // heads
  order = np.empty(d, int)
  order[0::2], order[1::2] = np.arange(d // 2), np.arange(d // 2) + d // 2
  return w.reshape(heads, d, -1)[:, order].reshape(w.shape)


@pytest.fixture(scope="module")
def hf_model():
  return vf.make_hf_model()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
  """What transformers' save_pretrained writes (read-only: tests copy it before editing)."""
  path = tmp_path_factory.mktemp("hf") / "ckpt"
  hf_model.save_pretrained(path)
  return path


@pytest.fixture
def hf_copy(hf_dir, tmp_path):
  return Path(shutil.copytree(hf_dir, tmp_path / "copy"))


@pytest.fixture(scope="module")
def loaded(hf_dir):
  return hf.load_hf(hf_dir)


# --------------------------------------------------------------------------
# Parity with transformers.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)], ids=["untied", "tied-projector_bias"])
def test_hf_multimodal_import_matches_transformers_logits_and_export_reloads_in_transformers(tied, bias, tmp_path):
  model = vf.make_hf_model(tied=tied, projector_bias=bias)
  model.save_pretrained(tmp_path / "src")
  ref = hf_logits(model)

  params, cfg = hf.load_hf(tmp_path / "src")
  assert cfg == vf.our_config(tie_embeddings=tied, projector_bias=bias)
  assert ("b_in" in params["projector"]) == bias and ("output" in params) != tied
  assert_close(our_logits(params, cfg), ref)

  sharded = not tied  # also covers transformers reading our index file
  hf.save_hf(params, cfg, tmp_path / "out", max_shard_bytes=100_000 if sharded else hf.DEFAULT_MAX_SHARD_BYTES)
  assert (tmp_path / "out" / hf.INDEX_FILE).exists() == sharded
  assert all(n.startswith(V5_ROOTS) for n in tensor_names(tmp_path / "out"))
  assert len(tensor_names(tmp_path / "out")) == len(model.state_dict()) - tied  # a tied lm_head is not stored
  reloaded = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  assert reloaded.config.vision_config.hidden_act == "silu" and reloaded.config.image_token_id == vf.IMG
  assert_close(hf_logits(reloaded), ref)


def test_vision_model_over_plain_rope_exports_as_mistral3_with_a_mistral_text_config(tmp_path):
  cfg = vf.our_config(rope_scaling="none", query_temperature_beta=0.0, projector_bias=True)
  params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(3)))
  params["projector"]["b_in"] = np.full_like(params["projector"]["b_in"], 0.1)
  hf.save_hf(params, cfg, tmp_path / "out")
  written = json.loads((tmp_path / "out" / hf.CONFIG_FILE).read_text())
  assert (written["model_type"], written["text_config"]["model_type"]) == ("mistral3", "mistral")
  reloaded = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  assert_close(hf_logits(reloaded), our_logits(params, cfg))
  assert_same_params(hf.load_hf(tmp_path / "out")[0], params)


def test_both_hf_prefix_spellings_load_the_same_params(hf_dir, hf_copy, loaded):
  """transformers 5 writes the older spelling to disk; the v5 (in-memory) spelling loads the same."""
  assert {"vision_tower.patch_conv.weight", "language_model.lm_head.weight"} <= tensor_names(hf_dir)

  def to_v5(name):
    if name == "language_model.lm_head.weight":
      return "lm_head.weight"
    if name.startswith("language_model.model."):
      return "model.language_model." + name.removeprefix("language_model.model.")
    return "model." + name
  rewrite_tensors(hf_copy / "model.safetensors", to_v5)
  assert all(n.startswith(V5_ROOTS) for n in tensor_names(hf_copy))
  params, cfg = hf.load_hf(hf_copy)
  assert_same_params(params, loaded[0])
  assert cfg == loaded[1]


# --------------------------------------------------------------------------
# Mistral-native layout.
# --------------------------------------------------------------------------
def _native_from_hf_by_spec(model, path):
  """A consolidated checkpoint written straight from the spec (§4.1-4.6), not by save_native."""
  c, v = model.config.text_config, model.config.vision_config
  renames = [  # (HF prefix or infix, native), applied in order
      ("model.language_model.", ""), ("lm_head.weight", "output.weight"),
      ("model.vision_tower.", "vision_encoder."),
      ("model.multi_modal_projector.norm.", "pre_mm_projector_norm."),
      ("model.multi_modal_projector.patch_merger.", "patch_merger."),
      ("model.multi_modal_projector.linear_1.", "vision_language_adapter.w_in."),
      ("model.multi_modal_projector.linear_2.", "vision_language_adapter.w_out."),
      ("embed_tokens", "tok_embeddings"), ("input_layernorm", "attention_norm"),
      ("post_attention_layernorm", "ffn_norm"), ("self_attn.", "attention."), ("mlp.", "feed_forward."),
      ("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo"),
      ("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")]
  tensors = {}
  for name, value in model.state_dict().items():
    w = value.numpy()
    heads = ((v.num_attention_heads, v.num_attention_heads) if "vision_tower" in name
             else (c.num_attention_heads, c.num_key_value_heads))
    if ".q_proj." in name:
      w = interleave_by_spec(w, heads[0])
    elif ".k_proj." in name:
      w = interleave_by_spec(w, heads[1])
    for old, new in renames:
      name = name.replace(old, new)
    tensors[name] = np.ascontiguousarray(w)
  path.mkdir()
  safetensors.numpy.save_file(tensors, str(path / "consolidated.safetensors"), metadata={"format": "pt"})
  rp = c.rope_parameters
  (path / "params.json").write_text(json.dumps(dict(
      dim=c.hidden_size, n_layers=c.num_hidden_layers, head_dim=c.head_dim, hidden_dim=c.intermediate_size,
      n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, norm_eps=c.rms_norm_eps,
      vocab_size=c.vocab_size, rope_theta=rp["rope_theta"], tied_embeddings=False,
      max_position_embeddings=c.max_position_embeddings,
      yarn=dict(factor=rp["factor"], original_max_position_embeddings=vf.L0, beta=32.0, alpha=1.0,
                apply_scale=False),
      llama_4_scaling=dict(original_max_position_embeddings=vf.L0, beta=0.1),
      vision_encoder=dict(hidden_size=v.hidden_size, num_channels=3, image_size=v.image_size,
                          max_image_size=v.image_size, patch_size=v.patch_size,
                          intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                          num_attention_heads=v.num_attention_heads, rope_theta=10000.0, image_token_id=vf.IMG,
                          image_break_token_id=vf.BREAK, image_end_token_id=vf.END, spatial_merge_size=2,
                          adapter_bias=False, add_pre_mm_projector_layer_norm=True, mm_projector_id="patch_merge"))))
  return tensors


def test_native_checkpoint_written_by_the_spec_gives_transformers_logits(hf_model, loaded, tmp_path):
  """Proves the vision q/k permutation's direction on import (logits) and on export (bytes)."""
  spec = _native_from_hf_by_spec(hf_model, tmp_path / "native")
  params, cfg = native.load_native(tmp_path / "native")
  assert cfg == loaded[1]
  assert_same_params(params, loaded[0])
  assert_close(our_logits(params, cfg), hf_logits(hf_model))
  native.save_native(params, cfg, tmp_path / "again")
  ours = safetensors.numpy.load_file(str(tmp_path / "again" / "consolidated.safetensors"))
  assert set(ours) == set(spec)
  for name in spec:
    np.testing.assert_array_equal(ours[name], spec[name], err_msg=name)


def test_native_round_trip_is_bitwise_and_vision_qk_rows_are_the_interleave_of_ours(loaded, tmp_path):
  params, cfg = loaded
  native.save_native(params, cfg, tmp_path / "native", max_shard_bytes=100_000)
  back, back_cfg = native.load_native(tmp_path / "native")
  assert_same_params(back, params)
  assert back_cfg == cfg
  stored = {}
  for f in sorted((tmp_path / "native").glob("consolidated-*.safetensors")):
    stored.update(safetensors.numpy.load_file(str(f)))
  attention = params["vision_encoder"]["layers"]["attention"]
  hd = vf.V_D // vf.V_HEADS
  for i in range(vf.V_LAYERS):
    for key in ("wq", "wk"):
      ours_rows = np.asarray(attention[key][i]).reshape(vf.V_D, vf.V_HEADS * hd).T  # HF (rotate-half) rows
      np.testing.assert_array_equal(stored[f"vision_encoder.transformer.layers.{i}.attention.{key}.weight"],
                                    interleave_by_spec(ours_rows, vf.V_HEADS))
    np.testing.assert_array_equal(stored[f"vision_encoder.transformer.layers.{i}.attention.wv.weight"],
                                  np.asarray(attention["wv"][i]).reshape(vf.V_D, -1).T)
  block = json.loads((tmp_path / "native" / "params.json").read_text())["vision_encoder"]
  assert block == dict(hidden_size=vf.V_D, num_channels=3, image_size=64, max_image_size=64, patch_size=vf.PATCH,
                       intermediate_size=vf.V_FFN, num_hidden_layers=vf.V_LAYERS, num_attention_heads=vf.V_HEADS,
                       rope_theta=10000.0, image_token_id=vf.IMG, image_break_token_id=vf.BREAK,
                       image_end_token_id=vf.END, spatial_merge_size=2, adapter_bias=False,
                       add_pre_mm_projector_layer_norm=True, mm_projector_id="patch_merge")


@pytest.mark.parametrize("preset", ["ministral3", "mistral-text-bias-ids"])
def test_vision_config_round_trips_through_hf_and_params_json(preset):
  cfg = vf.our_config() if preset == "ministral3" else vf.our_config(
      rope_scaling="none", query_temperature_beta=0.0, tie_embeddings=True, projector_bias=True,
      vision_rope_theta=5000.0, image_token_id=5, image_break_id=6, image_end_id=7, spatial_merge_size=2)
  for back in (hf.config_from_hf(hf.config_to_hf(cfg)),
               native.config_from_params_json(native.config_to_params_json(cfg))):
    assert safetensors_io.relevant_arch(back) == safetensors_io.relevant_arch(cfg)
  text = safetensors_io.text_only_config(cfg)
  assert hf.config_from_hf(hf.config_to_hf(cfg), text_only=True) == hf.config_from_hf(hf.config_to_hf(text))
  assert (native.config_from_params_json(native.config_to_params_json(cfg), text_only=True)
          == native.config_from_params_json(native.config_to_params_json(text)))


# --------------------------------------------------------------------------
# Text-only loads of multimodal checkpoints.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["hf", "native"])
def test_text_only_load_of_a_multimodal_checkpoint_equals_a_text_only_export_of_its_decoder(fmt, loaded, tmp_path):
  save, load = (hf.save_hf, hf.load_hf) if fmt == "hf" else (native.save_native, native.load_native)
  params, cfg = loaded
  save(params, cfg, tmp_path / "mm")
  text_params, text_cfg = load(tmp_path / "mm", text_only=True)
  assert set(text_params) == {"tok_embeddings", "layers", "norm", "output"} and text_cfg.vision_layers == 0

  save(safetensors_io.text_only_params(params), safetensors_io.text_only_config(cfg), tmp_path / "text")
  expected, expected_cfg = load(tmp_path / "text")
  assert_same_params(text_params, expected)
  assert text_cfg == expected_cfg == safetensors_io.text_only_config(cfg)


def test_a_text_model_job_loads_the_decoder_of_a_multimodal_checkpoint_but_load_hf_asks_for_text_only(
    hf_dir, loaded):
  text_cfg = safetensors_io.text_only_config(loaded[1]).replace(scan_layers=False)
  with pytest.raises(UserError, match=r"(?s)vision_layers: given None, checkpoint 2.*text_only=True"):
    hf.load_hf(hf_dir, cfg=text_cfg)
  params, cfg = convert.load_any(str(hf_dir), cfg=text_cfg)  # a text model's job: its decoder, as before
  assert cfg == text_cfg and "vision_encoder" not in params
  assert_same_params(params, safetensors_io.text_only_params(loaded[0]))
  params, cfg = convert.load_any(str(hf_dir))
  assert cfg == loaded[1] and "vision_encoder" in params

  fsdp = sharding.Partitioner.from_config(dict(fsdp=8))
  for model_cfg in (text_cfg, loaded[1]):
    for allow_rope_change in (False, True):
      params, cfg = convert.load_or_init(str(hf_dir), model_cfg, fsdp, seed=0, allow_rope_change=allow_rope_change)
      assert cfg == model_cfg and ("vision_encoder" in params) == bool(model_cfg.vision_layers)


def test_convert_cli_round_trips_a_multimodal_model_through_native_and_orbax_and_text_only_drops_vision(
    hf_dir, loaded, tmp_path):
  steps = [("hf", "native", hf_dir, tmp_path / "native"),
           ("native", "orbax", tmp_path / "native", tmp_path / "orbax"),
           ("orbax", "hf", tmp_path / "orbax", tmp_path / "hf")]
  for src_fmt, dst_fmt, src, dst in steps:
    convert.main([f"--from={src_fmt}", f"--to={dst_fmt}", f"--src={src}", f"--dst={dst}"])
  params, cfg = hf.load_hf(tmp_path / "hf")
  assert_same_params(params, loaded[0])
  assert cfg == loaded[1]
  assert convert.load_config_any(str(tmp_path / "orbax")) == loaded[1]

  for src_fmt, src in (("hf", hf_dir), ("orbax", tmp_path / "orbax")):
    dst = tmp_path / f"text_from_{src_fmt}"
    convert.main([f"--from={src_fmt}", "--to=hf", f"--src={src}", f"--dst={dst}", "--text_only"])
    written = json.loads((dst / hf.CONFIG_FILE).read_text())
    assert written["model_type"] == "ministral3" and "vision_config" not in written
    assert not any("vision" in n or "projector" in n for n in tensor_names(dst))
    text_params, text_cfg = hf.load_hf(dst)
    assert_same_params(text_params, safetensors_io.text_only_params(loaded[0]))
    assert text_cfg == safetensors_io.text_only_config(loaded[1])
  text_cfg = safetensors_io.text_only_config(loaded[1])
  params, cfg = convert.load_any(str(tmp_path / "orbax"), cfg=text_cfg)
  assert cfg == text_cfg and set(params) == {"tok_embeddings", "layers", "norm", "output"}


# --------------------------------------------------------------------------
# Streaming and sharded reads cover the vision tensors.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["hf", "native"])
def test_each_vision_block_reader_reads_exactly_the_block_of_the_converted_tensor(fmt):
  """Every split of every dimension, as a sharded load asks for them."""
  cfg = vf.our_config(projector_bias=True)
  maps = (safetensors_io.vision_maps(cfg, hf.hf_vision_names()) if fmt == "hf" else safetensors_io.vision_maps(
      cfg, native.native_vision_names(), native.interleaved_to_half, native.half_to_interleaved))
  assert {m.leaf for m in maps} == {path for path, _ in _vision_leaves(cfg)}
  rng = np.random.default_rng(1)
  for m in maps:  # to_theirs inverts to_ours
    theirs = rng.standard_normal(m.shape).astype(np.float32)
    np.testing.assert_array_equal(m.to_theirs(m.to_ours(theirs)), theirs)
  assert_block_readers_exact(maps)


def _vision_leaves(cfg):
  """(leaf path, shape) of every vision / projector param (without the leading layers axis)."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(transformer.abstract_params(cfg))[0]:
    keys = tuple(k.key for k in path)
    if keys[0] in safetensors_io.VISION_PARAMS:
      out.append((keys, leaf.shape))
  return out


def test_sharded_load_reads_every_vision_byte_once_and_equals_the_host_load(hf_dir, loaded):
  total = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
  fsdp = sharding.Partitioner.from_config(dict(fsdp=8))
  before = safetensors_io.bytes_read()
  sharded, _ = hf.load_hf(hf_dir, shardings=fsdp.param_shardings)
  read = safetensors_io.bytes_read() - before
  assert total - 10_000 < read <= total  # every tensor byte once (the file also holds its header)
  assert sharded["vision_encoder"]["patch_conv"].sharding == fsdp.param_shardings(loaded[1])["vision_encoder"][
      "patch_conv"]
  assert_same_params(jax.tree.map(np.asarray, sharded), loaded[0])


# --------------------------------------------------------------------------
# Bad input: one clear error each, before any weight is read.
# --------------------------------------------------------------------------
def test_vision_tensor_shape_disagreeing_with_the_config_is_one_error_naming_it_before_any_read(hf_copy):
  edit_json(hf_copy / "config.json", lambda d: d["vision_config"].update(intermediate_size=48))
  before = safetensors_io.bytes_read()
  with pytest.raises(UserError, match=r"'vision_tower\.transformer\.layers\.0\.feed_forward\.gate_proj\.weight' "
                                      r"has shape \[64, 32\] but the config implies \[48, 32\]"):
    hf.load_hf(hf_copy)
  assert safetensors_io.bytes_read() == before


def test_missing_vision_tensor_is_named_and_the_error_suggests_text_only(hf_copy, loaded):
  victim = "vision_tower.transformer.layers.1.attention.q_proj.weight"
  rewrite_tensors(hf_copy / "model.safetensors", drop={victim})
  with pytest.raises(UserError, match=rf"(?s)missing: {victim.replace('.', '[.]')}.*text_only=True"):
    hf.load_hf(hf_copy)
  assert_same_params(hf.load_hf(hf_copy, text_only=True)[0], safetensors_io.text_only_params(loaded[0]))


def test_gelu_vision_encoder_is_a_clear_error_and_its_checkpoint_still_loads_text_only(hf_copy, loaded):
  edit_json(hf_copy / "config.json", lambda d: d["vision_config"].update(hidden_act="gelu"))
  with pytest.raises(UserError, match=r"hidden_act='gelu'.*Pixtral-12B.*text_only=True"):
    hf.load_hf(hf_copy)
  params, cfg = hf.load_hf(hf_copy, text_only=True)
  assert cfg == safetensors_io.text_only_config(loaded[1])
  assert_same_params(params, safetensors_io.text_only_params(loaded[0]))


def _hf_edit(vision=None, **top):
  def edit(d):
    d.update(top)
    d["vision_config"].update(vision or {})
    for key, value in list(d["vision_config"].items()):
      if value is None:
        del d["vision_config"][key]
  return edit


@pytest.mark.parametrize("edit,message", [
    (_hf_edit(vision=dict(num_channels=1)), r"num_channels=1: the vision encoder reads RGB images \(3\)"),
    (_hf_edit(vision=dict(hidden_act=None)), r"hidden_act='gelu' \(transformers' default when absent\)"),
    (lambda d: d.pop("vision_config"), r"hidden_act='gelu' \(transformers' default"),
    (_hf_edit(vision=dict(head_dim=8)), r"head_dim=8, but the ViT's head_dim is .* = 16"),
    (_hf_edit(vision=dict(model_type="siglip_vision_model")), r"model_type='siglip_vision_model'"),
    (_hf_edit(vision=dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4))), r"rope_type='yarn'"),
    (_hf_edit(projector_hidden_act="relu"), r"projector_hidden_act='relu'"),
    (_hf_edit(vision_feature_layer=-2), r"vision_feature_layer=-2"),
    (_hf_edit(spatial_merge_size="2"), r"spatial_merge_size=\"2\" is a str"),
], ids=["channels", "default-gelu", "absent-vision-config", "head_dim", "not-pixtral", "rope", "projector-act",
        "feature-layer", "type"])
def test_unsupported_multimodal_hf_configs_raise_one_clear_error(edit, message, loaded):
  d = hf.config_to_hf(loaded[1])
  edit(d)
  with pytest.raises(UserError, match=message):
    hf.config_from_hf(d)


@pytest.mark.parametrize("changes,message", [
    (dict(add_pre_mm_projector_layer_norm=False), "add_pre_mm_projector_layer_norm is False.*Pixtral-12B"),
    (dict(add_pre_mm_projector_layer_norm=None), "add_pre_mm_projector_layer_norm is absent"),
    (dict(mm_projector_id="mlp"), "mm_projector_id='mlp'"),
    (dict(num_channels=4), "num_channels=4"),
    (dict(spatial_merge_size=None), r"lacks required field\(s\) \['spatial_merge_size'\].*text_only=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_unsupported_native_vision_encoder_blocks_raise_one_clear_error(changes, message, loaded):
  d = native.config_to_params_json(loaded[1])
  d["vision_encoder"].update(changes)
  d["vision_encoder"] = {k: v for k, v in d["vision_encoder"].items() if v is not None}
  with pytest.raises(UserError, match=message):
    native.config_from_params_json(d)
  assert native.config_from_params_json(d, text_only=True) == safetensors_io.text_only_config(
      native.config_from_params_json(native.config_to_params_json(loaded[1])))


# --------------------------------------------------------------------------
# Text-only exports are what they were before vision existed.
# --------------------------------------------------------------------------
# Per file: sha256 (16 hex digits) of a JSON file, or of a shard's tensor names in file order and of its data
# bytes (independent of how the safetensors library lays out its header). Recorded with the exporters as they
# were before multimodal support; a change here changes every text-only checkpoint written from now on.
TEXT_ONLY_EXPORTS = {
    ("tiny", "hf"): {
        "config.json": "9f685de01d1034b1",
        "model-00001-of-00003.safetensors": ("b9875de92e25e77b", "97cb48d70b480c29"),
        "model-00002-of-00003.safetensors": ("a7322df239824e7a", "73c8c527182f6b0f"),
        "model-00003-of-00003.safetensors": ("7866b85ef9fdbeac", "80eda7e8e761a4cc"),
        "model.safetensors.index.json": "5a5adec8dc49f894"},
    ("tiny", "native"): {
        "consolidated-00001-of-00003.safetensors": ("9c6ebc114579375d", "52a6d6ec1c042a7b"),
        "consolidated-00002-of-00003.safetensors": ("739176180f93c775", "efbeaa19ea42c477"),
        "consolidated-00003-of-00003.safetensors": ("1d5d2a624e630eb5", "80eda7e8e761a4cc"),
        "params.json": "47b33c4b89505953"},
    ("tiny_tied", "hf"): {
        "config.json": "8653fd49e326f465",
        "model-00001-of-00002.safetensors": ("b9875de92e25e77b", "f00f93a929cdca93"),
        "model-00002-of-00002.safetensors": ("a7322df239824e7a", "73c8c527182f6b0f"),
        "model.safetensors.index.json": "aacebfaa60219ae7"},
    ("tiny_tied", "native"): {
        "consolidated-00001-of-00002.safetensors": ("9c6ebc114579375d", "8c3c1a627935d37f"),
        "consolidated-00002-of-00002.safetensors": ("739176180f93c775", "efbeaa19ea42c477"),
        "params.json": "d456737d21ff14ee"},
}


def _export_fingerprint(path):
  out = {}
  for f in sorted(Path(path).iterdir()):
    raw = f.read_bytes()
    if f.suffix == ".safetensors":
      size = struct.unpack("<Q", raw[:8])[0]
      header = json.loads(raw[8:8 + size])
      header.pop("__metadata__", None)
      names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
      out[f.name] = (hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],
                     hashlib.sha256(raw[8 + size:]).hexdigest()[:16])
    else:
      out[f.name] = hashlib.sha256(raw).hexdigest()[:16]
  return out


@pytest.mark.parametrize("preset,fmt", list(TEXT_ONLY_EXPORTS), ids=["-".join(k) for k in TEXT_ONLY_EXPORTS])
def test_text_only_exports_keep_their_exact_config_tensor_names_order_and_bytes(preset, fmt, tmp_path):
  cfg = config.preset(preset)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), transformer.abstract_params(cfg))
  (hf.save_hf if fmt == "hf" else native.save_native)(params, cfg, tmp_path / "out", max_shard_bytes=300_000)
  assert _export_fingerprint(tmp_path / "out") == TEXT_ONLY_EXPORTS[(preset, fmt)]
