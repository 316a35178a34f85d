"""Streaming calibration statistics equal the same quantities computed from stored activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ministral_jax import sharding
from ministral_jax.model import config, layers, transformer
from ministral_jax.model.blockwise_attention import Layout
from ministral_jax.prune import calibration

CFG = config.preset("tiny")


def _batch(seed):
  rng = np.random.RandomState(seed)
  segments = np.ones((2, 24), np.int32)
  segments[0, 10:] = 2  # two packed documents
  segments[1, 18:] = 0  # padding is not counted
  positions = np.tile(np.arange(24, dtype=np.int32), (2, 1))
  positions[0, 10:] -= 10
  return {"inputs": rng.randint(0, CFG.vocab_size, (2, 24)).astype(np.int32), "positions": positions,
          "segment_ids": segments}


def _rms_norm(x, g):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + CFG.norm_eps) * g


def _stored_activations(params, batch):
  """Every layer's block input, mid-block stream, norm outputs and FFN hidden, written out in numpy
  (attention from the model's module, which the HF parity tests pin down)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  tables, q_scale = transformer.position_tables(CFG, jnp.asarray(batch["positions"]), jnp.float32)
  segments = jnp.asarray(batch["segment_ids"])
  layout = Layout(segments, segments)
  silu = lambda x: x / (1 + np.exp(-x))
  h = p["tok_embeddings"][batch["inputs"]]
  acts = []
  for l in range(CFG.n_layers):
    lp = jax.tree.map(lambda x: x[l], p["layers"])
    x_attn = _rms_norm(h, lp["attention_norm"]["scale"])
    attn, _ = layers.Attention(CFG).apply({"params": jax.tree.map(jnp.float32, lp["attention"])},
                                          jnp.float32(x_attn), tables, q_scale, layout, None, None)
    mid = h + np.asarray(attn, np.float64)
    x_ffn = _rms_norm(mid, lp["ffn_norm"]["scale"])
    hidden = silu(x_ffn @ lp["feed_forward"]["w1"]) * (x_ffn @ lp["feed_forward"]["w3"])
    out = mid + hidden @ lp["feed_forward"]["w2"]
    acts.append(dict(h=h, mid=mid, x_attn=x_attn, x_ffn=x_ffn, hidden=hidden, out=out))
    h = out
  return acts


def _reference(params, batch):
  w = (batch["segment_ids"] != 0).astype(np.float64)
  norm = lambda x: np.linalg.norm(x, axis=-1)
  ref = {k: [] for k in ("norm_ratio", "block_influence", "channel_energy", "ffn_act")}
  second_moment = normalized = 0
  unit_rms = lambda x: x / np.sqrt(np.mean(x * x, -1, keepdims=True))
  rows = lambda y: np.sum(w[..., None] * np.abs(y), 1) / w.sum(1)[:, None]  # [batch, d]
  for a in _stored_activations(params, batch):
    ref["norm_ratio"].append(np.sum(w * norm(a["out"]) / norm(a["h"])))
    cos = np.sum(a["h"] * a["out"], -1) / (norm(a["h"]) * norm(a["out"]))
    ref["block_influence"].append(np.sum(w * (1 - cos)))
    ref["channel_energy"].append([np.sum(rows(a["x_attn"]) ** 2, 0), np.sum(rows(a["x_ffn"]) ** 2, 0)])
    ref["ffn_act"].append(np.einsum("btf,bt->f", np.abs(a["hidden"]), w))
    second_moment = second_moment + sum(np.einsum("btd,bte,bt->de", x, x, w) for x in (a["h"], a["mid"]))
    normalized = normalized + sum(np.einsum("btd,bte,bt->de", unit_rms(x), unit_rms(x), w) for x in (a["h"], a["mid"]))
  return {**{k: np.array(v) for k, v in ref.items()}, "second_moment": second_moment,
          "second_moment_normalized": normalized, "tokens": w.sum()}


def _randomised(params):
  rng = np.random.RandomState(3)
  for site in ("attention_norm", "ffn_norm"):
    params["layers"][site]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, (CFG.n_layers, CFG.d_model)), jnp.float32)
  params["tok_embeddings"] = params["tok_embeddings"] * 30  # a residual stream of rms ~0.6, not 0.02
  return params


@pytest.fixture(scope="module")
def params():
  return _randomised(transformer.init_params(CFG, jax.random.key(0)))


def test_every_streamed_statistic_matches_stored_activations_summed_over_batches(params):
  batches = [_batch(0), _batch(1)]
  part = sharding.Partitioner(sharding.make_mesh(dict(data=1), devices=jax.devices()[:1]))
  stats = calibration.calibrate(params, CFG, batches, part)
  refs = [_reference(params, b) for b in batches]
  for key in calibration.STATS + ("tokens",):
    ref = refs[0][key] + refs[1][key]
    # float32 sums of ~170 tokens x 2 sites: entries near zero get an absolute error of the matrix's scale
    np.testing.assert_allclose(stats[key], ref, rtol=2e-5, atol=1e-6 * max(1.0, np.abs(ref).max()), err_msg=key)
  assert float(stats["tokens"]) == 2 * (24 + 18)


def test_only_the_wanted_statistics_are_computed(params):
  stats = calibration.batch_stats(params, CFG, _batch(0), wanted=("ffn_act",))
  assert set(stats) == {"ffn_act", "tokens"}
  with pytest.raises(ValueError, match="Unknown calibration statistics"):
    calibration.batch_stats(params, CFG, _batch(0), wanted=("norm",))


def test_calibration_on_an_8_device_mesh_equals_one_device(params):
  batches = [_batch(0), _batch(1), _batch(2), _batch(3)]
  stacked = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(batches[::2], batches[1::2])]
  one = sharding.Partitioner(sharding.make_mesh(dict(data=1), devices=jax.devices()[:1]))
  eight = sharding.Partitioner.from_config(dict(data=2, fsdp=2, tensor=2))
  a = calibration.calibrate(params, CFG, stacked, one)
  b = calibration.calibrate(eight.shard_params(params, CFG), CFG, stacked, eight)
  for key in a:  # fp32 sums of 4096-entry grams: rounding is relative to the matrix's scale, not each entry's
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5 * max(1.0, np.abs(a[key]).max()), err_msg=key)


def test_empty_calibration_data_is_a_clear_error(params):
  part = sharding.Partitioner(sharding.make_mesh(dict(data=1), devices=jax.devices()[:1]))
  with pytest.raises(ValueError, match="calibration data produced no tokens"):
    calibration.calibrate(params, CFG, [], part)
