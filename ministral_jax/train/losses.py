"""Losses computed from hidden states in chunks, so `[batch, seq, vocab]` logits never exist.

Why: with Ministral 3's 131,072-token vocabulary the logits dominate training
memory. At seq 4096 a single fp32 copy is 2 GiB per sequence. Autodiff keeps
that copy and its softmax for the backward, and distillation needs the
teacher's as well. The transformer blocks need far less (with remat, a few
`[seq, d_model]` activations per layer). So every loss here works from the
final hidden states `[B, T, D]` and the LM head `[D, V]`, and only ever
holds a `[B, seq_chunk, vocab_chunk]` block of logits.

One mechanism serves all the losses (`_token_losses`, a custom VJP). Each
loss is a set of per-token *terms*: "ce" (next-token NLL) and "kd" (forward
KL teacher || student). Both passes walk the vocabulary in the outer loop and
the sequence in the inner loop:

- forward: streaming (online) softmax statistics per token: running max and
  sum, the target's logit, and for KD the teacher-weighted logit gap. These
  are rescaled when the teacher's max grows, so KD takes one pass and runs
  each teacher matmul once per block.
- backward: recomputes each block's logits from the saved per-token
  logsumexps. The head's gradient for one vocabulary chunk is summed over the
  whole sequence in fp32, then written once. So nothing larger than the
  gradients themselves (plus one `[D, vocab_chunk]` fp32 accumulator) is stored.

Sizes that are not multiples of the chunks: the last chunk is moved back so
that it ends at T (or V), and the part it shares with the previous chunk is
masked. In the forward, the shared columns get logit `_PAD_LOGIT` and the
shared tokens keep their statistics. In the backward, neither adds to `dh`
a second time. So neither the head nor the hidden states are ever padded
(copied).

Matmuls run in the hidden states' dtype with fp32 accumulation, and every
softmax statistic is fp32. Losses return `(loss_sum, token_count)` summed
over tokens with mask != 0, so a caller can add microbatches and divide once.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec

from ministral_jax.errors import UserError
from ministral_jax.model import context_parallel

# Masked logits: exp() of them underflows to exactly 0. They are finite, not
# -inf, so that the KD gap's (z_t - z_s) at a masked column is 0 rather than
# inf - inf = nan. The running max starts lower still.
_PAD_LOGIT = -1e9
_INIT_MAX = -1e30
Terms = tuple[str, ...]  # a subset of ("ce", "kd"), static


# ---------------------------------------------------------------------------
# Chunking machinery (shared by every loss, forward and backward).
# ---------------------------------------------------------------------------
def _sweep(size: int, chunk: int, body: Callable[..., Any], carry: Any, consts: Any) -> Any:
  """`carry = body(carry, consts, start, fresh)` for each chunk `[start, start + c)` of `range(size)`.

  `c = min(chunk, size)`. The last chunk starts at `size - c`, and `fresh`
  (`[c]` bool) marks the elements that no earlier chunk covered. `consts`
  holds the arrays the body slices. It rides in the loop state behind an
  optimization barrier, so XLA cannot hoist a whole-array op out of the loop.
  (XLA:CPU upcasts each bf16 `dynamic-slice` to fp32, and hoisting that would
  keep an fp32 copy of every bf16 head.)
  """
  c = min(chunk, size)

  def step(state, i):
    carry, consts = jax.lax.optimization_barrier(state)
    start = jnp.minimum(i * c, size - c)
    return (body(carry, consts, start, start + jnp.arange(c) >= i * c), consts), None
  return jax.lax.scan(step, (carry, consts), jnp.arange(-(-size // c)))[0][0]


def _take(tree: Any, start: jax.Array, n: int) -> Any:
  """Slices `[start, start + n)` of axis 1 of every leaf: tokens of `[B, T, ...]`, columns of `[D, V]`."""
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, n, axis=1), tree)


def _put(tree: Any, start: jax.Array, new: Any) -> Any:
  return jax.tree.map(lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, start, axis=1), tree, new)


def _logits(h: jax.Array, w: jax.Array) -> jax.Array:
  """`[B, c, D]` x `[D, vc]` in h's dtype, accumulated and returned in fp32 `[B, c, vc]`."""
  return jnp.einsum("bcd,dv->bcv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def _block(terms: Terms, inv_t: float, h, w, h_t, w_t, valid: jax.Array | None) -> dict[str, jax.Array]:
  """The fp32 logits `[B, c, vc]` of one block that `terms` need: "c" student (for CE), "s"
  student / T and "t" teacher / T (for KD). Columns outside `valid` `[vc]` (owned by an
  earlier chunk) are masked to `_PAD_LOGIT`, unless `valid` is None."""
  mask = (lambda z: z) if valid is None else (lambda z: jnp.where(valid, z, _PAD_LOGIT))
  raw = _logits(h, w)
  z = {"c": mask(raw)} if "ce" in terms else {}
  if "kd" in terms:
    z.update(s=mask(raw * inv_t), t=mask(_logits(h_t, w_t) * inv_t))
  return z


def _hit(targets: jax.Array, start: jax.Array, valid: jax.Array, owned_only: bool = True) -> jax.Array:
  """`[B, c, vc]`: the target's column (if this chunk owns it, with `owned_only`)."""
  hit = (targets - start)[..., None] == jnp.arange(valid.shape[0])
  return hit & valid if owned_only else hit


# ---------------------------------------------------------------------------
# Per-token losses: forward statistics and the logit gradient.
# ---------------------------------------------------------------------------
def _fold(acc: dict, z: dict, hit: jax.Array | None) -> dict:
  """Folds one block into the running statistics of its tokens: (max, sum) per logit set,
  the target logit ("picked") and the teacher-weighted gap sum_v e^(z_t - m_t) (z_t - z_s)."""
  new = {}
  for k, zk in z.items():
    m, s = acc[k]
    m_new = jnp.maximum(m, jnp.max(zk, axis=-1))
    new[k] = (m_new, s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(zk - m_new[..., None]), axis=-1))
  if "c" in z:
    new["picked"] = acc["picked"] + jnp.sum(jnp.where(hit, z["c"], 0.0), axis=-1)
  if "t" in z:
    m_t = new["t"][0]
    gap = jnp.sum(jnp.exp(z["t"] - m_t[..., None]) * (z["t"] - z["s"]), axis=-1)
    new["gap"] = acc["gap"] * jnp.exp(acc["t"][0] - m_t) + gap
  return new


def _forward(terms: Terms, inv_t: float, seq_chunk: int, vocab_chunk: int, hs, ws, ht, wt, targets):
  """Per-token losses `{term: [B, T]}` and the logsumexps `{"c"|"s"|"t": [B, T]}` the backward needs."""
  (b, t), v = hs.shape[:2], ws.shape[1]
  full = lambda x: jnp.full((b, t), x, jnp.float32)
  keys = (["c"] if "ce" in terms else []) + (["s", "t"] if "kd" in terms else [])
  init: dict[str, Any] = {k: (full(_INIT_MAX), full(0.0)) for k in keys}
  if "ce" in terms:
    init["picked"] = full(0.0)
  if "kd" in terms:
    init["gap"] = full(0.0)

  def vocab_body(stats, consts, v0, valid):
    w_s, w_t = _take(consts[:2], v0, valid.shape[0])  # [D, vc] columns of the two heads

    def seq_body(stats, tokens, t0, fresh):
      h, h_t, tgt = _take(tokens, t0, fresh.shape[0])  # [B, c, D_s], [B, c, D_t], [B, c]
      old = _take(stats, t0, fresh.shape[0])
      new = _fold(old, _block(terms, inv_t, h, w_s, h_t, w_t, valid),
                  _hit(tgt, v0, valid) if "ce" in terms else None)
      return _put(stats, t0, jax.tree.map(lambda n, o: jnp.where(fresh, n, o), new, old))
    return _sweep(t, seq_chunk, seq_body, stats, consts[2:])

  stats = _sweep(v, vocab_chunk, vocab_body, init, (ws, wt, hs, ht, targets))
  lse = {k: stats[k][0] + jnp.log(stats[k][1]) for k in keys}
  losses = {}
  if "ce" in terms:
    losses["ce"] = lse["c"] - stats["picked"]
  if "kd" in terms:  # KL = E_pt[z_t - z_s] - lse_t + lse_s
    losses["kd"] = stats["gap"] / stats["t"][1] - lse["t"] + lse["s"]
  return losses, lse


def _dlogits(z: dict, lse: dict, hit, g: dict, inv_t: float) -> jax.Array:
  """d(sum_terms g_term * loss_term)/d(raw student logits) for one block, fp32 `[B, c, vc]`."""
  p = {k: jnp.exp(zk - lse[k][..., None]) for k, zk in z.items()}
  dz = 0.0
  if "c" in z:
    dz = dz + (p["c"] - hit) * g["ce"][..., None]
  if "t" in z:
    dz = dz + (p["s"] - p["t"]) * (inv_t * g["kd"])[..., None]
  return dz


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _token_losses(terms: Terms, inv_t: float, seq_chunk: int, vocab_chunk: int, hs, ws, ht, wt, targets):
  """`{term: [B, T] fp32}` per-token losses; gradients flow to the student only.

  hs `[B, T, D_s]`, ws `[D_s, V]`; ht `[B, T, D_t]`, wt `[D_t, V]` (None without "kd");
  targets `[B, T]` int (None without "ce"). `inv_t` = 1 / temperature, for "kd" only.
  """
  return _forward(terms, inv_t, seq_chunk, vocab_chunk, hs, ws, ht, wt, targets)[0]


def _per_token(terms: Terms, inv_t: float, seq_chunk: int, vocab_chunk: int, hs, ws, ht, wt, targets):
  """`_token_losses`, with a sequence split over the context mesh axis folded into the batch first.

  The chunk loops slice the sequence dynamically, which XLA cannot do on a
  sharded axis (it would gather every token onto every device). `[B, T]` ->
  `[B * C, T / C]`, batch-sharded over the batch and context axes, keeps each
  device's tokens on that device; the per-token losses are unfolded after.
  """
  plan = context_parallel.current_plan()
  if plan is None or plan.context is None or hs.shape[1] % plan.context_size:
    return _token_losses(terms, inv_t, seq_chunk, vocab_chunk, hs, ws, ht, wt, targets)
  b, t, c = hs.shape[0], hs.shape[1], plan.context_size
  axes = tuple(a for group in (plan.batch, plan.context) if group is not None
               for a in ((group,) if isinstance(group, str) else group))

  def fold(x):
    if x is None:
      return None
    x = x.reshape(b * c, t // c, *x.shape[2:])
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes, *(None,) * (x.ndim - 1)))
  out = _token_losses(terms, inv_t, seq_chunk, vocab_chunk, fold(hs), ws, fold(ht), wt, fold(targets))
  return {k: v.reshape(b, t) for k, v in out.items()}


def _token_losses_fwd(terms, inv_t, seq_chunk, vocab_chunk, hs, ws, ht, wt, targets):
  losses, lse = _forward(terms, inv_t, seq_chunk, vocab_chunk, hs, ws, ht, wt, targets)
  return losses, (hs, ws, ht, wt, targets, lse)


def _token_losses_bwd(terms, inv_t, seq_chunk, vocab_chunk, res, g):
  hs, ws, ht, wt, targets, lse = res
  (t, d), v = hs.shape[1:], ws.shape[1]

  # Every column of a chunk is real, so the logits go unmasked: the gradient of the last
  # chunk's overlap is computed again, exactly, and `dw` is only ever written, never read.
  # Only its dh contribution is masked, since the previous chunk already added it.
  def vocab_body(carry, consts, v0, valid):
    dh, dw = carry
    w_s, w_t = _take(consts[:2], v0, valid.shape[0])

    def seq_body(carry, tokens, t0, fresh):
      dh, dw_chunk = carry
      h, h_t, tgt, lse_c, g_c = _take(tokens, t0, fresh.shape[0])
      g_c = jax.tree.map(lambda x: x * fresh, g_c)  # tokens of an earlier chunk: no second gradient
      z = _block(terms, inv_t, h, w_s, h_t, w_t, None)
      dz = _dlogits(z, lse_c, _hit(tgt, v0, valid, False) if "ce" in terms else None, g_c, inv_t)
      dz, dz_owned = dz.astype(h.dtype), jnp.where(valid, dz, 0.0).astype(h.dtype)  # [B, c, vc]
      dh_c = jnp.einsum("bcv,dv->bcd", dz_owned, w_s.astype(h.dtype), preferred_element_type=jnp.float32)
      dw_chunk += jnp.einsum("bcd,bcv->dv", h, dz, preferred_element_type=jnp.float32)
      return _put(dh, t0, _take(dh, t0, fresh.shape[0]) + dh_c), dw_chunk

    dw_chunk = jnp.zeros((d, valid.shape[0]), jnp.float32)
    dh, dw_chunk = _sweep(t, seq_chunk, seq_body, (dh, dw_chunk), consts[2:])
    return dh, _put(dw, v0, dw_chunk.astype(dw.dtype))

  init = (jnp.zeros(hs.shape, jnp.float32), jnp.zeros_like(ws))  # dh [B, T, D_s], dw [D_s, V]
  dh, dw = _sweep(v, vocab_chunk, vocab_body, init, (ws, wt, hs, ht, targets, lse, g))
  return dh.astype(hs.dtype), dw, None, None, None  # teacher and targets: no gradient


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


# ---------------------------------------------------------------------------
# Public losses.
# ---------------------------------------------------------------------------
def _masked_sum(per_token: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(sum of mask * loss, sum of mask)`; a token with mask 0 adds exactly 0, even if its loss is nan."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(mask != 0, per_token * mask, 0.0)), jnp.sum(mask)


def _check(hidden: jax.Array, head: jax.Array, who: str, seq_chunk: int, vocab_chunk: int) -> None:
  if hidden.ndim != 3 or head.ndim != 2 or hidden.shape[2] != head.shape[0]:
    raise ValueError(f"{who} hidden {hidden.shape} and head {head.shape} must be [B, T, D] and [D, V].")
  if seq_chunk < 1 or vocab_chunk < 1:
    raise UserError(f"seq_chunk={seq_chunk} and vocab_chunk={vocab_chunk} must be positive.")


def _check_teacher(s_hidden, s_head, t_hidden, t_head, seq_chunk: int, vocab_chunk: int) -> None:
  _check(s_hidden, s_head, "Student", seq_chunk, vocab_chunk)
  _check(t_hidden, t_head, "Teacher", seq_chunk, vocab_chunk)
  if s_head.shape[1] != t_head.shape[1]:
    raise UserError(f"Student vocabulary ({s_head.shape[1]}) != teacher vocabulary ({t_head.shape[1]}): "
                     "logit distillation needs one tokenizer.")
  if s_hidden.shape[:2] != t_hidden.shape[:2]:
    raise ValueError(f"Student tokens {s_hidden.shape[:2]} != teacher tokens {t_hidden.shape[:2]}.")


def t2_scale(temperature: float, scale_by_t2: bool = True) -> float:
  """The factor on the KL: T^2 (Hinton et al. 2015) unless `scale_by_t2` is False; 1 at T = 1."""
  if temperature <= 0:
    raise UserError(f"temperature={temperature} must be positive.")
  return float(temperature) ** 2 if scale_by_t2 else 1.0


def cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array, *,
                  seq_chunk: int = 512, vocab_chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
  """Next-token NLL summed over tokens with mask != 0, and the mask's sum.

  hidden `[B, T, D]`, head `[D, V]`, targets `[B, T]` int (the token to predict at each
  position), mask `[B, T]` float or bool.
  """
  _check(hidden, head, "Model", seq_chunk, vocab_chunk)
  nll = _per_token(("ce",), 1.0, seq_chunk, vocab_chunk, hidden, head, None, None, targets)["ce"]
  return _masked_sum(nll, mask)


def kd_loss(student_hidden: jax.Array, student_head: jax.Array, teacher_hidden: jax.Array,
            teacher_head: jax.Array, mask: jax.Array, *, temperature: float = 1.0, scale_by_t2: bool = True,
            seq_chunk: int = 512, vocab_chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
  """Forward KL(teacher || student) over the full vocabulary, summed over tokens with mask != 0.

  Per token, with z = logits / T: KL = sum_v p_t(v) (log p_t(v) - log p_s(v)). The
  sum is multiplied by T^2 (Hinton et al. 2015; `scale_by_t2=True`, the default,
  which changes nothing at T = 1). The gradient w.r.t. the student's logits
  is then T (p_s - p_t), whose size is roughly independent of T (≈ (z_s - z_t
  - mean) / V for large T). Without the factor it shrinks as 1/T^2, so changing
  T would need a new learning rate or CE weight. `temperature` is a static Python float.
  The teacher is under `stop_gradient`. Student `[B, T, D_s]`/`[D_s, V]` and teacher
  `[B, T, D_t]`/`[D_t, V]` may differ in width, but not in vocabulary.
  """
  _check_teacher(student_hidden, student_head, teacher_hidden, teacher_head, seq_chunk, vocab_chunk)
  scale = t2_scale(temperature, scale_by_t2)
  teacher_hidden, teacher_head = jax.lax.stop_gradient((teacher_hidden, teacher_head))
  kl = _per_token(("kd",), 1.0 / float(temperature), seq_chunk, vocab_chunk, student_hidden,
                     student_head, teacher_hidden, teacher_head, None)["kd"]
  loss, count = _masked_sum(kl, mask)
  return loss * scale, count


def kd_with_ce(student_hidden: jax.Array, student_head: jax.Array, teacher_hidden: jax.Array,
               teacher_head: jax.Array, targets: jax.Array, mask: jax.Array, *, alpha: float = 1.0,
               temperature: float = 1.0, scale_by_t2: bool = True, seq_chunk: int = 512,
               vocab_chunk: int = 8192) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """`alpha * KL + (1 - alpha) * CE` (summed), the token count, and the parts `{"kl", "ce"}`.

  KL is `kd_loss` (T^2-scaled alike), and CE is `cross_entropy` at temperature 1. Both
  come from one sweep: the student's logits of each block are computed once. `alpha`
  is static. At 1 (the distill trainer's default: KL only) the CE is not computed, and
  at 0 the teacher is not used. A part that is not computed is absent from the dict.
  A trainer with a CE weight w calls this with `alpha = 1 - w`.
  """
  _check_teacher(student_hidden, student_head, teacher_hidden, teacher_head, seq_chunk, vocab_chunk)
  scale = t2_scale(temperature, scale_by_t2)
  terms = tuple(t for t, w in (("ce", 1.0 - alpha), ("kd", alpha)) if w != 0)
  teacher_hidden, teacher_head = jax.lax.stop_gradient((teacher_hidden, teacher_head))
  per_token = _per_token(terms, 1.0 / float(temperature), seq_chunk, vocab_chunk, student_hidden,
                            student_head, teacher_hidden, teacher_head, targets)
  parts = {name: _masked_sum(per_token[t], mask)[0] for name, t in (("kl", "kd"), ("ce", "ce")) if t in terms}
  if "kl" in parts:
    parts["kl"] = parts["kl"] * scale
  total = alpha * parts.get("kl", 0.0) + (1.0 - alpha) * parts.get("ce", 0.0)
  return total, jnp.sum(mask.astype(jnp.float32)), parts


# ---------------------------------------------------------------------------
# Full-logit references (tests, and the memory benchmark's baseline).
# ---------------------------------------------------------------------------
def _full_log_softmax(hidden: jax.Array, head: jax.Array, temperature: float = 1.0) -> jax.Array:
  """`[B, T, V]` fp32 log-probabilities: the tensor the chunked losses avoid."""
  logits = jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
  return jax.nn.log_softmax(logits / temperature, axis=-1)


def naive_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                        mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy` through full fp32 logits."""
  nll = -jnp.take_along_axis(_full_log_softmax(hidden, head), targets[..., None], axis=-1)[..., 0]
  return _masked_sum(nll, mask)


def naive_kd_loss(student_hidden: jax.Array, student_head: jax.Array, teacher_hidden: jax.Array,
                  teacher_head: jax.Array, mask: jax.Array, *, temperature: float = 1.0,
                  scale_by_t2: bool = True) -> tuple[jax.Array, jax.Array]:
  """`kd_loss` through full fp32 logits of both models."""
  log_pt = jax.lax.stop_gradient(_full_log_softmax(teacher_hidden, teacher_head, temperature))
  log_ps = _full_log_softmax(student_hidden, student_head, temperature)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)  # [B, T]
  loss, count = _masked_sum(kl, mask)
  return loss * t2_scale(temperature, scale_by_t2), count


# ---------------------------------------------------------------------------
# Per-token log-probabilities of given tokens (policy-gradient losses).
# ---------------------------------------------------------------------------
def token_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
                    seq_chunk: int = 512) -> tuple[jax.Array, jax.Array]:
  """`log softmax(logits / T)[target]` and the policy's entropy, both `[B, T]` fp32.

  The sequence goes through in chunks of `seq_chunk` tokens under `jax.checkpoint`, so only one
  `[B, seq_chunk, V]` block of logits exists at a time, in the forward and again in the backward. The
  entropy is a metric: no gradient flows through it.
  """
  _check(hidden, head, "Policy", seq_chunk, 1)
  b, t, d = hidden.shape
  c = min(seq_chunk, t)
  n = -(-t // c)
  pad = n * c - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))

  @jax.checkpoint
  def chunk(args):
    h, y = args  # [B, c, D], [B, c]
    logp_all = jax.nn.log_softmax(_logits(h, head) / temperature, axis=-1)  # [B, c, V]
    picked = jnp.take_along_axis(logp_all, y[..., None], axis=-1)[..., 0]
    p = jax.lax.stop_gradient(logp_all)
    return picked, -jnp.sum(jnp.exp(p) * p, axis=-1)

  split = lambda x: jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)
  logp, entropy = jax.lax.map(chunk, (split(hidden), split(targets)))
  merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * c)[:, :t]
  return merge(logp), merge(entropy)
