"""The decoder's own invariants: layouts, packing, caching, RoPE tables, config errors."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import Ministral3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ministral_jax.model import config, rope, transformer
from ministral_jax.sample import sampler

TINY = config.preset("tiny")


@pytest.fixture(scope="module")
def params():
  return transformer.init_params(TINY, jax.random.key(0))


def _forward(cfg, params, tokens, **kw):
  return transformer.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), **kw)[0]


def _tokens(batch, seq, seed=0, vocab=TINY.vocab_size):
  return np.random.RandomState(seed).randint(0, vocab, (batch, seq)).astype(np.int32)


def test_scan_unrolled_and_remat_share_one_layout_and_give_same_logits(params):
  tokens = _tokens(2, 40)
  ref = _forward(TINY, params, tokens)
  for changes in [dict(scan_layers=False), dict(remat_policy="full"), dict(remat_policy="dots")]:
    cfg = TINY.replace(**changes)
    assert jax.tree.structure(transformer.abstract_params(cfg)) == jax.tree.structure(params)
    np.testing.assert_allclose(_forward(cfg, params, tokens), ref, atol=1e-6, err_msg=str(changes))


def test_remat_does_not_change_gradients(params):
  tokens = _tokens(2, 24)

  def loss(p, cfg):
    return jnp.mean(_forward(cfg, p, tokens) ** 2)
  g_ref = jax.grad(loss)(params, TINY)
  g_remat = jax.grad(loss)(params, TINY.replace(remat_policy="full", scan_layers=False))
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_packed_documents_equal_separate_forward_passes(params):
  """Segment ids + restarted positions: no token attends across a document boundary."""
  doc_a, doc_b = _tokens(1, 30, seed=1)[0], _tokens(1, 50, seed=2)[0]
  packed = np.concatenate([doc_a, doc_b])[None]
  segments = np.array([[1] * 30 + [2] * 50])
  positions = np.array([list(range(30)) + list(range(50))])
  out = _forward(TINY, params, packed, positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
  np.testing.assert_allclose(out[0, :30], _forward(TINY, params, doc_a[None])[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 30:], _forward(TINY, params, doc_b[None])[0], atol=1e-5)


def test_cached_decoding_of_padded_prompts_matches_full_forward(params):
  """Prefill right-padded prompts of different lengths, then one token per step."""
  full = _tokens(3, 60, seed=3)  # each row's whole sequence
  lengths = np.array([5, 17, 9], np.int32)
  prompts = [full[i, :n].tolist() for i, n in enumerate(lengths)]
  tokens, _ = sampler.pad_prompts(prompts, TINY.pad_id)
  ref = np.asarray(_forward(TINY, params, full))
  logits, cache = sampler.prefill(params, TINY, jnp.asarray(tokens), jnp.asarray(lengths), cache_len=64)
  np.testing.assert_allclose(logits, ref[np.arange(3), lengths - 1], atol=1e-5)
  position = jnp.asarray(lengths)
  for _ in range(30):  # crosses the 32-token original context: YaRN + query temperature active
    next_tok = full[np.arange(3), np.asarray(position)]
    logits, cache = sampler.decode_step(params, TINY, jnp.asarray(next_tok), position, cache)
    np.testing.assert_allclose(logits, ref[np.arange(3), np.asarray(position)], atol=1e-5)
    position = position + 1


@pytest.mark.parametrize("name", ["ministral3_8b", "ministral3_14b", "mistral_small_3_1_24b"])
def test_rope_inverse_frequencies_match_transformers(name):
  cfg = config.preset(name)
  rope_params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling == "yarn":
    rope_params = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.yarn_factor,
                   "original_max_position_embeddings": cfg.yarn_original_max_len, "beta_fast": 32.0,
                   "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}
  hf_cfg = Ministral3Config(hidden_size=cfg.d_model, head_dim=cfg.head_dim, rope_parameters=rope_params,
                            max_position_embeddings=cfg.max_seq_len)
  ours, factor = rope.inverse_frequencies(cfg)
  if cfg.rope_scaling == "yarn":
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    assert factor == pytest.approx(their_factor) and factor == 1.0
  else:
    theirs = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
  np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-6)


def test_query_temperature_matches_published_values():
  cfg = config.preset("ministral3_8b")
  positions = jnp.array([[0, 16383, 16384, 32768, 65536, 131072, 262143]])
  got = np.asarray(rope.query_temperature(cfg, positions, jnp.float32)).ravel()
  np.testing.assert_allclose(got, [1.0, 1.0, 1.06931, 1.10986, 1.16094, 1.21972, 1.27726], atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(params):
  tokens = _tokens(2, 32)
  ref = _forward(TINY, params, tokens)
  out = _forward(TINY.replace(dtype="bfloat16"), params, tokens)
  assert out.dtype == jnp.bfloat16
  # bf16 has 8 mantissa bits: relative error ~4e-3 per op, a few ops deep.
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05 * float(jnp.abs(ref).max()))


def test_unknown_config_field_is_rejected_with_a_suggestion():
  with pytest.raises(ValueError, match="Unknown model config field 'd_modle'.*Did you mean 'd_model'"):
    config.ModelConfig.from_dict({**TINY.to_dict(), "d_modle": 3})


def test_heads_not_divisible_by_kv_heads_is_rejected():
  with pytest.raises(ValueError, match="n_heads.*multiple of n_kv_heads"):
    TINY.replace(n_heads=6, n_kv_heads=4)


def test_unknown_preset_lists_the_known_ones():
  with pytest.raises(ValueError, match="Known presets"):
    config.preset("ministral3_9b")


def test_param_count_equals_the_initialised_tree(params):
  assert config.param_count(TINY) == sum(x.size for x in jax.tree.leaves(params))
  tied = config.preset("tiny_tied")
  assert config.param_count(tied) == sum(x.size for x in jax.tree.leaves(transformer.abstract_params(tied)))


def test_real_size_parameter_counts_match_published_sizes():
  """Text-decoder counts vs the model cards' language-model sizes (24B: whole model, with the ViT).

  The cards round to 0.1B by truncation (8.49B is published as "8.4B"), so we
  check both that the truncated count equals the card and that it is within 1.1%.
  """
  counts = {name: config.param_count(config.preset(name)) for name in config.PUBLISHED_PARAMS}
  counts["mistral_small_3_1_24b"] = config.param_count(config.preset("mistral_small_3_1_24b_vision"))
  for name, published in config.PUBLISHED_PARAMS.items():
    assert abs(counts[name] / published - 1) < 0.011, (name, counts[name], published)
    assert np.floor(counts[name] / 1e8) / 10 == published / 1e9, (name, counts[name], published)
