"""Scorers rank what they say they rank, and keep the top in the original order."""

import jax
import numpy as np

from ministral_jax.model import config, transformer
from ministral_jax.prune import scorers

CFG = config.preset("tiny", n_layers=4)
PARAMS = transformer.init_params(CFG, jax.random.key(0))


def test_keep_top_returns_the_highest_scores_in_their_original_order_ties_to_the_lower_id():
  np.testing.assert_array_equal(scorers.keep_top(np.array([0.5, 3.0, 1.0, 3.0]), 2), [1, 3])
  np.testing.assert_array_equal(scorers.keep_top(np.array([2.0, 2.0, 2.0]), 2), [0, 1])
  np.testing.assert_array_equal(scorers.keep_top(np.array([[1.0, 0.0, 2.0], [0.0, 5.0, 1.0]]), 2), [[0, 2], [1, 2]])


def test_layer_scorers_rank_by_their_statistic_and_the_baselines_do_what_they_say():
  stats = {"norm_ratio": np.array([9.0, 1.1, 1.3, 1.05]), "block_influence": np.array([0.9, 0.2, 0.01, 0.3]),
           "tokens": np.float32(1)}
  rng = lambda: np.random.default_rng(0)
  keep = lambda name: scorers.keep_top(scorers.LAYER_SCORERS[name](stats, PARAMS, rng()), 3).tolist()
  assert keep("norm_ratio") == [0, 1, 2]  # the block that changes its input least (ratio 1.05) goes
  assert keep("block_influence") == [0, 1, 3]
  assert keep("drop_last") == [0, 1, 2]
  assert keep("random") == keep("random")  # seeded
  random_keeps = {tuple(scorers.keep_top(scorers.LAYER_SCORERS["random"](stats, PARAMS, np.random.default_rng(s)), 3))
                  for s in range(20)}
  assert len(random_keeps) > 1  # and another seed gives another choice


def test_ffn_magnitude_is_the_norm_of_each_channels_weights():
  score = scorers.FFN_SCORERS["magnitude"]({}, PARAMS, None)
  ffn = jax.tree.map(np.asarray, PARAMS["layers"]["feed_forward"])
  l, j = 2, 17
  expected = np.sqrt(np.sum(ffn["w1"][l, :, j] ** 2) + np.sum(ffn["w3"][l, :, j] ** 2) + np.sum(ffn["w2"][l, j] ** 2))
  assert score.shape == (4, CFG.d_ffn) and np.isclose(score[l, j], expected, rtol=1e-5)


def test_channel_scorers_select_channels_and_report_the_energy_they_keep():
  energy = np.random.default_rng(1).uniform(size=(4, 2, CFG.d_model))
  second_moment = np.diag(np.arange(1.0, CFG.d_model + 1))
  stats = {"channel_energy": energy, "second_moment": second_moment}
  q, info = scorers.hidden_rotation("activation", stats, PARAMS, 16, np.random.default_rng(0))
  channels = np.sort(np.argsort(-np.sqrt(energy).sum((0, 1)))[:16])
  np.testing.assert_array_equal(info["channels_kept"], channels)
  np.testing.assert_array_equal(q[channels, np.arange(16)], 1.0)
  assert np.isclose(info["energy_kept"], (channels + 1).sum() / second_moment.trace())


def test_pca_explained_variance_is_the_kept_share_of_its_own_second_moment():
  x = np.random.default_rng(2).normal(size=(500, CFG.d_model)) * np.linspace(3, 0.1, CFG.d_model)
  stats = {"second_moment_normalized": x.T @ x}
  q, info = scorers.hidden_rotation("pca_normalized", stats, PARAMS, 8, None)
  kept = np.linalg.norm(x @ q) ** 2 / np.linalg.norm(x) ** 2
  assert np.isclose(info["explained_variance"], kept, rtol=1e-5) and "energy_kept" not in info
