"""Attention without dense masks: the blockwise kernel, kernel selection, context parallelism.

The reference is the textbook formula written here in a few lines (repeat the
kv heads, dense boolean mask, softmax); every kernel must equal it in values
and gradients. Tolerances: fp32 with `highest` matmuls; the blockwise kernel
sums the same products in a different order (online softmax, tile by tile),
so 1e-5 relative to the largest entry leaves ~30x headroom over the measured
~3e-7 while any masking or GQA-mapping bug is O(1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ministral_jax import sharding
from ministral_jax.errors import UserError
from ministral_jax.model import attention_kernels, config, context_parallel, transformer
from ministral_jax.model.blockwise_attention import Layout, blockwise_attend, dense_mask

TINY = config.preset("tiny")
TOL = 1e-5


def reference(q, k, v, layout, causal=True):
  batch, q_len, heads, head_dim = q.shape
  group = heads // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  s = jnp.einsum("bqnh,bsnh->bnqs", q, k) * head_dim ** -0.5
  s = jnp.where(dense_mask(layout, batch, q_len, k.shape[1], causal), s, -1e30)
  return jnp.einsum("bnqs,bsnh->bqnh", jax.nn.softmax(s, -1), v)


def _qkv(batch, q_len, kv_len, heads, kv_heads, head_dim, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(batch, q_len, heads, head_dim), (batch, kv_len, kv_heads, head_dim), (batch, kv_len, kv_heads, head_dim)]
  return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def _packed_segments(batch, seq, seed=0):
  """Uneven documents per row, then padding (segment 0) at the end."""
  rng = np.random.default_rng(seed)
  seg = np.sort(rng.integers(1, 5, size=(batch, seq)), axis=1).astype(np.int32)
  seg[:, seq - seq // 8:] = 0
  return jnp.asarray(seg)


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _assert_same_values_and_grads(f, g, args, tol=TOL):
  w = jax.random.normal(jax.random.key(7), f(*args).shape)
  np.testing.assert_array_less(_rel(f(*args), g(*args)), tol)
  grads_f = jax.grad(lambda *a: jnp.sum(w * f(*a)), argnums=(0, 1, 2))(*args)
  grads_g = jax.grad(lambda *a: jnp.sum(w * g(*a)), argnums=(0, 1, 2))(*args)
  for name, a, b in zip("qkv", grads_f, grads_g):
    assert _rel(a, b) < tol, name


@pytest.mark.parametrize("heads,kv_heads,head_dim,seq,block", [
    (4, 4, 16, 100, 32),  # GQA ratio 1, length not a multiple of the block
    (8, 2, 24, 96, 32),  # ratio 4, head_dim 24 (not d_model / heads of any preset)
    (8, 1, 8, 130, 64),  # ratio 8 (multi-query), a 2-token tail block
])
def test_blockwise_equals_reference_for_packed_segments_values_and_grads(heads, kv_heads, head_dim, seq, block):
  q, k, v = _qkv(2, seq, seq, heads, kv_heads, head_dim)
  segments = _packed_segments(2, seq)
  layout = Layout(segments, segments)
  _assert_same_values_and_grads(
      lambda q, k, v: blockwise_attend(q, k, v, layout, causal=True, scale=head_dim ** -0.5, block=block),
      lambda q, k, v: reference(q, k, v, layout), (q, k, v))


def test_blockwise_kv_cache_decode_sees_each_rows_slots_up_to_its_position():
  """Decoding: 3 new tokens per row against a 40-slot cache, rows at different positions."""
  q, k, v = _qkv(2, 3, 40, 8, 2, 16, seed=1)
  positions = jnp.asarray([[5, 6, 7], [30, 31, 32]], jnp.int32)
  layout = Layout(q_index=positions)
  _assert_same_values_and_grads(
      lambda q, k, v: blockwise_attend(q, k, v, layout, causal=True, scale=0.25, block=16),
      lambda q, k, v: reference(q, k, v, layout), (q, k, v))


def test_blockwise_skips_tiles_but_not_keys_across_document_boundaries():
  """Many short documents: most tiles are skipped; a row whose document starts mid-tile still sees it."""
  seq = 128
  q, k, v = _qkv(1, seq, seq, 4, 2, 8, seed=2)
  segments = jnp.asarray(np.repeat(np.arange(1, 9), 16)[None].astype(np.int32))
  layout = Layout(segments, segments)
  _assert_same_values_and_grads(
      lambda q, k, v: blockwise_attend(q, k, v, layout, causal=True, scale=8 ** -0.5, block=24),
      lambda q, k, v: reference(q, k, v, layout), (q, k, v))


def test_blockwise_is_the_default_on_cpu_and_the_models_memory_is_linear_in_the_sequence():
  """XLA's compiled temporaries of the decoder's fwd+bwd (attention inside the layer scan): 4x the
  tokens must cost about 4x, not 16x (a dense or a hoisted-mask kernel grows ~16x)."""
  cfg = TINY.replace(n_heads=8, n_kv_heads=2, head_dim=64, max_seq_len=8192)
  params = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))

  def temp_bytes(seq):
    loss = lambda p, t: jnp.sum(transformer.Transformer(cfg).apply({"params": p}, t, return_hidden=True)[0] ** 2)  # noqa
    tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    return jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
  assert attention_kernels.resolve_impl("auto", jnp.float32, Layout(), 8, 8) == "blockwise"
  ratio = temp_bytes(8192) / temp_bytes(2048)
  assert ratio < 6, ratio


def _model_loss(cfg, params, tokens, positions, segments):
  out = transformer.Transformer(cfg).apply({"params": params}, tokens, positions, segments)[0]
  return jnp.mean(out.astype(jnp.float32) ** 2), out


def _packed_batch(batch, seq, seed=0):
  segments = np.asarray(_packed_segments(batch, seq, seed))
  positions = np.zeros_like(segments)
  for i in range(1, seq):
    same = segments[:, i] == segments[:, i - 1]
    positions[:, i] = np.where(same, positions[:, i - 1] + 1, 0)
  tokens = np.random.RandomState(seed).randint(0, TINY.vocab_size, (batch, seq)).astype(np.int32)
  return tokens, positions.astype(np.int32), segments


@pytest.mark.parametrize("mesh", [dict(data=1, context=8), dict(data=2, context=2, tensor=2)])
def test_context_parallel_model_equals_one_device_logits_and_grads(mesh):
  params = transformer.init_params(TINY, jax.random.key(1))
  batch = _packed_batch(2, 64)
  (ref_loss, ref_out), ref_grads = jax.value_and_grad(
      lambda p: _model_loss(TINY, p, *batch), has_aux=True)(params)
  part = sharding.Partitioner.from_config(mesh)
  sharded = part.shard_params(params, TINY), *part.shard_batch(batch)
  with part.activate():
    assert context_parallel.context_shards() == mesh["context"]
    (loss, out), grads = jax.jit(jax.value_and_grad(
        lambda p, *b: _model_loss(TINY, p, *b), has_aux=True))(*sharded)
  assert _rel(out, ref_out) < TOL
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert _rel(a, b) < TOL


def test_zigzag_gives_every_context_shard_one_early_and_one_late_chunk():
  x = jnp.arange(16)[None]
  z = context_parallel.zigzag(x, 4)
  assert z[0].reshape(4, 4).tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
  assert context_parallel.unzigzag(z, 4).tolist() == x.tolist()


def test_a_sequence_the_context_axis_does_not_divide_is_one_clear_error():
  params = transformer.init_params(TINY, jax.random.key(1))
  part = sharding.Partitioner.from_config(dict(data=1, context=8))
  sharded = part.shard_params(params, TINY)
  with part.activate(), pytest.raises(UserError, match=r"multiple of 2 x context = 16"):
    jax.jit(lambda p, t: transformer.Transformer(TINY).apply({"params": p}, t)[0])(sharded, np.zeros((1, 40), np.int32))


def test_a_kernel_on_a_backend_that_lacks_it_and_a_bad_block_are_clear_errors():
  with pytest.raises(UserError, match=r"attention_impl='splash' needs a TPU.*'auto'"):
    attention_kernels.check_impl("splash", backend="cpu")
  with pytest.raises(UserError, match=r"attention_impl='pallas_gpu' needs a GPU"):
    attention_kernels.check_impl("pallas_gpu", backend="cpu")
  with pytest.raises(UserError, match=r"attention_block"):
    TINY.replace(attention_block=3)
  with pytest.raises(UserError, match=r"attention_impl"):
    TINY.replace(attention_impl="flash")
  q, k, v = _qkv(1, 8, 8, 4, 2, 8)
  with pytest.raises(UserError, match=r"'cudnn' has no segment ids"):
    attention_kernels._cudnn(q, k, v, Layout(jnp.ones((1, 8), jnp.int32)), causal=True, scale=1.0, block=8)


def test_auto_picks_the_kernel_for_backend_dtype_and_layout():
  packed = Layout(jnp.ones((1, 256), jnp.int32), jnp.ones((1, 256), jnp.int32))
  decode = Layout(q_index=jnp.zeros((1, 1), jnp.int32))
  pick = lambda dtype, layout, q, kv, backend: attention_kernels.resolve_impl("auto", dtype, layout, q, kv, backend)  # noqa
  assert pick(jnp.bfloat16, packed, 256, 256, "tpu") == "splash"
  assert pick(jnp.bfloat16, packed, 200, 200, "tpu") == "blockwise"  # splash tiles are multiples of 128
  assert pick(jnp.bfloat16, decode, 1, 256, "tpu") == "blockwise"
  assert pick(jnp.bfloat16, packed, 256, 256, "gpu") == "pallas_gpu"
  assert pick(jnp.bfloat16, Layout(), 256, 256, "gpu") == "cudnn"
  assert pick(jnp.float32, packed, 256, 256, "gpu") == "blockwise"
  assert pick(jnp.bfloat16, packed, 256, 256, "cpu") == "blockwise"


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_pallas_kernels_inside_the_model_under_shard_map_equal_blockwise(impl, monkeypatch):
  """The TPU and GPU kernels run through the Pallas interpreter on CPU, sharded over batch and heads."""
  monkeypatch.setenv("MINISTRAL_JAX_PALLAS_INTERPRET", "1")
  params = transformer.init_params(TINY, jax.random.key(3))
  tokens, positions, segments = _packed_batch(2, 128, seed=3)
  ref = _model_loss(TINY, params, tokens, positions, segments)[1]
  cfg = TINY.replace(attention_impl=impl, attention_block=128)
  part = sharding.Partitioner(sharding.make_mesh(dict(data=2, tensor=2), jax.devices()[:4]))
  sharded = part.shard_params(params, TINY), *part.shard_batch((tokens, positions, segments))
  with part.activate():
    out = jax.jit(lambda p, *b: _model_loss(cfg, p, *b)[1])(*sharded)
  assert _rel(out, ref) < TOL


def test_context_parallel_chunked_losses_equal_one_device():
  """Pretrain's chunked CE and distill's chunked KL fold the split sequence into the batch: same values."""
  from ministral_jax.train import distill, pretrain
  loss_cfg = pretrain.loss_config()
  loss_cfg.seq_chunk, loss_cfg.vocab_chunk = 8, 200
  params = transformer.init_params(TINY, jax.random.key(1))
  teacher = transformer.init_params(TINY, jax.random.key(2))
  tokens, positions, segments = _packed_batch(2, 64, seed=4)
  batch = {"inputs": tokens, "positions": positions, "segment_ids": segments,
           "targets": np.roll(tokens, -1, axis=1)}
  fns = [pretrain.make_loss(TINY, loss_cfg), distill.make_loss(TINY, TINY, loss_cfg, 2.0, 0.3)]
  part = sharding.Partitioner.from_config(dict(data=2, context=4))
  sharded = part.shard_params(params, TINY), part.shard_batch(batch), part.shard_params(teacher, TINY)
  for fn in fns:
    grad = jax.value_and_grad(lambda p, b, t: fn(p, b, t, None)[0])
    ref_value, ref_grads = grad(params, batch, teacher)
    with part.activate():
      value, grads = jax.jit(grad)(*sharded)
    assert abs(float(value) - float(ref_value)) <= TOL * abs(float(ref_value))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      assert _rel(a, b) < TOL
