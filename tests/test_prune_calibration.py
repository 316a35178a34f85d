"""Streaming calibration statistics equal the same quantities computed from stored activations."""

import jax
import jax.numpy as jnp
import numpy as np

from ministral_jax.model import config, transformer
from ministral_jax.prune import calibration

CFG = config.preset("tiny")


def _batch(seed):
  rng = np.random.RandomState(seed)
  segments = np.ones((2, 24), np.int32)
  segments[1, 18:] = 0  # padding is not counted
  return {"inputs": rng.randint(0, CFG.vocab_size, (2, 24)).astype(np.int32),
          "positions": np.tile(np.arange(24, dtype=np.int32), (2, 1)), "segment_ids": segments}


def _reference(params, batch):
  """Every block's input and output, from the model itself cut to 1..L layers; the norm ratios."""
  w = (batch["segment_ids"] != 0).astype(np.float64)
  hs = []
  for n in range(CFG.n_layers + 1):
    cut = CFG.replace(n_layers=max(n, 1))
    p = dict(params, layers=jax.tree.map(lambda x: x[:max(n, 1)], params["layers"]))
    if n == 0:
      hs.append(np.asarray(jnp.take(params["tok_embeddings"], batch["inputs"], axis=0), np.float64))
      continue
    model = transformer.Transformer(cut)
    h = model.apply({"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"],
                    method=_pre_norm_hidden)
    hs.append(np.asarray(h, np.float64))
  ratio = [np.sum(w * np.linalg.norm(b, axis=-1) / np.linalg.norm(a, axis=-1)) for a, b in zip(hs, hs[1:])]
  return np.array(ratio), w.sum()


def _pre_norm_hidden(model, tokens, positions, segment_ids):
  """The residual stream after the last block, before the final norm."""
  cfg = model.cfg
  h = jnp.take(model.tok_embeddings, tokens, axis=0)
  tables, q_scale = transformer.position_tables(cfg, positions, jnp.float32)
  mask = transformer.segment_causal_mask(segment_ids)
  return model.layers(h, None, tables, q_scale, mask, None)[0]


def test_streamed_statistics_match_stored_activations_and_add_over_batches():
  params = transformer.init_params(CFG, jax.random.key(0))
  stats = calibration.empty_stats(CFG)
  batches = [_batch(0), _batch(1)]
  for b in batches:
    stats = calibration.accumulate(stats, jax.jit(calibration.batch_stats, static_argnums=1)(params, CFG, b))
  ratios, tokens = zip(*[_reference(params, b) for b in batches])
  np.testing.assert_allclose(stats["norm_ratio"], np.sum(ratios, axis=0), rtol=1e-5)
  assert float(stats["tokens"]) == sum(tokens) == 2 * (24 + 18)
  assert stats["second_moment"].shape == (CFG.d_model, CFG.d_model)
  np.testing.assert_allclose(stats["second_moment"], stats["second_moment"].T, rtol=1e-6)
  assert stats["ffn_act"].shape == (CFG.n_layers, CFG.d_ffn) and float(stats["ffn_act"].min()) >= 0
