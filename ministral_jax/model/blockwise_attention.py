"""Blockwise (flash-style) attention in pure JAX, with its own backward pass.

Why it exists: XLA's attention stores the `[batch, heads, q, kv]` scores and
their probabilities for the backward pass, so memory grows with the square of
the sequence (the 3B step's temporaries grew 14.4x from 16K to 64K tokens).
This kernel never holds more than one `[q_block, kv_block]` tile per head:

  forward   for each query block, loop over key blocks with the online softmax
            (running max m, running sum l, running output acc), and keep only
            out and the log-sum-exp lse = m + log(l) per query;
  backward  recompute each tile's probabilities from q, k and lse
            (p = exp(q k^T - lse)); with delta = rowsum(dout * out),
            dv += p^T dout, ds = p * (dout v^T - delta), dq += ds k, dk += ds^T q.

Residuals are q, k, v, out and lse: linear in the sequence. Each tile is
classified from per-block intervals of the ids (`_tile_kinds`): skipped when
no row can see any of its keys (above the causal diagonal, between different
packed documents), computed without a mask when every row sees every key (most
tiles below the diagonal), with the tile's mask otherwise; `lax.switch` picks.
A causal sequence costs about half the FLOPs of the dense product.

Who may attend to whom comes from per-token integers, never a dense mask:
query i sees key j iff `kv_index[j] <= q_index[i]` (when causal) and
`q_segment[i] == kv_segment[j]`. The indices are the causal coordinates: slot
order in training, the row's position against cache slots when decoding, a
permuted order under context parallelism (`model/context_parallel.py`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30  # a finite -inf: exp(_NEG - m) is 0 without inf - inf = nan
_PAD_Q_SEGMENT, _PAD_KV_SEGMENT = -1, -2  # padding rows and keys never match anything


class Layout(NamedTuple):
  """The attention pattern as per-token integers (None = the trivial value)."""
  q_segment: jax.Array | None = None  # [batch, q_len] int32; None = one segment
  kv_segment: jax.Array | None = None  # [batch, kv_len] int32
  q_index: jax.Array | None = None  # [batch, q_len] int32; None = arange(q_len)
  kv_index: jax.Array | None = None  # [batch, kv_len] int32; None = arange(kv_len)


def dense_mask(layout: Layout, batch: int, q_len: int, kv_len: int, causal: bool) -> jax.Array:
  """`[batch, 1, q_len, kv_len]` bool: the reference pattern, for small shapes and tests only."""
  qs, ks, qi, ki = _filled(layout, batch, q_len, kv_len)
  mask = qs[:, :, None] == ks[:, None, :]
  if causal:
    mask &= ki[:, None, :] <= qi[:, :, None]
  return mask[:, None]


def _filled(layout: Layout, batch: int, q_len: int, kv_len: int) -> tuple[jax.Array, ...]:
  def arange(n):
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
  qs = layout.q_segment if layout.q_segment is not None else jnp.zeros((batch, q_len), jnp.int32)
  ks = layout.kv_segment if layout.kv_segment is not None else jnp.zeros((batch, kv_len), jnp.int32)
  qi = layout.q_index if layout.q_index is not None else arange(q_len)
  ki = layout.kv_index if layout.kv_index is not None else arange(kv_len)
  return tuple(x.astype(jnp.int32) for x in (qs, ks, qi, ki))


def blockwise_attend(q: jax.Array, k: jax.Array, v: jax.Array, layout: Layout, *, causal: bool,
                     scale: float, block: int = 512) -> jax.Array:
  """softmax(scale q k^T, masked by `layout`) v, one tile at a time.

  q `[batch, q_len, heads, head_dim]`; k, v `[batch, kv_len, kv_heads, head_dim]`;
  query head h reads key/value head h // (heads / kv_heads). Lengths need not
  be multiples of `block`: the tail is padded with keys nobody sees.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bq, bk = min(block, q_len), min(block, kv_len)
  tq, tk = -(-q_len // bq) * bq, -(-kv_len // bk) * bk
  qs, ks, qi, ki = _filled(layout, batch, q_len, kv_len)
  qs, qi = _pad(qs, tq, _PAD_Q_SEGMENT), _pad(qi, tq, 0)
  ks, ki = _pad(ks, tk, _PAD_KV_SEGMENT), _pad(ki, tk, np.iinfo(np.int32).max)

  # [batch, kv_heads, q_blocks, group * bq, head_dim]: one query tile per kv head is one matmul.
  qt = _pad(q, tq, 0).reshape(batch, tq // bq, bq, kv_heads, group, head_dim)
  qt = qt.transpose(0, 3, 1, 4, 2, 5).reshape(batch, kv_heads, tq // bq, group * bq, head_dim)
  kt, vt = (_pad(x, tk, 0).reshape(batch, tk // bk, bk, kv_heads, head_dim).transpose(0, 3, 1, 2, 4)
            for x in (k, v))  # [batch, kv_heads, kv_blocks, bk, head_dim]
  ids = (qs.reshape(batch, -1, bq), ks.reshape(batch, -1, bk), qi.reshape(batch, -1, bq),
         ki.reshape(batch, -1, bk))
  out = _attention(qt, kt, vt, *ids, causal, scale, group)
  out = out.reshape(batch, kv_heads, tq // bq, group, bq, head_dim).transpose(0, 2, 4, 1, 3, 5)
  return out.reshape(batch, tq, heads, head_dim)[:, :q_len]


def _pad(x: jax.Array, n: int, value) -> jax.Array:
  if x.shape[1] == n:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, n - x.shape[1])
  return jnp.pad(x, widths, constant_values=value)


class _Ids(NamedTuple):
  """Per-block integers: q_segment, kv_segment `[batch, blocks, block]`, q_index, kv_index likewise."""
  qs: jax.Array
  ks: jax.Array
  qi: jax.Array
  ki: jax.Array


SKIP, FULL, PARTIAL = 0, 1, 2  # what a tile needs: nothing, no mask, the mask


def _tile_kinds(ids: _Ids, causal: bool) -> jax.Array:
  """`[q_blocks, kv_blocks]` int32, from per-block intervals of the ids (over every batch element):

  SKIP     no row can see any key of the tile (conservative: a kept tile may still be empty);
  FULL     every row sees every key (one shared segment, all keys causally before all rows):
           computed without a mask, the case of most tiles below the causal diagonal;
  PARTIAL  the rest, computed with the `[rows, keys]` mask of the tile.
  """
  def span(x):
    return x.min(-1), x.max(-1)  # [batch, blocks]
  (qs_lo, qs_hi), (ks_lo, ks_hi), (qi_lo, qi_hi), (ki_lo, ki_hi) = map(span, ids)
  keep = (ks_hi[:, None, :] >= qs_lo[:, :, None]) & (ks_lo[:, None, :] <= qs_hi[:, :, None])
  one_segment = ((qs_lo == qs_hi)[:, :, None] & (ks_lo == ks_hi)[:, None, :]
                 & (qs_lo[:, :, None] == ks_lo[:, None, :]))
  full = one_segment
  if causal:
    keep &= ki_lo[:, None, :] <= qi_hi[:, :, None]
    full &= ki_hi[:, None, :] <= qi_lo[:, :, None]
  return jnp.where(full.all(0), FULL, jnp.where(keep.any(0), PARTIAL, SKIP)).astype(jnp.int32)


def _tile_mask(ids: _Ids, i, j, causal: bool, group: int) -> jax.Array:
  """`[batch, 1, group * bq, bk]`: the visible keys of tile (i, j), rows ordered (group, bq)."""
  qs, qi = ids.qs[:, i], ids.qi[:, i]  # [batch, bq]
  ks, ki = ids.ks[:, j], ids.ki[:, j]  # [batch, bk]
  mask = qs[:, :, None] == ks[:, None, :]
  if causal:
    mask &= ki[:, None, :] <= qi[:, :, None]
  return jnp.tile(mask, (1, group, 1))[:, None]


def _scores(q_tile: jax.Array, k_tile: jax.Array, mask: jax.Array | None) -> jax.Array:
  """`[batch, kv_heads, group * bq, bk]` float32; hidden keys get `_NEG`, so exp() makes them 0."""
  s = jnp.einsum("bkqh,bksh->bkqs", q_tile, k_tile, preferred_element_type=jnp.float32)
  return s if mask is None else jnp.where(mask, s, _NEG)


def _by_kind(kind: jax.Array, visit, carry):
  """Runs `visit(carry, masked)` as the tile's kind asks (nothing for SKIP)."""
  return jax.lax.switch(kind, [lambda c: c, functools.partial(visit, masked=False),
                               functools.partial(visit, masked=True)], carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, qs, ks, qi, ki, causal, scale, group):
  return _forward(q, k, v, _Ids(qs, ks, qi, ki), causal, scale, group)[0]


# Why `jax.checkpoint` on both passes: inside the decoder's layer scan, JAX's partial evaluation of
# the scan hoists every loop-invariant piece of the tile loops (the masks, which depend only on the
# integer ids) out of the loops, stacked over all (q block, kv block) tiles: 2 GiB of booleans per
# layer at 8K tokens, quadratic again. A checkpoint with nothing saveable is opaque to that split.
@functools.partial(jax.checkpoint, static_argnums=(4, 5, 6), policy=jax.checkpoint_policies.nothing_saveable)
def _forward(q, k, v, ids: _Ids, causal, scale, group):
  """Returns out `[batch, kv_heads, q_blocks, group * bq, head_dim]` and lse `[..., group * bq]`."""
  n_q, n_k = q.shape[2], k.shape[2]
  kinds = _tile_kinds(ids, causal)

  def query_block(i):
    q_tile = (q[:, :, i] * scale).astype(q.dtype)
    shape = q_tile.shape[:-1]

    def kv_step(j, carry):
      def visit(carry, masked):
        # A row with no visible key yet keeps m = _NEG and sums exp(0) = 1 per hidden key; the
        # first visible key sets a real m and the correction exp(_NEG - m) = 0 erases that. Every
        # real row sees itself, so only padding rows end with such sums (and they are cropped).
        m, l, acc = carry
        s = _scores(q_tile, k[:, :, j], _tile_mask(ids, i, j, causal, group) if masked else None)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum("bkqs,bksh->bkqh", p.astype(v.dtype), v[:, :, j], preferred_element_type=jnp.float32)
        return m_new, l * correction + p.sum(-1), acc * correction[..., None] + pv
      return _by_kind(kinds[i, j], visit, carry)

    init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (q.shape[-1],), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_k, kv_step, init)
    seen = l > 0  # a row whose every tile was skipped (padding) gives 0 and an lse nothing matches
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -_NEG)
    return out.astype(q.dtype), lse

  out, lse = jax.lax.map(query_block, jnp.arange(n_q))  # [q_blocks, batch, kv_heads, rows, ...]
  return jnp.moveaxis(out, 0, 2), jnp.moveaxis(lse, 0, 2)


def _attention_fwd(q, k, v, qs, ks, qi, ki, causal, scale, group):
  out, lse = _forward(q, k, v, _Ids(qs, ks, qi, ki), causal, scale, group)
  return out, (q, k, v, qs, ks, qi, ki, out, lse)


def _attention_bwd(causal, scale, group, residuals, d_out):
  q, k, v, qs, ks, qi, ki, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, _Ids(qs, ks, qi, ki), out, lse, d_out, causal, scale, group)
  no_grad = [np.zeros(x.shape, jax.dtypes.float0) for x in (qs, ks, qi, ki)]
  return (dq, dk, dv, *no_grad)


@functools.partial(jax.checkpoint, static_argnums=(7, 8, 9), policy=jax.checkpoint_policies.nothing_saveable)
def _backward(q, k, v, ids: _Ids, out, lse, d_out, causal, scale, group):
  n_q, n_k = q.shape[2], k.shape[2]
  kinds = _tile_kinds(ids, causal)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [batch, kv_heads, n_q, rows]

  def kv_block(dq, j):
    k_tile, v_tile = k[:, :, j], v[:, :, j]

    def q_step(i, carry):
      # Only the tile-sized dK, dV ride through the switch; dQ's row block is added after it, so the
      # whole dQ buffer is never a branch output (which XLA would copy on every tile).
      def visit(carry, masked):
        dk, dv, _ = carry
        q_tile = q[:, :, i]
        mask = _tile_mask(ids, i, j, causal, group) if masked else None
        s = _scores((q_tile * scale).astype(q.dtype), k_tile, mask)
        p = jnp.exp(s - lse[:, :, i, :, None])  # [batch, kv_heads, rows, bk]; hidden keys: 0
        do = d_out[:, :, i]
        dv = dv + jnp.einsum("bkqs,bkqh->bksh", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkqh,bksh->bkqs", do, v_tile, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, :, i, :, None]) * scale).astype(q.dtype)
        dk = dk + jnp.einsum("bkqs,bkqh->bksh", ds, q_tile, preferred_element_type=jnp.float32)
        return dk, dv, jnp.einsum("bkqs,bksh->bkqh", ds, k_tile, preferred_element_type=jnp.float32)
      dq, dk, dv = carry
      dk, dv, dq_i = _by_kind(kinds[i, j], visit, (dk, dv, jnp.zeros(dq.shape[:2] + dq.shape[3:], jnp.float32)))
      return jax.lax.dynamic_update_index_in_dim(dq, dq[:, :, i] + dq_i, i, axis=2), dk, dv

    zeros = jnp.zeros(k_tile.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(0, n_q, q_step, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(n_k))
  dk, dv = (jnp.moveaxis(x, 0, 2).astype(k.dtype) for x in (dk, dv))
  return dq.astype(q.dtype), dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)
