"""The mesh abstraction on 8 simulated CPU devices."""

import jax
import numpy as np
import optax
import pytest

from ministral_jax import sharding
from ministral_jax.model import config, transformer

CFG = config.preset("tiny_shard")  # 8 heads, 4 kv heads: divisible by a tensor axis of 4


@pytest.fixture(scope="module")
def params():
  return transformer.init_params(CFG, jax.random.key(1))


@pytest.fixture(scope="module")
def tokens():
  return np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 48)).astype(np.int32)


def _mesh(shape):
  return sharding.Partitioner.from_config(dict(zip(("data", "fsdp", "tensor"), shape)))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 2, 4), (2, 2, 2)])
def test_sharded_logits_equal_single_device_and_params_are_partitioned(shape, params, tokens):
  ref = np.asarray(transformer.Transformer(CFG).apply({"params": params}, tokens)[0])
  part = _mesh(shape)
  sharded = part.shard_params(params, CFG)
  with part.activate():
    out = jax.jit(lambda p, t: transformer.Transformer(CFG).apply({"params": p}, t)[0])(
        sharded, part.shard_batch(tokens))
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

  data, fsdp, tensor = shape
  L, D, F, N, K, H, V = (CFG.n_layers, CFG.d_model, CFG.d_ffn, CFG.n_heads, CFG.n_kv_heads, CFG.head_dim,
                         CFG.vocab_size)
  expected_shard_shapes = {  # the rules: embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor
      ("layers", "attention", "wq"): (L, D // fsdp, N // tensor, H),
      ("layers", "attention", "wk"): (L, D // fsdp, K // tensor, H),
      ("layers", "attention", "wo"): (L, N // tensor, H, D // fsdp),
      ("layers", "feed_forward", "w1"): (L, D // fsdp, F // tensor),
      ("layers", "feed_forward", "w2"): (L, F // tensor, D // fsdp),
      ("tok_embeddings",): (V // tensor, D // fsdp),
      ("output",): (D // fsdp, V // tensor),
      ("norm", "scale"): (D,),
  }
  for path, shard_shape in expected_shard_shapes.items():
    leaf = sharded
    for key in path:
      leaf = leaf[key]
    assert {s.data.shape for s in leaf.addressable_shards} == {shard_shape}, path
  # Logits come out split over the batch (data x fsdp) and the vocabulary (tensor).
  assert out.sharding.shard_shape(out.shape) == (8 // (data * fsdp), 48, V // tensor)


def test_optimizer_state_is_sharded_like_the_params(params):
  part = _mesh((1, 2, 4))
  param_shardings = part.param_shardings(CFG)
  state = jax.eval_shape(optax.adamw(1e-3).init, params)
  state_shardings = part.like_params(state, param_shardings)
  mu = state_shardings[0].mu
  assert mu["layers"]["attention"]["wq"].spec == param_shardings["layers"]["attention"]["wq"].spec
  assert state_shardings[0].count.spec == jax.sharding.PartitionSpec()


def test_mesh_that_does_not_divide_the_devices_is_rejected():
  with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
    _mesh((3, 2, 1))
  with pytest.raises(ValueError, match="do not divide the 8 devices"):
    sharding.make_mesh(dict(data=-1, fsdp=3, tensor=1))


def test_mesh_that_does_not_divide_a_sharded_dimension_is_rejected():
  cfg = config.preset("tiny")  # 2 kv heads cannot be split over tensor=4
  with pytest.raises(ValueError, match=r"wk'\] dim 2 \(size 2, logical 'kv_heads'\) over mesh axes tensor \(size 4\)"):
    _mesh((1, 2, 4)).param_shardings(cfg)


def test_global_batch_that_the_mesh_cannot_split_is_rejected():
  with pytest.raises(ValueError, match="Global batch 6 cannot be split over the 8 batch shards"):
    _mesh((2, 4, 1)).check_batch(6)


def test_unknown_mesh_field_is_rejected():
  with pytest.raises(ValueError, match="Unknown mesh fields"):
    sharding.make_mesh(dict(data=8, model=1))
