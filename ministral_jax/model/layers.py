"""One decoder block: RMSNorm -> GQA attention -> residual; RMSNorm -> SwiGLU -> residual.

Parameter names follow the paper and Mistral's native format (wq, wk, wv, wo;
w1, w2, w3; attention_norm, ffn_norm). Every parameter is created with its
logical axis names, and the main activations are constrained with theirs;
`sharding.py` maps the names to mesh axes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ministral_jax.model import attention_kernels
from ministral_jax.model.blockwise_attention import Layout
from ministral_jax.model.config import ModelConfig
from ministral_jax.model.rope import apply_rope

KVCache = tuple[jax.Array, jax.Array]  # k, v: [batch, cache_len, kv_heads, head_dim]

_init = nn.initializers.normal(stddev=0.02)


def precision(cfg: ModelConfig):
  return None if cfg.matmul_precision == "default" else cfg.matmul_precision


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init=_init):
  cfg = module.cfg
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype))


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back, then times the gain."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


class Attention(nn.Module):
  cfg: ModelConfig
  causal: bool = True  # False: bidirectional (the ViT)

  @nn.compact
  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], q_scale: jax.Array,
               layout: Layout, cache: KVCache | None, write_index: jax.Array | None
               ) -> tuple[jax.Array, KVCache | None]:
    cfg, dt, prec = self.cfg, jnp.dtype(self.cfg.dtype), precision(self.cfg)
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    wq = param(self, "wq", (d, n, h), ("embed", "heads", "head_dim")).astype(dt)
    wk = param(self, "wk", (d, k, h), ("embed", "kv_heads", "head_dim")).astype(dt)
    wv = param(self, "wv", (d, k, h), ("embed", "kv_heads", "head_dim")).astype(dt)
    wo = param(self, "wo", (n, h, d), ("heads", "head_dim", "embed")).astype(dt)

    q = jnp.einsum("btd,dnh->btnh", x, wq, precision=prec)  # [batch, seq, heads, head_dim]
    key = jnp.einsum("btd,dkh->btkh", x, wk, precision=prec)  # [batch, seq, kv_heads, head_dim]
    value = jnp.einsum("btd,dkh->btkh", x, wv, precision=prec)
    cos, sin = rope
    q = apply_rope(q, cos, sin) * q_scale  # query temperature after RoPE, keys untouched
    key = apply_rope(key, cos, sin)
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))

    if cache is not None:
      key, value = _write_cache(cache, key, value, write_index)
      cache = (key, value)
    out = attention_kernels.attend(q, key.astype(dt), value.astype(dt), layout, cfg.attention_impl,
                                   causal=self.causal, block=cfg.attention_block)
    out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
    return jnp.einsum("btnh,nhd->btd", out, wo, precision=prec), cache


def _write_cache(cache: KVCache, key: jax.Array, value: jax.Array, write_index: jax.Array) -> KVCache:
  """Writes the new `[batch, t, kv_heads, head_dim]` entries at each row's own offset."""
  def write_row(buf, new, start):
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (start, 0, 0))
  write = jax.vmap(write_row)
  return write(cache[0], key, write_index), write(cache[1], value, write_index)


class FeedForward(nn.Module):
  """SwiGLU: W2(silu(W1 x) * W3 x)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, dt, prec = self.cfg, jnp.dtype(self.cfg.dtype), precision(self.cfg)
    w1 = param(self, "w1", (cfg.d_model, cfg.d_ffn), ("embed", "mlp")).astype(dt)
    w3 = param(self, "w3", (cfg.d_model, cfg.d_ffn), ("embed", "mlp")).astype(dt)
    w2 = param(self, "w2", (cfg.d_ffn, cfg.d_model), ("mlp", "embed")).astype(dt)
    gate = jnp.einsum("btd,df->btf", x, w1, precision=prec)
    up = jnp.einsum("btd,df->btf", x, w3, precision=prec)
    hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up,
                                        ("activation_batch", "activation_length", "activation_mlp"))
    # A no-op unless applied with mutable=["intermediates"] (pruning's FFN channel statistics).
    self.sow("intermediates", "hidden", hidden)
    return jnp.einsum("btf,fd->btd", hidden, w2, precision=prec)


class Block(nn.Module):
  """One pre-norm layer (decoder or ViT); its signature is that of an `nn.scan` body."""
  cfg: ModelConfig
  causal: bool = True

  @nn.compact
  def __call__(self, h: jax.Array, cache: KVCache | None, rope: tuple[jax.Array, jax.Array],
               q_scale: jax.Array, layout: Layout, write_index: jax.Array | None
               ) -> tuple[jax.Array, KVCache | None]:
    residual_axes = ("activation_batch", "activation_length", "activation_embed")
    h = nn.with_logical_constraint(h, residual_axes)
    attn_out, cache = Attention(self.cfg, self.causal, name="attention")(
        RMSNorm(self.cfg, name="attention_norm")(h), rope, q_scale, layout, cache, write_index)
    h = h + attn_out
    h = h + FeedForward(self.cfg, name="feed_forward")(RMSNorm(self.cfg, name="ffn_norm")(h))
    return nn.with_logical_constraint(h, residual_axes), cache


def remat_policy(name: str) -> Any:
  return {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]
