"""Real sizes checked without weights: lower and compile a training step from shapes alone.

`compile_train_step` builds the forward+backward of a next-token loss on a
mesh from `jax.ShapeDtypeStruct`s carrying the rules' shardings, compiles it
with XLA and reports what each device would hold. Nothing is allocated, so a
24B model compiles on a laptop's simulated 8-device CPU mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ministral_jax import sharding
from ministral_jax.model import transformer, vision
from ministral_jax.model.config import ModelConfig


@dataclasses.dataclass
class CompiledReport:
  param_bytes_total: int
  param_bytes_per_device: int
  # XLA's compiled memory analysis (per device, exact for the compiled program).
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  compiled: Any = dataclasses.field(repr=False, default=None)


def next_token_loss(params: Any, cfg: ModelConfig, tokens: jax.Array, images: vision.Images | None = None
                    ) -> jax.Array:
  logits, _ = transformer.Transformer(cfg).apply({"params": params}, tokens[:, :-1], images=images)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def compile_train_step(cfg: ModelConfig, partitioner: sharding.Partitioner, batch: int, seq: int,
                       image_slots: int = 0) -> CompiledReport:
  """Compiles loss + grads + an optax AdamW update, params/opt state sharded by the rules.

  `image_slots` > 0 (a vision model): every row also carries that many ViT patches, and the ViT is frozen
  (no update, no optimiser state) unless `train_vision_encoder`.
  """
  partitioner.check_batch(batch)
  param_shardings = partitioner.param_shardings(cfg)
  abstract = transformer.abstract_params(cfg)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, param_shardings)
  optimizer = optax.adamw(1e-4)
  if cfg.vision_layers and not cfg.train_vision_encoder:
    optimizer = optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()},
                                      lambda p: {k: "frozen" if k == "vision_encoder" else "trained" for k in p})
  opt_abstract = jax.eval_shape(optimizer.init, abstract)
  opt_shardings = partitioner.like_params(opt_abstract, param_shardings)
  opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           opt_abstract, opt_shardings)
  tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32, sharding=partitioner.batch_sharding(2))
  images = None
  if image_slots:
    p, ids = cfg.vision_patch_size, jax.ShapeDtypeStruct((batch, image_slots), jnp.int32,
                                                         sharding=partitioner.batch_sharding(2))
    images = vision.Images(jax.ShapeDtypeStruct((batch, image_slots, p, p, 3), jnp.dtype(cfg.dtype),
                                                sharding=partitioner.batch_sharding(5)), ids, ids, ids)

  def step(params, opt_state, tokens, images):
    loss, grads = jax.value_and_grad(next_token_loss)(params, cfg, tokens, images)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  with partitioner.activate():
    compiled = jax.jit(step, out_shardings=(param_shardings, opt_shardings, None),
                       donate_argnums=(0, 1)).lower(params, opt_state, tokens, images).compile()
  mem = compiled.memory_analysis()
  return CompiledReport(*param_bytes(cfg, partitioner), mem.argument_size_in_bytes, mem.output_size_in_bytes,
                        mem.temp_size_in_bytes, compiled)


def param_bytes(cfg: ModelConfig, partitioner: sharding.Partitioner) -> tuple[int, int]:
  """Bytes of the params in all, and on one device under the rules."""
  leaves = jax.tree.leaves(transformer.abstract_params(cfg))
  shardings = jax.tree.leaves(partitioner.param_shardings(cfg))
  total = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in leaves)
  per_device = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize for a, s in zip(leaves, shardings))
  return total, per_device


def run(cfg, workdir: str) -> dict:
  """Task `describe`: counts, per-device bytes and compiled memory of one training step."""
  import json

  from etils import epath

  from ministral_jax.model.config import param_count
  model_cfg = ModelConfig.from_dict(cfg.model)
  partitioner = sharding.Partitioner.from_config(cfg.mesh)
  report = compile_train_step(model_cfg, partitioner, cfg.batch, cfg.seq, cfg.get("image_slots", 0))
  gib = 2**30
  result = {"params": param_count(model_cfg), "mesh": dict(partitioner.mesh.shape),
            "batch": cfg.batch, "seq": cfg.seq, "image_slots": cfg.get("image_slots", 0),
            "param_GiB_per_device": report.param_bytes_per_device / gib,
            "compiled_argument_GiB_per_device": report.argument_bytes / gib,
            "compiled_temp_GiB_per_device": report.temp_bytes / gib}
  for key, value in result.items():
    print(f"{key:>36}: {value:,.3f}" if isinstance(value, float) else f"{key:>36}: {value}")
  out = epath.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "describe.json").write_text(json.dumps(result, indent=2))
  return result
