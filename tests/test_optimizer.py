"""Learning-rate schedules and the weight-decay mask."""

import jax
import numpy as np
import pytest

from ministral_jax.model import config, transformer
from ministral_jax.train import optimizer


def _lrs(schedule, steps=100):
  cfg = optimizer.optimizer_config(lr=1.0, schedule=schedule)
  cfg.warmup_steps, cfg.min_lr_ratio, cfg.wsd_decay_fraction = 10, 0.1, 0.2
  fn = optimizer.learning_rate_schedule(cfg, steps)
  return np.array([float(fn(s)) for s in range(steps + 1)])


def test_warmup_then_cosine_ends_at_the_floor():
  lr = _lrs("cosine")
  np.testing.assert_allclose(lr[:11], np.linspace(0, 1, 11), atol=1e-6)
  assert np.all(np.diff(lr[10:]) <= 1e-7) and lr[100] == pytest.approx(0.1)


def test_warmup_stable_decay_holds_the_peak_then_decays_linearly_over_the_last_fifth():
  lr = _lrs("wsd")
  np.testing.assert_allclose(lr[10:81], 1.0)
  np.testing.assert_allclose(lr[80:101], np.linspace(1.0, 0.1, 21), atol=1e-6)


def test_unknown_schedule_is_rejected():
  with pytest.raises(ValueError, match="Unknown optimizer.schedule 'linear'"):
    _lrs("linear")


def test_weight_decay_skips_norm_gains():
  cfg = config.preset("tiny")
  params = transformer.init_params(cfg, jax.random.key(0))
  opt_cfg = optimizer.optimizer_config(lr=1.0, schedule="constant")
  opt_cfg.warmup_steps, opt_cfg.clip_norm = 0, 0.0
  tx, _ = optimizer.make_optimizer(opt_cfg, 10)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)  # zero gradient: only decay moves params
  assert np.all(np.asarray(updates["norm"]["scale"]) == 0)
  assert np.all(np.asarray(updates["layers"]["ffn_norm"]["scale"]) == 0)
  np.testing.assert_allclose(updates["output"], -0.1 * params["output"], rtol=1e-5)
