"""The Pixtral ViT, the projector and image inputs end to end, against transformers' Mistral3ForConditionalGeneration
(tiny random model, torch CPU, fp32), plus the frozen ViT, pruning the projector and real-size compiles.

Tolerance: 1e-4 absolute on outputs of magnitude ~1 (fp32 on both sides; measured ~1e-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import vision_fixtures as vf
from ministral_jax import sharding
from ministral_jax.checkpoint import hf
from ministral_jax.errors import UserError
from ministral_jax.model import abstract, config, transformer, vision
from ministral_jax.prune import pruner, rewrite
from ministral_jax.sample import sampler
from ministral_jax.train import optimizer

SLOTS = 32  # patch buffer of the two test images (16x24: 24 patches, 8x8: 4) plus padding


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """The HF model, and our params imported from its save_pretrained directory."""
  model = vf.make_hf_model()
  path = tmp_path_factory.mktemp("mistral3")
  model.save_pretrained(path)
  params, cfg = hf.load_hf(path)
  return model, jax.tree.map(jnp.asarray, params), cfg


def _apply(cfg, params, *args, **kwargs):
  return transformer.Transformer(cfg).apply({"params": params}, *args, **kwargs)


def _hf_order(images: vision.Images, pixels: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
  """(our slots, HF's row-major indices into its concatenated sequence) for each image."""
  ids, rows, cols = (np.asarray(x[0]) for x in (images.image_ids, images.rows, images.cols))
  pairs, offset = [], 0
  for k, p in enumerate(pixels):
    ours = np.where(ids == k)[0]
    pairs.append((ours, offset + rows[ours] * (p.shape[2] // vf.PATCH) + cols[ours]))
    offset += len(ours)
  return pairs


def _prompt(pixels):
  return [1, 5, 6] + sum((vf.image_layout(p) for p in pixels), []) + [7, 8, 9]


def test_vit_matches_transformers_for_two_images_of_different_sizes_in_one_batch(imported):
  model, params, cfg = imported
  pixels = vf.images()
  images = vision.pack_images([pixels], SLOTS, vf.PATCH)
  ours = np.asarray(_apply(cfg, params, images, method=lambda m, x: m.vision_encoder(x)))[0]
  with torch.no_grad():
    theirs = model.model.vision_tower(*vf.hf_pixel_batch(pixels)).last_hidden_state[0].numpy()
  for slots, hf_index in _hf_order(images, pixels):
    np.testing.assert_allclose(ours[slots], theirs[hf_index], atol=vf.TOL, rtol=0)


def test_projector_outputs_match_transformers_image_features(imported):
  model, params, cfg = imported
  pixels = vf.images()
  ours = np.asarray(_apply(cfg, params, vision.pack_images([pixels], SLOTS, vf.PATCH),
                           method=lambda m, x: m.image_features(x)))[0]
  with torch.no_grad():
    theirs = torch.cat(model.model.get_image_features(*vf.hf_pixel_batch(pixels)).pooler_output).numpy()
  assert theirs.shape == (6 + 1, vf.D_MODEL)  # 16x24 -> 2x3 merged tokens, 8x8 -> 1
  np.testing.assert_allclose(ours[:len(theirs)], theirs, atol=vf.TOL, rtol=0)


def test_multimodal_logits_match_transformers(imported):
  model, params, cfg = imported
  pixels = vf.images()
  tokens = np.array([_prompt(pixels)])
  ours = np.asarray(_apply(cfg, params, jnp.asarray(tokens), images=vision.pack_images([pixels], SLOTS,
                                                                                           vf.PATCH))[0])
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens), pixel_values=vf.hf_pixel_batch(pixels)[0],
                   image_sizes=vf.hf_pixel_batch(pixels)[1]).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=vf.TOL, rtol=0)


def test_greedy_generation_with_an_image_equals_transformers_generate(imported):
  model, params, cfg = imported
  pixels = vf.images(seed=3, sizes=((16, 16),))
  prompt = _prompt(pixels)
  px, sizes = vf.hf_pixel_batch(pixels)
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor([prompt]), pixel_values=px, image_sizes=sizes, max_new_tokens=10,
                         do_sample=False, eos_token_id=None, pad_token_id=cfg.pad_id)
  theirs = out[0, len(prompt):].tolist()
  ours = sampler.generate(params, cfg, [prompt], 10, eos_id=-1, images=[pixels])[0]
  assert ours == theirs


def test_an_images_features_do_not_depend_on_the_other_images_or_padding_in_its_row(imported):
  _, params, cfg = imported
  a, b = vf.images(seed=5)
  features = lambda rows, slots: np.asarray(_apply(cfg, params, vision.pack_images(rows, slots, vf.PATCH),
                                                   method=lambda m, x: m.image_features(x)))  # noqa: E731
  alone = features([[b]], 4)[0]
  together = features([[a, b], [b]], 64)
  np.testing.assert_allclose(together[0, 6:7], alone, atol=1e-6)  # b after a's 6 merged tokens
  np.testing.assert_allclose(together[1, :1], alone, atol=1e-6)  # b first, then 60 padding slots


def test_patchify_puts_each_2x2_block_of_patches_together_in_row_major_block_order():
  pixels = np.arange(3 * 16 * 24, dtype=np.float32).reshape(3, 16, 24)
  patches, rows, cols = vision.patchify(pixels, 4)
  assert patches.shape == (24, 4, 4, 3)
  assert rows[:8].tolist() == [0, 0, 1, 1, 0, 0, 1, 1] and cols[:8].tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
  for k in range(24):  # each patch holds its own pixels, HWC
    r, c = rows[k], cols[k]
    np.testing.assert_array_equal(patches[k], pixels[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4].transpose(1, 2, 0))


def test_a_text_only_model_has_no_vision_params_and_refuses_images():
  cfg = config.preset("tiny")
  assert set(transformer.abstract_params(cfg)) == {"tok_embeddings", "layers", "norm", "output"}
  assert "vision_layers" not in cfg.arch_dict()  # text-only checkpoints' metadata is unchanged
  params = transformer.init_params(cfg, jax.random.key(0))
  with pytest.raises(UserError, match="text-only model"):
    _apply(cfg, params, jnp.zeros((1, 4), jnp.int32), images=vision.pack_images([vf.images()[1:]], 4, vf.PATCH))


def test_the_frozen_vit_is_bitwise_unchanged_by_training_steps_and_has_no_optimizer_state():
  cfg = vf.our_config()
  params = transformer.init_params(cfg, jax.random.key(1))
  opt_cfg = optimizer.optimizer_config(lr=1e-2)
  tx, _ = optimizer.make_optimizer(opt_cfg, 10, optimizer.frozen_params(cfg))
  state = tx.init(params)
  moments = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0]
  n_trained = len(jax.tree.leaves({k: v for k, v in params.items() if k != "vision_encoder"}))
  assert len(moments) == 2 * n_trained  # Adam's mu and nu for everything but the ViT
  pixels = vf.images()
  images = vision.pack_images([pixels], SLOTS, vf.PATCH)
  tokens = jnp.asarray([_prompt(pixels)])

  @jax.jit
  def step(params, state):
    def loss(p):
      logits = _apply(cfg, p, tokens[:, :-1], images=images)[0]
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    grads = jax.grad(loss)(params)
    assert_zero = jax.tree.leaves(grads["vision_encoder"])
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, sum(jnp.abs(g).sum() for g in assert_zero)

  new, vit_grad = params, None
  for _ in range(3):
    new, state, vit_grad = step(new, state)
  assert float(vit_grad) == 0.0  # stop_gradient: the ViT's backward is never built
  for a, b in zip(jax.tree.leaves(params["vision_encoder"]), jax.tree.leaves(new["vision_encoder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for name in ("w_in", "w_out", "merging_layer"):
    assert not np.array_equal(np.asarray(params["projector"][name]), np.asarray(new["projector"][name]))


def test_pruning_with_a_full_width_rotation_keeps_multimodal_logits(imported):
  _, params, cfg = imported
  pixels = vf.images()
  tokens, images = jnp.asarray([_prompt(pixels)]), vision.pack_images([pixels], SLOTS, vf.PATCH)
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(vf.D_MODEL, vf.D_MODEL)))
  plan = rewrite.Plan(rotation=jnp.asarray(q, jnp.float32))
  child, child_cfg = rewrite.apply_plan(params, plan), rewrite.config_after(cfg, plan)
  np.testing.assert_allclose(_apply(child_cfg, child, tokens, images=images)[0],
                             _apply(cfg, params, tokens, images=images)[0], atol=vf.TOL, rtol=0)


def test_a_pruned_child_keeps_the_parents_vit_and_gets_a_projector_of_its_own_width(imported):
  _, params, cfg = imported
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(vf.D_MODEL, vf.D_MODEL)))
  plan = rewrite.Plan(rotation=jnp.asarray(q[:, :48], jnp.float32))
  child, child_cfg = rewrite.apply_plan(params, plan), rewrite.config_after(cfg, plan)
  assert child_cfg.d_model == 48 and child_cfg.vision_layers == cfg.vision_layers
  shapes = jax.tree.map(lambda x: x.shape, child)
  assert shapes == jax.tree.map(lambda x: x.shape, transformer.abstract_params(child_cfg))
  assert shapes["projector"]["w_in"] == (vf.V_D, 48) and shapes["projector"]["w_out"] == (48, 48)
  for a, b in zip(jax.tree.leaves(params["vision_encoder"]), jax.tree.leaves(child["vision_encoder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_image_token_counts_that_disagree_with_the_images_are_one_clear_error(imported):
  _, params, cfg = imported
  pixels = vf.images()
  prompt = _prompt(pixels)
  with pytest.raises(UserError, match=r"Row 0: 6 \[IMG\] tokens .* 2 image\(s\) fill 7"):
    sampler.generate(params, cfg, [prompt[:3] + prompt[4:]], 2, images=[pixels])
  with pytest.raises(UserError, match="2 image lists for 1 prompts"):
    sampler.generate(params, cfg, [prompt], 2, images=[pixels, pixels])
  with pytest.raises(UserError, match="buffer holds 16"):
    vision.pack_images([pixels], 16, vf.PATCH)
  with pytest.raises(UserError, match=r"shape \(3, 12, 8\) cannot be split"):
    vision.patchify(np.zeros((3, 12, 8), np.float32), vf.PATCH)


def test_vit_and_projector_parameter_counts_match_the_published_ones():
  """Pixtral ViT 403,305,472 (ministral3_spec.md §5.1, = SmolBench's atlas); projectors by width."""
  for name, projector in [("ministral3_3b", 16_778_240), ("ministral3_8b", 25_166_848),
                          ("ministral3_14b", 35_652_608), ("mistral_small_3_1_24b", 35_652_608)]:
    cfg = config.preset(f"{name}_vision")
    counts = jax.tree.map(lambda a: int(np.prod(a.shape)), transformer.abstract_params(cfg))
    assert sum(jax.tree.leaves(counts["vision_encoder"])) == config.vision_param_count(cfg) == 403_305_472
    assert sum(jax.tree.leaves(counts["projector"])) == config.projector_param_count(cfg) == projector
    text_only = config.param_count(config.preset(name))
    assert config.param_count(cfg) == text_only + 403_305_472 + projector


@pytest.mark.parametrize("name", ["ministral3_3b_vision", "ministral3_8b_vision", "ministral3_14b_vision"])
def test_real_size_multimodal_train_step_compiles_on_8_devices_with_a_frozen_vit(name, record_property):
  part = sharding.Partitioner.from_config(dict(data=1, fsdp=4, tensor=2))
  cfg = config.preset(name, param_dtype="float32", dtype="bfloat16", remat_policy="full")
  report = abstract.compile_train_step(cfg, part, batch=4, seq=256, image_slots=1024)
  gib = 2**30
  print(f"\n{name}: params {report.param_bytes_per_device / gib:.2f} GiB per device; compiled arguments "
        f"{report.argument_bytes / gib:.2f} GiB, temporaries {report.temp_bytes / gib:.2f} GiB")
  record_property("temp_bytes", report.temp_bytes)
  assert report.param_bytes_total == 4 * config.param_count(cfg)
  assert report.param_bytes_per_device == pytest.approx(report.param_bytes_total / 8, rel=1e-3)
  vit = 4 * config.vision_param_count(cfg) / 8
  # Params + AdamW's two moments of everything but the frozen ViT (+ the batch).
  expected = 3 * report.param_bytes_per_device - 2 * vit
  assert report.argument_bytes == pytest.approx(expected, rel=2e-3)


def test_the_pruner_gives_a_multimodal_child_the_parents_vit_and_refuses_another_vit():
  cfg = vf.our_config()
  params = transformer.init_params(cfg, jax.random.key(2))
  target = cfg.replace(n_layers=1, d_model=48, d_ffn=96)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vf.VOCAB, (2, 8, 32)).astype(np.int32)
  batches = lambda: ({"inputs": t, "targets": t, "segment_ids": np.ones_like(t),  # noqa: E731
                      "positions": np.broadcast_to(np.arange(32, dtype=np.int32), t.shape)} for t in tokens)
  one_device = sharding.Partitioner(sharding.make_mesh(dict(data=1), devices=jax.devices()[:1]))
  child = pruner.prune(params, cfg, target, pruner.prune_config(), batches, one_device)
  assert child.cfg == target
  assert jax.tree.map(lambda x: x.shape, child.params) == jax.tree.map(lambda x: x.shape,
                                                                       transformer.abstract_params(target))
  for a, b in zip(jax.tree.leaves(params["vision_encoder"]), jax.tree.leaves(child.params["vision_encoder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(UserError, match="every child shares its parent's ViT"):
    pruner.check(cfg, target.replace(vision_d_ffn=32), pruner.prune_config())
