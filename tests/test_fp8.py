"""fp8 training through qwix: same params, e4m3/e5m2 dots in the program, loss that tracks bf16."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ministral_jax import sharding
from ministral_jax.model import config, fp8, transformer
from ministral_jax.train import losses

TINY = config.preset("tiny", dtype="bfloat16")
E4M3, E5M2 = "f8E4M3FN", "f8E5M2"
BLOCK_WEIGHT_MATMULS = 7  # wq, wk, wv, wo, w1, w3, w2
# qwix 0.1.8 checks for flax's deprecated nnx.VariableState on every intercepted matmul.
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")


def _batch(cfg, batch, seq, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0, cfg.vocab_size)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              positions=jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
              segment_ids=jnp.ones((batch, seq), jnp.int32))


def _hidden_and_head(cfg, params, batch, use_fp8):
  """As the trainers do it: the module's final hidden states, and the LM head applied by the loss."""
  hidden, _ = fp8.training_module(cfg, use_fp8).apply(
      {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"], return_hidden=True)
  return hidden, transformer.output_matrix(params, cfg).astype(hidden.dtype)


def _mean_loss(cfg, use_fp8, params, batch):
  hidden, head = _hidden_and_head(cfg, params, batch, use_fp8)
  total, count = losses.cross_entropy(hidden, head, batch["targets"], batch["segment_ids"] != 0,
                                      seq_chunk=min(hidden.shape[1], 512),
                                      vocab_chunk=min(cfg.vocab_size, 8192))
  return total / count


def _dot_types(lowered_text):
  """Counter of dot operand types, fp8 pairs kept, everything else lumped as "other"."""
  kinds = [t if any(x.startswith("f8") for x in t) else "other" for t in fp8.dot_operand_types(lowered_text)]
  return collections.Counter(kinds)


@pytest.fixture(scope="module")
def params():
  return jax.jit(transformer.init_params, static_argnums=0)(TINY, jax.random.key(0))


def test_fp8_off_is_the_plain_transformer():
  assert type(fp8.training_module(TINY, fp8=False)) is transformer.Transformer


@pytest.mark.parametrize("name", ["tiny", "tiny_tied"])
@pytest.mark.parametrize("changes", [{}, dict(remat_policy="full"), dict(scan_layers=False)])
def test_param_tree_and_logical_axes_unchanged(name, changes):
  cfg = config.preset(name, dtype="bfloat16", **changes)
  variables = jax.eval_shape(lambda: fp8.training_module(cfg, True).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  assert set(variables) == {"params"}  # no quant_stats: dynamic scales only
  assert nn.unbox(variables["params"]) == transformer.abstract_params(cfg)  # fp32 masters, same keys
  assert nn.get_partition_spec(variables["params"]) == transformer.param_logical_axes(cfg)


def test_applied_like_the_plain_transformer_and_close_to_it(params):
  batch = _batch(TINY, 2, 48)
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  plain, _ = transformer.Transformer(TINY).apply({"params": params}, *args, return_hidden=True)
  quant, cache = fp8.training_module(TINY, True).apply({"params": params}, *args, return_hidden=True)
  assert cache is None and quant.shape == plain.shape and quant.dtype == plain.dtype == jnp.bfloat16
  rel = jnp.linalg.norm((quant - plain).astype(jnp.float32)) / jnp.linalg.norm(plain.astype(jnp.float32))
  assert 0 < float(rel) < 0.1  # fp8 changes the numbers, a little


def test_hlo_has_e4m3_forward_and_e5m2_backward_dots_on_block_weights_only(params):
  """Forward: the 7 weight matmuls of the (scanned) block are e4m3 x e4m3; the attention core
  (q k^T, p v: written twice by the blockwise kernel, for tiles with and without a mask) is not. Backward: each weight matmul gives two e5m2 (gradient) x e4m3 (saved
  forward operand) dots, for the input and the weight gradient."""
  batch = _batch(TINY, 2, 16)

  def forward(p):
    return _hidden_and_head(TINY, p, batch, True)[0]
  fwd = _dot_types(jax.jit(forward).lower(params).as_text())
  assert fwd == {(E4M3, E4M3): BLOCK_WEIGHT_MATMULS, "other": 2 * 2}

  grad = jax.jit(jax.grad(lambda p: _mean_loss(TINY, True, p, batch))).lower(params).as_text()
  both = _dot_types(grad)
  assert both[(E4M3, E4M3)] == BLOCK_WEIGHT_MATMULS
  assert both[(E5M2, E4M3)] == 2 * BLOCK_WEIGHT_MATMULS
  assert set(both) == {(E4M3, E4M3), (E5M2, E4M3), "other"}

  plain = jax.jit(jax.grad(lambda p: _mean_loss(TINY, False, p, batch))).lower(params).as_text()
  assert set(_dot_types(plain)) == {"other"}


@pytest.mark.parametrize("changes", [dict(remat_policy="full"), dict(remat_policy="dots_no_batch"),
                                     dict(scan_layers=False, remat_policy="dots")])
def test_scan_and_remat_keep_fp8_and_give_fp32_grads(params, changes):
  cfg = TINY.replace(**changes)
  batch = _batch(cfg, 2, 16)
  lowered = jax.jit(jax.value_and_grad(lambda p: _mean_loss(cfg, True, p, batch))).lower(params)
  types = _dot_types(lowered.as_text())
  assert types[(E4M3, E4M3)] >= BLOCK_WEIGHT_MATMULS and types[(E5M2, E4M3)] == 2 * BLOCK_WEIGHT_MATMULS
  loss, grads = lowered.compile()(params)
  assert np.isfinite(float(loss))
  assert jax.tree.map(lambda g: (g.shape, g.dtype), grads) == jax.tree.map(lambda p: (p.shape, p.dtype), params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def _train(cfg, use_fp8, params, batch, steps, lr):
  optimizer = optax.adamw(lr, weight_decay=0.0)

  @jax.jit
  def step(p, opt_state):
    loss, grads = jax.value_and_grad(lambda q: _mean_loss(cfg, use_fp8, q, batch))(p)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  opt_state, curve = optimizer.init(params), []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    curve.append(float(loss))
  return np.array(curve)


# Measured on CPU (jax 0.10.2, qwix 0.1.8), 30 AdamW steps at lr 3e-3 memorising one random
# [8, 64] batch of the tiny preset (164K params), loss 6.25 -> ~1.17, four init/data seeds:
# max |fp8 - bf16| / bf16 over the run 0.8-1.4% (fp8 ends 0.6-1.6% higher); for scale, bf16 vs
# fp32 differs by 0.4-0.7%. This test's seed: 1.25% (final 1.168 bf16, 1.183 fp8). 3% is twice
# the worst seed. (An e5m2 *forward*, the wrong format, reaches 2.9-3.7%: the HLO test, not this
# bound, is what pins the formats.)
SHORT_RUN_RTOL = 0.03


def test_short_run_fp8_loss_tracks_bf16(params):
  batch = _batch(TINY, 8, 64, seed=100)
  bf16 = _train(TINY, False, params, batch, steps=30, lr=3e-3)
  fp8_curve = _train(TINY, True, params, batch, steps=30, lr=3e-3)
  rel = np.abs(fp8_curve - bf16) / bf16
  print(f"\nbf16 {bf16[::5].round(4)} final {bf16[-1]:.4f}\nfp8  {fp8_curve[::5].round(4)} "
        f"final {fp8_curve[-1]:.4f}\nmax rel diff {rel.max():.4f} at step {rel.argmax()}")
  assert fp8_curve[-1] < 0.3 * fp8_curve[0]  # it learns: 6.25 -> ~1.2
  assert rel.max() < SHORT_RUN_RTOL, rel


def test_real_size_3b_fp8_train_step_compiles_with_the_same_param_shapes():
  """ministral3_3b on a simulated 8-device fsdp x tensor mesh, from shapes alone (~20 s on 2 cores)."""
  cfg = config.preset("ministral3_3b", param_dtype="float32", dtype="bfloat16", remat_policy="full")
  part = sharding.Partitioner.from_config(dict(data=1, fsdp=4, tensor=2))
  abstract = transformer.abstract_params(cfg)
  variables = jax.eval_shape(lambda: fp8.training_module(cfg, True).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  assert nn.unbox(variables["params"]) == abstract

  shardings = part.param_shardings(cfg)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  optimizer = optax.adamw(1e-5)
  opt_abstract = jax.eval_shape(optimizer.init, abstract)
  opt_shardings = part.like_params(opt_abstract, shardings)
  opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           opt_abstract, opt_shardings)
  batch_size, seq = 4, 512
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=part.batch_sharding(2))
           for k, v in jax.eval_shape(lambda: _batch(cfg, batch_size, seq)).items()}

  def step(p, o, b):
    loss, grads = jax.value_and_grad(lambda q: _mean_loss(cfg, True, q, b))(p)
    updates, o = optimizer.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  with part.activate():
    lowered = jax.jit(step, out_shardings=(shardings, opt_shardings, None),
                      donate_argnums=(0, 1)).lower(params, opt_state, batch)
    out_params, _, _ = lowered.out_info
    compiled = lowered.compile()
  assert jax.tree.map(lambda a: (a.shape, a.dtype), out_params) == jax.tree.map(
      lambda a: (a.shape, a.dtype), abstract)
  types = _dot_types(lowered.as_text())
  assert types[(E4M3, E4M3)] >= BLOCK_WEIGHT_MATMULS and types[(E5M2, E4M3)] == 2 * BLOCK_WEIGHT_MATMULS
  param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
  # Params + AdamW's two moments, fp32 and sharded 8 ways like without fp8 (+ the token batch).
  assert compiled.memory_analysis().argument_size_in_bytes == pytest.approx(3 * param_bytes / 8, rel=1e-3)
