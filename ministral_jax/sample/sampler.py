"""The rollout engine: batched KV-cache sampling shared by evals, GRPO and ODPO.

One prefill runs the right-padded prompts; each prompt's cache is then
copied `samples` times along the batch (the prompt is never recomputed per
sample), and one token per row is decoded per loop trip until every row has
met one of its stop tokens or the length limit (a `while_loop`: no fixed
trip count). Row b's prompt fills cache slots 0..len_b-1 and its generated
tokens go to slots len_b, len_b+1, ... (cache slot == position, see
`model/transformer.py`); the padding slots a row wrote during prefill lie
beyond its position and are overwritten before it can attend to them.

Each sampled token comes back with its log-probability under the policy it
was drawn from, log softmax(logits / T) (T = 1 for greedy), which is exactly
what a trainer recomputes from the same params, so the first importance
ratio of a GRPO update is 1 up to numerics. top-k and top-p only restrict
which tokens can be drawn; the returned log-probability is the untruncated
one (a trainer that samples with them trains on a slightly different policy:
leave them off for GRPO, as its config does).

Shapes are bucketed (prompt width and batch rounded up to powers of two), so
a run compiles a handful of programs, not one per batch. On a mesh the rows
are split over the data axes and the params keep the shardings they have
(e.g. the live training state's); nothing goes through the host but the
prompts in and the tokens out.

Where the time goes (`python -m benchmarks.sampler`): a decode step is a
batch of skinny matmuls, so anything that touches every weight or the whole
cache per step costs as much as the step itself. The loop therefore keeps
the weights sliced per layer once, before it, and its own per-layer cache
written in place (`_decode`), and it draws with one uniform number per row
and thresholds found by bisection, not a sort of the vocab (`_draw`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ministral_jax import multihost
from ministral_jax.errors import UserError
from ministral_jax.model import layers, rope, transformer, vision
from ministral_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How tokens are drawn (hashable: part of the compiled program)."""
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
  top_k: int = 0  # 0: all tokens
  max_new_tokens: int = 128

  def check(self) -> list[str]:
    problems = []
    if self.temperature < 0:
      problems.append(f"temperature={self.temperature!r}: 0 (greedy) or positive")
    if not 0.0 < self.top_p <= 1.0:
      problems.append(f"top_p={self.top_p!r}: in (0, 1]")
    if self.top_k < 0:
      problems.append(f"top_k={self.top_k!r}: 0 (off) or positive")
    if self.max_new_tokens < 1:
      problems.append(f"max_new_tokens={self.max_new_tokens!r}: at least 1")
    return problems


class Rollout(NamedTuple):
  """Generated rows, prompt-major: row p * samples + s is sample s of prompt p."""
  tokens: np.ndarray  # [rows, max_new_tokens] int32: the sampled tokens, pad_id after the stop
  logprobs: np.ndarray  # [rows, max_new_tokens] float32: log pi_T(token); 0 after the stop
  lengths: np.ndarray  # [rows] tokens generated, the stop token included
  stopped: np.ndarray  # [rows] bool: ended on a stop token (False: cut by the length limit)
  steps: int  # decode trips the loop ran (<= max_new_tokens)

  def completions(self) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def bucket(n: int, minimum: int = 8) -> int:
  """The power of two >= max(n, minimum): one compiled program serves every size up to it."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists into `[batch, max(max_len, width)]` and returns their lengths."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("Every prompt needs at least one token (e.g. BOS).")
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.full((len(prompts), max(int(lengths.max()), width)), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, lengths


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def prefill(params: Any, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, cache_len: int,
            images: vision.Images | None = None) -> tuple[jax.Array, transformer.Cache]:
  """Runs the prompts (their images, if any, through the ViT once); returns the logits at each row's last
  real token `[batch, vocab]` and the cache. The LM head runs on those last positions only: over the whole
  prompt it would cost batch x width x vocab, more than the rest of a small model's prefill."""
  batch, seq = tokens.shape
  cache = transformer.init_cache(cfg, batch, cache_len)
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  model = transformer.Transformer(cfg)
  hidden, cache = model.apply({"params": params}, tokens, positions, cache=cache, images=images, return_hidden=True)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [batch, 1, d_model]
  return model.apply({"params": params}, last, method=transformer.Transformer.logits)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode_step(params: Any, cfg: ModelConfig, token: jax.Array, position: jax.Array,
                cache: transformer.Cache) -> tuple[jax.Array, transformer.Cache]:
  """token, position `[batch]` -> next-token logits `[batch, vocab]`, updated cache."""
  logits, cache = transformer.Transformer(cfg).apply(
      {"params": params}, token[:, None], position[:, None], cache=cache)
  return logits[:, 0], cache


def policy_logits(logits: jax.Array, temperature: float) -> jax.Array:
  """The logits of the distribution a token is drawn from and scored under (fp32)."""
  logits = logits.astype(jnp.float32)
  return logits / temperature if temperature > 0 else logits


def _ordered(x: jax.Array) -> jax.Array:
  """float32 -> int32 keys in the same order (-0.0 counted as 0.0), so that a threshold over the logits
  can be found exactly by bisection over integers."""
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _bisect(lo: jax.Array, hi: jax.Array, holds, largest: bool) -> jax.Array:
  """Per row, the largest int32 t in [lo, hi] where `holds(t)` (holds at lo and is monotone: true, then
  false) or the smallest (`largest=False`: holds at hi; false, then true). 32 halvings cover any int32 range."""
  def step(_, bounds):
    lo, hi = bounds
    half = (lo >> 1) + (hi >> 1)  # overflow-free mean, rounded up for `largest`, down otherwise
    if largest:
      mid = half + ((lo | hi) & 1)
      ok = holds(mid)
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
    mid = half + (lo & hi & 1)
    ok = holds(mid)
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)
  return jax.lax.fori_loop(0, 32, step, (lo, hi))[0 if largest else 1]


def _truncate(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """True for the tokens that may be drawn `[batch, vocab]`: inside the top-k tokens and inside the nucleus
  (the smallest prefix of tokens sorted by probability whose mass reaches top_p, renormalised after top-k;
  ties with its least likely token are kept, and so is the most likely token).

  Each threshold is a logit value found by bisection, 32 passes of one compare-and-reduce over the vocab,
  instead of a sort of the vocab (a sort per step was ~4x a whole greedy step on CPU). The thresholds are
  exact: the k-th largest logit, and the smallest logit whose more likely tokens hold less than top_p.
  """
  keys = _ordered(logits)
  lo, hi = jnp.min(keys, axis=-1, keepdims=True), jnp.max(keys, axis=-1, keepdims=True)
  keep = jnp.ones(logits.shape, bool)
  if top_k and top_k < logits.shape[-1]:
    kth = _bisect(lo, hi, lambda t: jnp.sum(keys >= t, axis=-1, keepdims=True) >= top_k, largest=True)
    keep = keys >= kth
  if top_p < 1.0:
    weights = jnp.where(keep, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
    mass = top_p * jnp.sum(weights, axis=-1, keepdims=True)
    above = lambda t: jnp.sum(jnp.where(keys > t, weights, 0.0), axis=-1, keepdims=True)
    threshold = _bisect(lo, hi, lambda t: above(t) < mass, largest=False)
    keep = keep & (keys >= threshold)
  return keep


def _first_index(hit: jax.Array) -> jax.Array:
  """The first index along the last axis where `hit` is True (the last index if it is True nowhere): argmax as
  two plain reductions. `jnp.argmax`'s reduction over (value, index) pairs was ~6x slower on CPU, 10% of a
  greedy step at batch 64."""
  last = hit.shape[-1] - 1
  return jnp.min(jnp.where(hit, jnp.arange(hit.shape[-1], dtype=jnp.int32), last), axis=-1)


def _draw(logits: jax.Array, rng: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
  """-> (tokens `[batch]`, their log-probabilities under the untruncated policy `[batch]`).

  Sampling inverts the CDF of the (truncated) policy with one uniform number per row: a cumulative sum over
  the vocab, where `jax.random.categorical` would draw a Gumbel number per token (on CPU those random bits
  cost more than the rest of the draw). The log-probability is computed as `jax.nn.log_softmax` does.
  """
  scaled = policy_logits(logits, s.temperature)
  top = jnp.max(scaled, axis=-1, keepdims=True)
  shifted = scaled - top
  weights = jnp.exp(shifted)
  if s.temperature == 0.0:
    token = _first_index(scaled == top)  # jnp.argmax: the first most likely token
  else:
    if s.top_k or s.top_p < 1.0:
      weights = jnp.where(_truncate(scaled, s.top_k, s.top_p), weights, 0.0)
    cdf = jnp.cumsum(weights, axis=-1)
    total = cdf[:, -1:]
    u = jax.random.uniform(rng, total.shape, jnp.float32) * total
    last = _first_index(cdf >= total)  # the last token of nonzero weight: never pass it
    token = jnp.minimum(jnp.sum(cdf <= u, axis=-1, dtype=jnp.int32), last)
  log_total = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
  logp = jnp.take_along_axis(shifted, token[:, None], axis=-1)[:, 0] - log_total
  return token, logp


# The decode loop keeps its own cache: one array per layer, `[batch, kv_heads, cache_len, head_dim]`. Each is a
# separate loop-carried buffer, so a step writes its new key in place and attention reads the layer's keys as
# they lie, contracting head_dim (their last axis) without a transposed copy. The model's stacked
# `[layers, batch, cache_len, kv_heads, head_dim]` cache (what `prefill` and `decode_step` use) would be sliced,
# transposed and re-stacked by every step: copies of the whole cache, more time than the step's matmuls.
DECODE_CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_sequence", None)
LayerCache = tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]  # keys, values: one array per layer


def _constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  return nn.with_logical_constraint(x, axes)


def _decode_cache(cache: transformer.Cache, samples: int, cache_len: int) -> LayerCache:
  """prefill's stacked cache of the prompts -> the decode layout, each prompt's rows copied `samples` times and
  the sequence padded to `cache_len`."""
  def convert(stacked):
    out = []
    for layer in range(stacked.shape[0]):
      c = jnp.swapaxes(stacked[layer], 1, 2)  # [prompts, kv_heads, width, head_dim]
      c = jnp.pad(c, ((0, 0), (0, 0), (0, cache_len - c.shape[2]), (0, 0)))
      out.append(_constrain(jnp.repeat(c, samples, axis=0), DECODE_CACHE_AXES))
    return tuple(out)
  return convert(cache[0]), convert(cache[1])


def _layer_params(params: Any, n_layers: int) -> list[Any]:
  """The stacked `layers/...` params, one tree per layer (sliced once, before the loop: a slice inside it
  would copy every weight on every step)."""
  return [jax.tree.map(lambda x: x[i], params["layers"]) for i in range(n_layers)]


def _decode(params: Any, layer_params: list[Any], cfg: ModelConfig, token: jax.Array, position: jax.Array,
            cache: LayerCache) -> tuple[jax.Array, LayerCache]:
  """`decode_step` on the decode layout: token, position `[batch]` -> logits `[batch, vocab]`, cache.

  The same computation as `Transformer.apply` with a cache (its norms, feed-forward, RoPE, query temperature
  and LM head are called as they are); only the attention is written out, for the layout: scores in fp32,
  scaled, masked to the slots at or before each row's position, softmax, weighted values, as
  `attention_kernels.attend`'s XLA path computes them.
  """
  dt = jnp.dtype(cfg.dtype)
  prec = None if cfg.matmul_precision == "default" else cfg.matmul_precision
  keys, values = list(cache[0]), list(cache[1])
  batch, n_kv, cache_len, head_dim = keys[0].shape
  group = cfg.n_heads // n_kv
  residual_axes = ("activation_batch", "activation_length", "activation_embed")
  norm = lambda scale, x: layers.RMSNorm(cfg).apply({"params": {"scale": scale}}, x)
  rows = jnp.arange(batch)
  positions = position[:, None]
  (cos, sin), q_scale = transformer.position_tables(cfg, positions, dt)
  visible = (jnp.arange(cache_len)[None, :] <= positions)[:, None, None, :]  # [batch, 1, 1, cache_len]
  h = _constrain(jnp.take(params["tok_embeddings"], token[:, None], axis=0).astype(dt), residual_axes)
  for i, p in enumerate(layer_params):
    a = p["attention"]
    x = norm(p["attention_norm"]["scale"], h)
    q = jnp.einsum("btd,dnh->btnh", x, a["wq"].astype(dt), precision=prec)
    k = jnp.einsum("btd,dkh->btkh", x, a["wk"].astype(dt), precision=prec)
    v = jnp.einsum("btd,dkh->btkh", x, a["wv"].astype(dt), precision=prec)
    q = rope.apply_rope(q, cos, sin) * q_scale
    k = rope.apply_rope(k, cos, sin)
    keys[i] = _constrain(keys[i].at[rows, :, position].set(k[:, 0].astype(keys[i].dtype)), DECODE_CACHE_AXES)
    values[i] = _constrain(values[i].at[rows, :, position].set(v[:, 0].astype(values[i].dtype)),
                           DECODE_CACHE_AXES)
    q = _constrain(q[:, 0].reshape(batch, n_kv, group, head_dim), ("activation_batch", "activation_kv_heads",
                                                                    None, None))
    scores = jnp.einsum("bkgh,bksh->bkgs", q, keys[i].astype(dt), preferred_element_type=jnp.float32)
    scores = jnp.where(visible, scores * jnp.float32(head_dim ** -0.5), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkgs,bksh->bkgh", probs, values[i].astype(dt)).reshape(batch, 1, cfg.n_heads * head_dim)
    h = h + jnp.einsum("btf,fd->btd", out, a["wo"].reshape(-1, cfg.d_model).astype(dt), precision=prec)
    h = h + layers.FeedForward(cfg).apply({"params": p["feed_forward"]}, norm(p["ffn_norm"]["scale"], h))
    h = _constrain(h, residual_axes)
  h = norm(params["norm"]["scale"], h)
  logits = transformer.Transformer(cfg).apply({"params": params}, h, method=transformer.Transformer.logits)
  return logits[:, 0], (tuple(keys), tuple(values))


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "samples"))
def _rollout(params, cfg: ModelConfig, tokens, lengths, stop_ids, rng, sampling: Sampling, samples: int,
             images: vision.Images | None = None):
  """tokens `[prompts, width]`, lengths `[prompts]`, stop_ids `[prompts, n_stop]` (-1: none) ->
  generated tokens, log-probs `[prompts * samples, max_new]`, lengths, stopped `[prompts * samples]`, trips."""
  n_new = sampling.max_new_tokens
  logits, cache = prefill(params, cfg, tokens, lengths, tokens.shape[1], images)  # the prompts' slots only
  cache = _decode_cache(cache, samples, tokens.shape[1] + n_new)
  copy = lambda x: jnp.repeat(x, samples, axis=0)  # each prompt's state, once per sample
  logits, position, stop_ids = copy(logits), copy(lengths), copy(stop_ids)
  layer_params = _layer_params(params, cfg.n_layers)
  batch = logits.shape[0]
  out = jnp.full((batch, n_new), cfg.pad_id, jnp.int32)
  logps = jnp.zeros((batch, n_new), jnp.float32)
  done = jnp.zeros((batch,), bool)

  def cond(state):
    i, done = state[0], state[-1]
    return (i < n_new) & ~jnp.all(done)

  def body(state):
    i, logits, cache, position, out, logps, done = state
    token, logp = _draw(logits, jax.random.fold_in(rng, i), sampling)
    token = jnp.where(done, cfg.pad_id, token)
    out = out.at[:, i].set(token)
    logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
    done = done | jnp.any(token[:, None] == stop_ids, axis=-1)
    logits, cache = _decode(params, layer_params, cfg, token, position, cache)
    return i + 1, logits, cache, position + 1, out, logps, done

  state = (jnp.zeros((), jnp.int32), logits, cache, position, out, logps, done)
  trips, _, _, _, out, logps, done = jax.lax.while_loop(cond, body, state)
  is_stop = jnp.any(out[:, :, None] == stop_ids[:, None, :], axis=-1)  # [batch, n_new]
  first_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, n_new)
  written = jnp.arange(n_new)[None, :] < first_stop[:, None]
  return jnp.where(written, out, cfg.pad_id), logps, first_stop.astype(jnp.int32), done, trips


def rollout(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]], sampling: Sampling,
            rng: jax.Array, samples: int = 1, stop_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
            partitioner=None, width: int = 0, images: Sequence[Sequence[np.ndarray]] | None = None
            ) -> Rollout:
  """`samples` continuations of every prompt (this process's prompts; on a pod each process passes its own
  rows of the global batch and gets its own rows back).

  `stop_ids`: one list for every prompt, or a list per prompt (default: the model's EOS). `width` fixes the
  padded prompt width (default: the bucket of the longest prompt). With a `partitioner` the rows are split
  over its data axes; its mesh must be active (`partitioner.activate()`). `images`: per prompt, its
  preprocessed images (`[3, H, W]`, `data/images.py`) in the order of its `[IMG]` runs.
  """
  problems = sampling.check() + ([] if samples >= 1 else [f"samples={samples!r}: at least 1"])
  if problems:
    raise UserError("The sampling settings have problems:\n  " + "\n  ".join(problems))
  stops = _stop_table(stop_ids, len(prompts), cfg.eos_id)
  tokens, lengths = pad_prompts(prompts, cfg.pad_id, width or bucket(max(len(p) for p in prompts)))
  longest = int(lengths.max())
  if longest + sampling.max_new_tokens > cfg.max_seq_len:
    raise UserError(f"A prompt of {longest} tokens + max_new_tokens={sampling.max_new_tokens} exceeds the "
                    f"model's max_seq_len {cfg.max_seq_len}; shorten the prompt or the length limit.")
  n = len(prompts)
  rows = bucket(n, 1)
  if partitioner is not None:  # every process pads its rows alike, to a multiple of its batch shards
    shards = max(1, partitioner.axis_size(partitioner.spec(("activation_batch",))[0]) // jax.process_count())
    rows = -(-rows // shards) * shards
  pad = lambda x: np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)]) if rows > n else x
  args = [pad(tokens), pad(lengths), pad(stops)]
  if images is not None:
    vision.check_image_tokens(prompts, images, cfg)
    per_row = list(images) + [images[-1]] * (rows - n)
    need = max(sum(vision.patch_count(p, cfg) for p in row) for row in per_row)
    args.append(vision.pack_images(per_row, bucket(need, cfg.spatial_merge_size ** 2), cfg.vision_patch_size,
                                   cfg.spatial_merge_size))
  if partitioner is not None:
    args = partitioner.shard_batch(args)
  out = _rollout(params, cfg, *[jnp.asarray(a) for a in args[:3]], rng, sampling, samples, *args[3:])
  fetch = multihost.local_rows if partitioner is not None else multihost.host_value  # own rows / every row
  toks, logps, lens, stopped = (fetch(x) for x in out[:4])
  trips = int(multihost.host_value(out[4]))
  keep = n * samples
  return Rollout(toks[:keep], logps[:keep], lens[:keep], stopped[:keep].astype(bool), trips)


def _stop_table(stop_ids, n: int, eos_id: int) -> np.ndarray:
  if stop_ids is None:
    stop_ids = [eos_id]
  per_row = [list(s) for s in stop_ids] if stop_ids and isinstance(stop_ids[0], (list, tuple, np.ndarray)) \
      else [list(stop_ids)] * n
  if len(per_row) != n:
    raise UserError(f"stop_ids has {len(per_row)} rows for {n} prompts; give one list, or one per prompt.")
  table = np.full((n, max(1, max(map(len, per_row)))), -1, np.int32)
  for i, s in enumerate(per_row):
    table[i, :len(s)] = s
  return table


def generate(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, rng: jax.Array | None = None, eos_id: int | None = None,
             prompt_width: int = 0, top_p: float = 1.0, top_k: int = 0,
             images: Sequence[Sequence[np.ndarray]] | None = None) -> list[list[int]]:
  """Greedy (temperature 0) or sampled continuations of every prompt (with its `images`, if any); each ends
  after its first EOS (`eos_id=-1`: never stops early). On a pod, every process passes and gets back every
  row."""
  eos = cfg.eos_id if eos_id is None else eos_id
  sampling = Sampling(float(temperature), float(top_p), int(top_k), int(max_new_tokens))
  rng = jax.random.key(0) if rng is None else rng
  out = rollout(params, cfg, prompts, sampling, rng, stop_ids=[eos], width=prompt_width, images=images)
  return out.completions()
