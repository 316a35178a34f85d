"""Losses computed from hidden states in chunks, so `[batch, seq, vocab]` logits never exist.

With a 131,072-token vocabulary the logits dominate memory: at seq 4096 one
fp32 copy is 2 GiB per sequence, and distillation needs the teacher's too,
plus their gradients. Both losses here walk the sequence in chunks of
`seq_chunk` tokens (an outer `lax.scan`) and, inside a chunk, the vocabulary
in chunks of `vocab_chunk` columns (an inner `lax.scan`) with streaming
softmax statistics. Each chunk's body is rematerialised (`jax.checkpoint`),
so the backward pass recomputes one `[batch, seq_chunk, vocab_chunk]` block
at a time instead of storing logits. Matmuls run in the hidden states' dtype
with fp32 accumulation; every softmax statistic is fp32.

Both functions return `(loss_sum, token_count)`: sums over tokens with
mask 1, so that a caller can add microbatches and divide once.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_PAD_LOGIT = -1e9  # padded vocabulary columns: exp() underflows to exactly 0, no inf - inf
_INIT_MAX = -1e30  # the running max starts below any logit, and finite (no inf in any gradient)


def _vocab_chunks(head: jax.Array, vocab_chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """head `[D, V]` (padded to a multiple of the chunk only if needed), the additive padding bias
  `[n, vocab_chunk]` and each chunk's first column `[n]`.

  Chunks are cut with `dynamic_slice` inside the scan rather than by reshaping
  the head, so no transposed copy of a `[D, V]` matrix is ever made.
  """
  v = head.shape[1]
  vocab_chunk = min(vocab_chunk, v)
  n = -(-v // vocab_chunk)
  if n * vocab_chunk != v:
    head = jnp.pad(head, ((0, 0), (0, n * vocab_chunk - v)))
  bias = jnp.where(jnp.arange(n * vocab_chunk) < v, 0.0, _PAD_LOGIT).astype(jnp.float32)
  return head, bias.reshape(n, vocab_chunk), jnp.arange(n) * vocab_chunk


def _slice(head: jax.Array, start: jax.Array, size: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(head, start, size, axis=1)


def _logits(h: jax.Array, w: jax.Array, bias: jax.Array) -> jax.Array:
  """`[B, c, D] @ [D, vc]` in the input dtype, accumulated and returned in fp32."""
  return jnp.einsum("bcd,dv->bcv", h, w.astype(h.dtype), preferred_element_type=jnp.float32) + bias


def _online_lse(m: jax.Array, s: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Streaming logsumexp: folds a chunk z `[B, c, vc]` into (max m, sum s); returns the rescale too."""
  m_new = jnp.maximum(m, jnp.max(z, axis=-1))
  rescale = jnp.exp(m - m_new)
  return m_new, s * rescale + jnp.sum(jnp.exp(z - m_new[..., None]), axis=-1), rescale


def _over_sequence(per_chunk: Callable, arrays: tuple[jax.Array, ...], mask: jax.Array,
                   seq_chunk: int) -> tuple[jax.Array, jax.Array]:
  """Sums `per_chunk(*chunk_arrays) * mask` over sequence chunks `[B, seq_chunk, ...]`."""
  t = mask.shape[1]
  c = min(seq_chunk, t)
  n = -(-t // c)

  def split(x):  # [B, T, ...] -> [n, B, c, ...], zero-padded
    x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, c, *x.shape[2:]), 1, 0)
  mask = mask.astype(jnp.float32)

  @jax.checkpoint
  def body(total, xs):
    *chunk, m = xs
    return total + jnp.sum(per_chunk(*chunk) * m), None
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), tuple(split(a) for a in arrays) + (split(mask),))
  return total, jnp.sum(mask)


def cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array, *,
                  seq_chunk: int = 512, vocab_chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
  """Next-token NLL summed over masked tokens. hidden `[B, T, D]`, head `[D, V]`, targets `[B, T]`."""
  head, bias, starts = _vocab_chunks(head, vocab_chunk)
  size = bias.shape[1]

  def per_chunk(h, tgt):  # [B, c, D], [B, c] -> NLL [B, c]
    @jax.checkpoint
    def step(carry, xs):
      m, s, picked = carry
      b, offset = xs
      z = _logits(h, _slice(head, offset, size), b)
      m, s, _ = _online_lse(m, s, z)
      hit = (tgt - offset)[..., None] == jnp.arange(z.shape[-1])
      return (m, s, picked + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)), None
    zeros = jnp.zeros(tgt.shape, jnp.float32)
    (m, s, picked), _ = jax.lax.scan(step, (zeros + _INIT_MAX, zeros, zeros), (bias, starts))
    return m + jnp.log(s) - picked
  return _over_sequence(per_chunk, (hidden, targets), mask, seq_chunk)


def kd_loss(student_hidden: jax.Array, student_head: jax.Array, teacher_hidden: jax.Array,
            teacher_head: jax.Array, mask: jax.Array, *, temperature: float = 1.0, scale_by_t2: bool = True,
            seq_chunk: int = 512, vocab_chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
  """Forward KL(teacher || student) over the full vocabulary, summed over masked tokens.

  One streaming pass per sequence chunk: with z = logits / T, per token
  KL = E_{p_t}[z_t - z_s] - lse(z_t) + lse(z_s), where the expectation is
  accumulated with the same online rescaling as the teacher's logsumexp.
  With T != 1 the loss is multiplied by T^2 (Hinton et al.), which keeps the
  gradient scale independent of T; `scale_by_t2=False` turns that off.
  The teacher receives no gradient.
  """
  if student_head.shape[1] != teacher_head.shape[1]:
    raise ValueError(f"Student vocabulary ({student_head.shape[1]}) != teacher vocabulary "
                     f"({teacher_head.shape[1]}): distillation needs one tokenizer.")
  teacher_hidden, teacher_head = jax.lax.stop_gradient((teacher_hidden, teacher_head))
  student_head, bias, starts = _vocab_chunks(student_head, vocab_chunk)
  teacher_head, _, _ = _vocab_chunks(teacher_head, vocab_chunk)
  size = bias.shape[1]
  inv_t = 1.0 / temperature

  def per_chunk(hs, ht):  # [B, c, Ds], [B, c, Dt] -> KL [B, c]
    @jax.checkpoint
    def step(carry, xs):
      ms, ss, mt, st, expected = carry
      b, start = xs
      zs = _logits(hs, _slice(student_head, start, size), b) * inv_t
      zt = _logits(ht, _slice(teacher_head, start, size), b) * inv_t
      ms, ss, _ = _online_lse(ms, ss, zs)
      mt_new, st, rescale = _online_lse(mt, st, zt)
      gap = jnp.sum(jnp.exp(zt - mt_new[..., None]) * (zt - zs), axis=-1)
      return (ms, ss, mt_new, st, expected * rescale + gap), None
    zeros = jnp.zeros(hs.shape[:2], jnp.float32)
    init = (zeros + _INIT_MAX, zeros, zeros + _INIT_MAX, zeros, zeros)
    (ms, ss, mt, st, expected), _ = jax.lax.scan(step, init, (bias, starts))
    return expected / st - (mt + jnp.log(st)) + (ms + jnp.log(ss))

  total, count = _over_sequence(per_chunk, (student_hidden, teacher_hidden), mask, seq_chunk)
  if scale_by_t2 and temperature != 1.0:
    total = total * temperature**2
  return total, count


def naive_cross_entropy(hidden, head, targets, mask) -> tuple[jax.Array, jax.Array]:
  """Reference: full fp32 logits."""
  logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype),
                                       preferred_element_type=jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def naive_kd_loss(student_hidden, student_head, teacher_hidden, teacher_head, mask, *, temperature=1.0,
                  scale_by_t2=True) -> tuple[jax.Array, jax.Array]:
  """Reference: full fp32 logits of both models."""
  def logp(h, w):
    return jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w.astype(h.dtype),
                                         preferred_element_type=jnp.float32) / temperature, axis=-1)
  lt = jax.lax.stop_gradient(logp(teacher_hidden, teacher_head))
  ls = logp(student_hidden, student_head)
  kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
  mask = mask.astype(jnp.float32)
  scale = temperature**2 if scale_by_t2 and temperature != 1.0 else 1.0
  return jnp.sum(kl * mask) * scale, jnp.sum(mask)
