"""Hidden-dimension pruning's foundation: norm folding and the global rotation preserve the function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ministral_jax.model import config, transformer
from ministral_jax.prune import rotate

TOKENS = np.random.RandomState(0).randint(0, 512, (2, 40)).astype(np.int32)


def _logits(params, cfg):
  return np.asarray(transformer.Transformer(cfg).apply({"params": params}, TOKENS)[0])


def _randomised_gains(params, seed=0):
  """Init gains are all 1, which would hide a wrong fold: give every gain a different value."""
  rng = np.random.RandomState(seed)
  params = jax.tree.map(lambda x: x, params)
  for path in (("layers", "attention_norm"), ("layers", "ffn_norm"), ("norm",)):
    node = params
    for key in path:
      node = node[key]
    node["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, node["scale"].shape), jnp.float32)
  return params


@pytest.mark.parametrize("preset", ["tiny", "tiny_tied"])
def test_folding_gains_and_a_full_rotation_reproduce_the_parents_logits(preset):
  cfg = config.preset(preset)
  params = _randomised_gains(transformer.init_params(cfg, jax.random.key(0)))
  ref = _logits(params, cfg)
  folded = rotate.fold_norm_gains(params)
  untied = cfg.replace(tie_embeddings=False)  # the head carries the final gain, the embedding does not
  np.testing.assert_allclose(_logits(folded, untied), ref, atol=1e-4)
  q, _ = np.linalg.qr(np.random.RandomState(1).normal(size=(cfg.d_model, cfg.d_model)))
  child = rotate.rotate_residual(params, jnp.asarray(q, jnp.float32))  # folds the gains itself
  np.testing.assert_allclose(_logits(child, untied), ref, atol=1e-4)


def test_pca_rotation_keeps_the_top_directions_and_reports_their_energy():
  rng = np.random.RandomState(0)
  basis, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  energies = np.array([8.0, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625])
  second_moment = basis @ np.diag(energies) @ basis.T
  q, eigvals = rotate.pca_rotation(second_moment, 3)
  np.testing.assert_allclose(eigvals, energies, rtol=1e-10)
  assert (np.cumsum(eigvals) / eigvals.sum())[2] == pytest.approx(14 / energies.sum())
  np.testing.assert_allclose(np.abs(q.T @ basis[:, :3]), np.eye(3), atol=1e-6)
  assert np.all(q[np.abs(q).argmax(0), np.arange(3)] > 0)  # one sign convention: same child on any mesh


def test_rotation_that_does_not_fit_the_model_is_rejected():
  cfg = config.preset("tiny")
  folded = rotate.fold_norm_gains(transformer.init_params(cfg, jax.random.key(0)))
  with pytest.raises(ValueError, match="does not fit d_model=64"):
    rotate.rotate_residual(folded, jnp.eye(32))


def test_slicing_to_the_subspace_the_residual_stream_lives_in_is_exact():
  """If every residual writer lives in a d'-dim subspace, slicing to it loses nothing; this proves
  the child's RMSNorm gain sqrt(d / d').

  The child keeps the standard eps, which it adds to a mean over d' channels: exact up to
  eps * (d/d' - 1) / mean(x^2). Embeddings of rms ~1 (as in trained models) make that ~1e-5.
  """
  cfg = config.preset("tiny")
  d, d_new = cfg.d_model, 40
  basis, _ = np.linalg.qr(np.random.RandomState(2).normal(size=(d, d_new)))
  proj = jnp.asarray(basis @ basis.T, jnp.float32)
  params = rotate.fold_norm_gains(_randomised_gains(transformer.init_params(cfg, jax.random.key(0))))
  cfg = cfg.replace(tie_embeddings=False)
  params["tok_embeddings"] = 50.0 * params["tok_embeddings"] @ proj  # rms ~1 instead of 0.02
  params["layers"]["attention"]["wo"] = jnp.einsum("lnhd,de->lnhe", params["layers"]["attention"]["wo"], proj)
  params["layers"]["feed_forward"]["w2"] = params["layers"]["feed_forward"]["w2"] @ proj
  child = rotate.rotate_residual(params, jnp.asarray(basis, jnp.float32))
  assert child["tok_embeddings"].shape == (512, d_new)
  np.testing.assert_allclose(_logits(child, cfg.replace(d_model=d_new)), _logits(params, cfg), atol=1e-4)
