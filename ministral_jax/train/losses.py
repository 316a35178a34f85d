"""Losses computed from hidden states in chunks, so `[batch, seq, vocab]` logits never exist.

With a 131,072-token vocabulary the logits dominate memory: at seq 4096 one
fp32 copy is 2 GiB per sequence, and distillation needs the teacher's too,
plus their gradients. Both losses here walk the sequence in chunks of
`seq_chunk` tokens and the vocabulary in chunks of `vocab_chunk` columns,
holding one `[batch, seq_chunk, vocab_chunk]` block at a time:

- forward: per token, streaming softmax statistics (running max and sum,
  and for distillation the teacher-weighted logit gap), sequence-outer;
- backward (a custom VJP): vocabulary-outer, sequence-inner. For each
  vocabulary chunk the gradient of the head's columns is summed over the
  sequence and written into the head's gradient in place, so nothing larger
  than that gradient itself is ever stored.

Matmuls run in the hidden states' dtype with fp32 accumulation; every
softmax statistic is fp32. Both functions return `(loss_sum, token_count)`
summed over tokens with mask 1, so a caller can add microbatches and divide
once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_PAD_LOGIT = -1e9  # padded vocabulary columns: exp() underflows to exactly 0, no inf - inf
_INIT_MAX = -1e30  # the running max starts below any logit, and finite


def _vocab_chunks(head: jax.Array, vocab_chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """head `[D, V]` (padded to a multiple of the chunk only if needed), the additive padding bias
  `[n, vocab_chunk]` and each chunk's first column `[n]`. Chunks are cut with `dynamic_slice`
  inside the loops, so no transposed copy of a `[D, V]` matrix is made."""
  v = head.shape[1]
  vocab_chunk = min(vocab_chunk, v)
  n = -(-v // vocab_chunk)
  if n * vocab_chunk != v:
    head = jnp.pad(head, ((0, 0), (0, n * vocab_chunk - v)))
  bias = jnp.where(jnp.arange(n * vocab_chunk) < v, 0.0, _PAD_LOGIT).astype(jnp.float32)
  return head, bias.reshape(n, vocab_chunk), jnp.arange(n) * vocab_chunk


def _seq_chunks(x: jax.Array | None, c: int) -> jax.Array | None:
  """`[B, T, ...]` -> `[n, B, c, ...]`, zero-padded (None stays None)."""
  if x is None:
    return None
  t = x.shape[1]
  n = -(-t // c)
  x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(x.shape[0], n, c, *x.shape[2:]), 1, 0)


def _unchunk(x: jax.Array, t: int) -> jax.Array:
  """`[n, B, c, ...]` -> `[B, T, ...]`."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _logits(h: jax.Array, head: jax.Array, start: jax.Array, bias: jax.Array) -> jax.Array:
  """`[B, c, D]` times the head's columns [start, start + vc) -> fp32 `[B, c, vc]`."""
  w = jax.lax.dynamic_slice_in_dim(head, start, bias.shape[-1], axis=1).astype(h.dtype)
  return jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32) + bias


def _lse_fold(m: jax.Array, s: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Folds a chunk z `[..., vc]` into a streaming logsumexp (max m, sum s); returns the rescale too."""
  m_new = jnp.maximum(m, jnp.max(z, axis=-1))
  rescale = jnp.exp(m - m_new)
  return m_new, s * rescale + jnp.sum(jnp.exp(z - m_new[..., None]), axis=-1), rescale


# ---------------------------------------------------------------------------
# The two losses as one mechanism: a per-token statistic pass and the logit
# gradient. `kind` is "ce" (student vs targets) or "kd" (student vs teacher).
# ---------------------------------------------------------------------------
def _token_stats(kind, hs, ws, ht, wt, targets, inv_t, bias, starts):
  """Per-token statistics `[B, c]` of one sequence chunk, streaming over the vocabulary."""
  zeros = jnp.zeros(hs.shape[:2], jnp.float32)

  def step(carry, xs):
    b, start = xs
    zs = _logits(hs, ws, start, b) * inv_t
    ms, ss, _ = _lse_fold(carry["ms"], carry["ss"], zs)
    out = dict(ms=ms, ss=ss)
    if kind == "ce":
      hit = (targets - start)[..., None] == jnp.arange(zs.shape[-1])
      out["picked"] = carry["picked"] + jnp.sum(jnp.where(hit, zs, 0.0), axis=-1)
    else:
      zt = _logits(ht, wt, start, b) * inv_t
      mt, st, rescale = _lse_fold(carry["mt"], carry["st"], zt)
      gap = jnp.sum(jnp.exp(zt - mt[..., None]) * (zt - zs), axis=-1)
      out.update(mt=mt, st=st, gap=carry["gap"] * rescale + gap)
    return out, None

  init = dict(ms=zeros + _INIT_MAX, ss=zeros)
  init.update(dict(picked=zeros) if kind == "ce" else dict(mt=zeros + _INIT_MAX, st=zeros, gap=zeros))
  acc, _ = jax.lax.scan(step, init, (bias, starts))
  stats = {"lse_s": acc["ms"] + jnp.log(acc["ss"])}
  if kind == "ce":
    stats["loss"] = stats["lse_s"] - acc["picked"]
  else:
    stats["lse_t"] = acc["mt"] + jnp.log(acc["st"])
    stats["loss"] = acc["gap"] / acc["st"] - stats["lse_t"] + stats["lse_s"]
  return stats


def _dlogits(kind, h, ws, ht, wt, targets, stats, start, b, inv_t):
  """d(token loss)/d(student logits) for one `[B, c, vc]` block."""
  zs = _logits(h, ws, start, b) * inv_t
  p_s = jnp.exp(zs - stats["lse_s"][..., None])
  if kind == "ce":
    return p_s - ((targets - start)[..., None] == jnp.arange(zs.shape[-1]))
  p_t = jnp.exp(_logits(ht, wt, start, b) * inv_t - stats["lse_t"][..., None])
  return (p_s - p_t) * inv_t


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7, 8, 9, 10))
def _chunked(kind, hs, ws, ht, wt, targets, mask, inv_t, scale, seq_chunk, vocab_chunk):
  return _chunked_fwd(kind, hs, ws, ht, wt, targets, mask, inv_t, scale, seq_chunk, vocab_chunk)[0]


def _chunked_fwd(kind, hs, ws, ht, wt, targets, mask, inv_t, scale, seq_chunk, vocab_chunk):
  c = min(seq_chunk, hs.shape[1])
  ws_p, bias, starts = _vocab_chunks(ws, vocab_chunk)
  wt_p = _vocab_chunks(wt, vocab_chunk)[0] if kind == "kd" else ws_p

  def per_chunk(_, xs):
    h, h_t, tgt = xs
    return None, _token_stats(kind, h, ws_p, h_t, wt_p, tgt, inv_t, bias, starts)
  _, stats = jax.lax.scan(per_chunk, None, (_seq_chunks(hs, c), _seq_chunks(ht, c), _seq_chunks(targets, c)))
  stats = {k: _unchunk(v, hs.shape[1]) for k, v in stats.items()}
  loss = jnp.sum(stats.pop("loss") * mask) * scale
  return loss, (hs, ws, ht, wt, targets, mask, stats)


def _chunked_bwd(kind, inv_t, scale, seq_chunk, vocab_chunk, res, g):
  hs, ws, ht, wt, targets, mask, stats = res
  t, c = hs.shape[1], min(seq_chunk, hs.shape[1])
  ws_p, bias, starts = _vocab_chunks(ws, vocab_chunk)
  wt_p = _vocab_chunks(wt, vocab_chunk)[0] if kind == "kd" else ws_p
  weight = _seq_chunks(mask * (g * scale), c)  # [n, B, c]
  seq_xs = (_seq_chunks(hs, c), _seq_chunks(ht, c), _seq_chunks(targets, c),
            weight, {k: _seq_chunks(v, c) for k, v in stats.items()})

  def vocab_step(carry, xs):  # one vocabulary chunk: all of its sequence chunks
    dh, dw = carry
    b, start = xs

    def seq_step(dw_chunk, ys):
      h, h_t, tgt, wgt, st = ys
      dz = _dlogits(kind, h, ws_p, h_t, wt_p, tgt, st, start, b, inv_t) * wgt[..., None]  # [B, c, vc]
      w = jax.lax.dynamic_slice_in_dim(ws_p, start, b.shape[-1], axis=1)
      dh_chunk = jnp.einsum("bcv,dv->bcd", dz.astype(h.dtype), w.astype(h.dtype),
                            preferred_element_type=jnp.float32)
      return dw_chunk + jnp.einsum("bcd,bcv->dv", h, dz.astype(h.dtype), preferred_element_type=jnp.float32), dh_chunk
    dw_chunk, dh_chunks = jax.lax.scan(seq_step, jnp.zeros((ws.shape[0], b.shape[-1]), jnp.float32), seq_xs)
    dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_chunk.astype(dw.dtype), start, axis=1)
    return (dh + dh_chunks, dw), None

  init = (jnp.zeros((weight.shape[0], *hs.shape[:1], c, hs.shape[2]), jnp.float32), jnp.zeros_like(ws_p))
  (dh, dw), _ = jax.lax.scan(vocab_step, init, (bias, starts))
  dh = _unchunk(dh, t).astype(hs.dtype)
  dw = dw[:, :ws.shape[1]]
  return dh, dw, None, None, None, None  # the teacher, targets and mask get no gradient


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array, *,
                  seq_chunk: int = 512, vocab_chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
  """Next-token NLL summed over masked tokens. hidden `[B, T, D]`, head `[D, V]`, targets `[B, T]`."""
  mask = mask.astype(jnp.float32)
  loss = _chunked("ce", hidden, head, None, None, targets, mask, 1.0, 1.0, seq_chunk, vocab_chunk)
  return loss, jnp.sum(mask)


def kd_loss(student_hidden: jax.Array, student_head: jax.Array, teacher_hidden: jax.Array,
            teacher_head: jax.Array, mask: jax.Array, *, temperature: float = 1.0, scale_by_t2: bool = True,
            seq_chunk: int = 512, vocab_chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
  """Forward KL(teacher || student) over the full vocabulary, summed over masked tokens.

  With z = logits / T, per token KL = E_{p_t}[z_t - z_s] - lse(z_t) + lse(z_s);
  the expectation streams with the teacher's online logsumexp. With T != 1
  the loss is multiplied by T^2 (Hinton et al.), which keeps the gradient
  scale independent of T; `scale_by_t2=False` turns that off. The teacher
  receives no gradient. Student and teacher may differ in width, not in vocabulary.
  """
  if student_head.shape[1] != teacher_head.shape[1]:
    raise ValueError(f"Student vocabulary ({student_head.shape[1]}) != teacher vocabulary "
                     f"({teacher_head.shape[1]}): distillation needs one tokenizer.")
  teacher_hidden, teacher_head = jax.lax.stop_gradient((teacher_hidden, teacher_head))
  mask = mask.astype(jnp.float32)
  scale = float(temperature) ** 2 if scale_by_t2 and temperature != 1.0 else 1.0
  loss = _chunked("kd", student_hidden, student_head, teacher_hidden, teacher_head, None, mask,
                  1.0 / float(temperature), scale, seq_chunk, vocab_chunk)
  return loss, jnp.sum(mask)


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
