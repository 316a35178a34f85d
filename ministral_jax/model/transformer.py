"""The decoder: embed -> N blocks -> RMSNorm -> LM head (tied or untied).

Parameters (the one canonical layout, recorded in checkpoint metadata as
`LAYOUT`; layers are always stacked on a leading axis, whether the forward
pass scans over them or unrolls the loop):

    tok_embeddings                 [vocab, d_model]
    layers/attention_norm/scale    [layers, d_model]
    layers/attention/wq            [layers, d_model, heads, head_dim]
    layers/attention/wk, wv        [layers, d_model, kv_heads, head_dim]
    layers/attention/wo            [layers, heads, head_dim, d_model]
    layers/ffn_norm/scale          [layers, d_model]
    layers/feed_forward/w1, w3     [layers, d_model, d_ffn]
    layers/feed_forward/w2         [layers, d_ffn, d_model]
    norm/scale                     [d_model]
    output                         [d_model, vocab]   (absent when tied)

and, only when `vision_layers > 0` (`model/vision.py`):

    vision_encoder/patch_conv      [patch, patch, 3, vision_d_model]   (HWIO)
    vision_encoder/ln_pre/scale    [vision_d_model]
    vision_encoder/layers/...      the block above at the vision sizes
    projector/norm/scale           [vision_d_model]
    projector/merging_layer        [4 * vision_d_model, vision_d_model]
    projector/w_in, w_out          [vision_d_model, d_model], [d_model, d_model]  (b_in, b_out if biased)

Positions are per token, so packed documents restart at 0. Without a cache,
token i attends to token j iff j <= i and both have the same segment id; the
kernels get those ids, never a `[seq, seq]` mask (`attention_kernels.py`).
With a cache, each batch row writes its new keys at its own offset
`positions[:, 0]` (cache slot == position), and attends to every slot at or
before its position; right-padded prompts of different lengths therefore
decode together without holes.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ministral_jax.errors import UserError
from ministral_jax.model import context_parallel, layers, rope, vision
from ministral_jax.model.blockwise_attention import Layout
from ministral_jax.model.config import ModelConfig

LAYOUT = "stacked_layers/v1"
Cache = tuple[jax.Array, jax.Array]  # k, v: [layers, batch, cache_len, kv_heads, head_dim]


class Transformer(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.tok_embeddings = self.param(
        "tok_embeddings", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype))
    block = layers.Block
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=layers.remat_policy(cfg.remat_policy), prevent_cse=False)
    self.layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.n_layers,
        unroll=1 if cfg.scan_layers else cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, name="layers")
    self.norm = layers.RMSNorm(cfg)
    if cfg.vision_layers:
      self.vision_encoder = vision.VisionEncoder(cfg)
      self.projector = vision.Projector(cfg)
    if not cfg.tie_embeddings:
      self.output = self.param(
          "output", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: Cache | None = None,
               return_hidden: bool = False, images: vision.Images | None = None
               ) -> tuple[jax.Array, Cache | None]:
    """tokens `[batch, seq]` -> logits `[batch, seq, vocab]` (or final hidden states).

    `images`: each row's packed image patches; their features replace the
    row's `[IMG]` tokens in order. Returns `(out, new_cache)`; `new_cache` is
    None when no cache is given.
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    batch, seq = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    h = jnp.take(self.tok_embeddings, tokens, axis=0).astype(dt)  # [batch, seq, d_model]
    if images is not None:
      if not cfg.vision_layers:
        raise UserError("Images were given to a text-only model (model.vision_layers=0). Use a "
                        "multimodal config (e.g. preset 'ministral3_3b_vision') or drop the images.")
      h = vision.insert_image_features(h, tokens, self.image_features(images), cfg.image_token_id)
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))
    shards = context_parallel.context_shards()
    if cache is None:
      layout = Layout(segment_ids, segment_ids)
      if shards > 1:  # the sequence is split over the context axis, in zigzag order
        context_parallel.check_length(seq, shards)
        index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        h, positions, index = (context_parallel.zigzag(x, shards) for x in (h, positions, index))
        segments = None if segment_ids is None else context_parallel.zigzag(segment_ids, shards)
        layout = Layout(segments, segments, index, index)
      write_index = None
    else:
      if shards > 1:
        raise UserError("Decoding with a KV cache runs with mesh.context=1; context parallelism is for "
                        "training and scoring full sequences. Set mesh.context=1 for sampling jobs.")
      layout = Layout(q_index=positions)  # cache slot == position: row r sees slots <= its position
      write_index = positions[:, 0]
    rope_tables, q_scale = position_tables(cfg, positions, dt)
    h, cache = self.layers(h, cache, rope_tables, q_scale, layout, write_index)
    if shards > 1 and cache is None:
      h = context_parallel.unzigzag(h, shards)
    h = self.norm(h)
    if return_hidden:
      return h, cache
    return self.logits(h), cache

  def image_features(self, images: vision.Images) -> jax.Array:
    """Packed patches -> `[batch, slots / 4, d_model]` embeddings for the `[IMG]` tokens."""
    features = self.vision_encoder(images)
    if not self.cfg.train_vision_encoder:  # frozen: its backward pass is never built
      features = jax.lax.stop_gradient(features)
    return self.projector(features)

  def logits(self, h: jax.Array) -> jax.Array:
    """Final hidden states `[..., d_model]` -> logits `[..., vocab]` (compute dtype)."""
    dt = jnp.dtype(self.cfg.dtype)
    prec = None if self.cfg.matmul_precision == "default" else self.cfg.matmul_precision
    if self.cfg.tie_embeddings:
      out = jnp.einsum("...d,vd->...v", h, self.tok_embeddings.astype(dt), precision=prec)
    else:
      out = jnp.einsum("...d,dv->...v", h, self.output.astype(dt), precision=prec)
    return nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_vocab"))


def output_matrix(params: Any, cfg: ModelConfig) -> jax.Array:
  """The LM head as `[d_model, vocab]` (the transposed embedding when tied), for chunked losses."""
  return params["tok_embeddings"].T if cfg.tie_embeddings else params["output"]


def position_tables(cfg: ModelConfig, positions: jax.Array, dtype: Any
                    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """RoPE cos/sin `[batch, seq, head_dim]` and the query temperature `[batch, seq, 1, 1]`."""
  q_scale = (rope.query_temperature(cfg, positions, dtype) if cfg.query_temperature_beta
             else jnp.ones((1, 1, 1, 1), dtype))
  return rope.rope_cos_sin(cfg, positions, dtype), q_scale


def init_cache(cfg: ModelConfig, batch: int, cache_len: int, dtype: Any = None) -> Cache:
  shape = (cfg.n_layers, batch, cache_len, cfg.n_kv_heads, cfg.head_dim)
  dt = jnp.dtype(dtype or cfg.dtype)
  return jnp.zeros(shape, dt), jnp.zeros(shape, dt)


CACHE_AXES = ("layers", "cache_batch", "cache_sequence", "cache_kv_heads", None)


@functools.lru_cache(maxsize=32)
def _abstract_boxed(cfg: ModelConfig) -> Any:
  """Shapes and logical axes of every parameter (cached: configs are hashable).

  Call it outside `Partitioner.activate()`: under an active mesh the init's
  activation constraints would ask for concrete shardings.
  """
  model = Transformer(cfg)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), **_init_inputs(cfg)))["params"]


def param_logical_axes(cfg: ModelConfig) -> Any:
  """The logical axis names of every parameter, as a tree shaped like the params."""
  return nn.get_partition_spec(_abstract_boxed(cfg))


def abstract_params(cfg: ModelConfig) -> Any:
  """ShapeDtypeStructs of every parameter, without allocating anything."""
  return nn.unbox(_abstract_boxed(cfg))


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
  """Random parameters as a plain nested dict of arrays (single device)."""
  model = Transformer(cfg)
  return nn.unbox(model.init(rng, **_init_inputs(cfg))["params"])


def _init_inputs(cfg: ModelConfig) -> dict[str, Any]:
  """The smallest inputs that reach every parameter (one 2x2 block of patches for a vision model)."""
  inputs = {"tokens": jnp.zeros((1, 1), jnp.int32)}
  if cfg.vision_layers:
    slots, p = cfg.spatial_merge_size ** 2, cfg.vision_patch_size
    ids = jnp.zeros((1, slots), jnp.int32)
    inputs["images"] = vision.Images(jnp.zeros((1, slots, p, p, 3)), ids, ids, ids)
  return inputs
