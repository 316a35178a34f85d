"""Batched KV-cache sampling: one prefill over right-padded prompts, then one token per step.

Prompts of different lengths share a batch without left padding: row b's
prompt fills cache slots 0..len_b-1, and its generated tokens go to slots
len_b, len_b+1, ... (cache slot == position, see `model/transformer.py`).
The padding slots a row wrote during prefill lie beyond its position and are
overwritten before it can attend to them. Shared by evals, ODPO and GRPO.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ministral_jax import multihost
from ministral_jax.errors import UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ModelConfig


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists into `[batch, max(max_len, width)]` and returns their lengths (a fixed `width`
  keeps one compiled program for batches of different prompts)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("Every prompt needs at least one token (e.g. BOS).")
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.full((len(prompts), max(int(lengths.max()), width)), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, lengths


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def prefill(params: Any, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, cache_len: int
            ) -> tuple[jax.Array, transformer.Cache]:
  """Runs the prompts; returns the logits at each row's last real token `[batch, vocab]` and the cache."""
  batch, seq = tokens.shape
  cache = transformer.init_cache(cfg, batch, cache_len)
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  logits, cache = transformer.Transformer(cfg).apply({"params": params}, tokens, positions, cache=cache)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return last, cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode_step(params: Any, cfg: ModelConfig, token: jax.Array, position: jax.Array,
                cache: transformer.Cache) -> tuple[jax.Array, transformer.Cache]:
  """token, position `[batch]` -> next-token logits `[batch, vocab]`, updated cache."""
  logits, cache = transformer.Transformer(cfg).apply(
      {"params": params}, token[:, None], position[:, None], cache=cache)
  return logits[:, 0], cache


def _choose(logits: jax.Array, rng: jax.Array, temperature: float) -> jax.Array:
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits.astype(jnp.float32) / temperature).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "eos_id"))
def _generate(params, cfg: ModelConfig, tokens, lengths, rng, max_new_tokens: int, temperature: float,
              eos_id: int):
  cache_len = tokens.shape[1] + max_new_tokens
  logits, cache = prefill(params, cfg, tokens, lengths, cache_len)
  batch = tokens.shape[0]

  def step(i, state):
    logits, cache, position, out, done, rng = state
    rng, sub = jax.random.split(rng)
    token = _choose(logits, sub, temperature)
    token = jnp.where(done, eos_id, token)
    out = out.at[:, i].set(token)
    done = done | (token == eos_id)
    logits, cache = decode_step(params, cfg, token, position, cache)
    return logits, cache, position + 1, out, done, rng

  out = jnp.full((batch, max_new_tokens), eos_id, jnp.int32)
  state = (logits, cache, lengths, out, jnp.zeros((batch,), bool), rng)
  return jax.lax.fori_loop(0, max_new_tokens, step, state)[3]


def generate(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, rng: jax.Array | None = None, eos_id: int | None = None,
             prompt_width: int = 0) -> list[list[int]]:
  """Greedy (temperature 0) or sampled continuations; each stops after its first EOS."""
  eos = cfg.eos_id if eos_id is None else eos_id
  tokens, lengths = pad_prompts(prompts, cfg.pad_id, prompt_width)
  if tokens.shape[1] + max_new_tokens > cfg.max_seq_len:
    raise UserError(f"Prompt ({tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the "
                     f"model's max_seq_len {cfg.max_seq_len}.")
  rng = jax.random.key(0) if rng is None else rng
  out = multihost.host_value(_generate(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), rng,
                                      max_new_tokens, float(temperature), int(eos)))  # on a pod: every row
  result = []
  for row in out.tolist():
    result.append(row[:row.index(eos) + 1] if eos in row else row)
  return result
