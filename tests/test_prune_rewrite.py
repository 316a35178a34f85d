"""The checkpoint rewrite: each step equals an independent construction of the model it should give."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ministral_jax.model import config, transformer
from ministral_jax.prune import rewrite

TOKENS = np.random.RandomState(0).randint(0, 512, (2, 40)).astype(np.int32)
CFG = config.preset("tiny", n_layers=3)


def _logits(params, cfg):
  return np.asarray(transformer.Transformer(cfg).apply({"params": params}, TOKENS)[0])


def _params(cfg=CFG, seed=0):
  """Random params with non-trivial gains and an embedding of rms ~0.6 (init gains of 1 hide mistakes)."""
  params = transformer.init_params(cfg, jax.random.key(seed))
  rng = np.random.RandomState(seed)
  for site in ("attention_norm", "ffn_norm"):
    params["layers"][site]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, (cfg.n_layers, cfg.d_model)), jnp.float32)
  params["norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, cfg.d_model), jnp.float32)
  params["tok_embeddings"] = params["tok_embeddings"] * 30
  return params


def test_removing_layers_gives_exactly_the_model_without_those_blocks():
  params = _params()
  # A block whose residual writers (wo, w2) are zero is the identity: the model "without" it.
  without = jax.tree.map(lambda x: x, params)
  for path in (("attention", "wo"), ("feed_forward", "w2")):
    without["layers"][path[0]][path[1]] = params["layers"][path[0]][path[1]].at[1].set(0.0)
  child = rewrite.apply_plan(params, rewrite.Plan(layers=jnp.array([0, 2])))
  np.testing.assert_allclose(_logits(child, CFG.replace(n_layers=2)), _logits(without, CFG), atol=1e-5)
  assert not np.allclose(_logits(child, CFG.replace(n_layers=2)), _logits(params, CFG), atol=1e-3)


def test_slicing_ffn_channels_equals_zeroing_them():
  params = _params()
  rng = np.random.RandomState(1)
  keep = np.sort(np.stack([rng.permutation(CFG.d_ffn)[:80] for _ in range(CFG.n_layers)]), axis=1)
  dropped = np.ones((CFG.n_layers, CFG.d_ffn), bool)
  np.put_along_axis(dropped, keep, False, axis=1)
  zeroed = jax.tree.map(lambda x: x, params)
  zeroed["layers"]["feed_forward"]["w2"] = jnp.where(dropped[:, :, None], 0.0, params["layers"]["feed_forward"]["w2"])
  child = rewrite.apply_plan(params, rewrite.Plan(ffn=jnp.asarray(keep)))
  assert child["layers"]["feed_forward"]["w1"].shape == (3, 64, 80)
  np.testing.assert_allclose(_logits(child, CFG.replace(d_ffn=80)), _logits(zeroed, CFG), atol=1e-5)


@pytest.mark.parametrize("tie_init", rewrite.TIE_INITS)
def test_tying_is_exact_when_the_untied_head_is_the_embedding(tie_init):
  """An untied parent whose head is E^T (up to a per-channel scale) gives a tied child with its logits."""
  untied = _params()
  scale = np.random.RandomState(2).uniform(-2, 2, CFG.d_model).astype(np.float32)
  untied["output"] = scale[:, None] * untied["tok_embeddings"].T
  child = rewrite.apply_plan(untied, rewrite.Plan(), tie=True, tie_init=tie_init)
  assert "output" not in child
  np.testing.assert_allclose(_logits(child, CFG.replace(tie_embeddings=True)), _logits(untied, CFG), atol=1e-4)


def test_tied_matrix_follows_the_documented_initialisation():
  params = _params()
  emb = np.asarray(params["tok_embeddings"], np.float64)
  head_t = (np.asarray(params["norm"]["scale"], np.float64)[:, None] * np.asarray(params["output"], np.float64)).T
  out = {t: jax.tree.map(lambda x: np.asarray(x, np.float64), rewrite.tie_embeddings(params, t))
         for t in rewrite.TIE_INITS}
  # "head": the tied child's effective head is the untied one's; columns keep the embedding's norms.
  w, g = out["head"]["tok_embeddings"], out["head"]["norm"]["scale"]
  np.testing.assert_allclose(w * g, head_t, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(w, axis=0), np.linalg.norm(emb, axis=0), rtol=1e-5)
  assert np.all(np.sum(w * emb, 0) >= 0)
  # "embedding": the embedding is kept; gamma is the per-channel least-squares fit of the head.
  w, g = out["embedding"]["tok_embeddings"], out["embedding"]["norm"]["scale"]
  np.testing.assert_allclose(w, emb, rtol=1e-6)
  np.testing.assert_allclose(np.sum(emb * (emb * g - head_t), 0), 0, atol=1e-5)  # normal equations
  # "mean": halfway between the two matrices, with the "head" gain.
  np.testing.assert_allclose(out["mean"]["tok_embeddings"], (emb + out["head"]["tok_embeddings"]) / 2, rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(out["mean"]["norm"]["scale"], out["head"]["norm"]["scale"], rtol=1e-6)


def test_untying_keeps_the_function():
  cfg = CFG.replace(tie_embeddings=True)
  params = _params(cfg)
  child = rewrite.apply_plan(params, rewrite.Plan(), tie=False)
  np.testing.assert_allclose(_logits(child, CFG), _logits(params, cfg), atol=1e-5)


def test_config_after_follows_the_plan_shapes():
  plan = rewrite.Plan(layers=jnp.arange(2), rotation=jnp.zeros((64, 48)), ffn=jnp.zeros((2, 96), jnp.int32))
  cfg = rewrite.config_after(CFG.replace(tie_embeddings=True), plan, tie=None)
  assert (cfg.n_layers, cfg.d_model, cfg.d_ffn, cfg.tie_embeddings) == (2, 48, 96, False)
  shapes = jax.eval_shape(lambda p, pl: rewrite.apply_plan(p, pl), transformer.abstract_params(CFG), plan)
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, transformer.abstract_params(cfg))
