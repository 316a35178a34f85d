"""GRPO's arithmetic, with Magistral's five changes as switches (arXiv 2506.10910, §2.1).

For a group of G samples of one prompt with rewards r_1..r_G, and a token t of
sample i with probability ratio rho = pi(t) / pi_old(t) against the policy
that sampled it:

    A_i        = r_i - mean(r)                          (3: no group std; classic GRPO divides by it)
    A_i       <- (A_i - mean_mb A) / std_mb A           (3: over the sequences of each minibatch)
    loss_t     = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i)    (4: eps_high 0.28 > eps_low 0.2)
               [+ beta * k3(pi_ref || pi)]               (1: off, no reference model)
    loss       = sum_t loss_t / (tokens generated)      (2: classic GRPO: mean over sequences of their
                                                             per-token mean)
    groups with all rewards equal are dropped           (5: they carry no signal, but would still count
                                                             in (2)'s denominator and in (3)'s statistics)

Everything here is a pure function of arrays, so tests can compare it with
a hand computation and with peers (tunix, TRL).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

EPS = 1e-6  # in every std division, as tunix and TRL


@dataclasses.dataclass(frozen=True)
class Settings:
  """The switches (hashable: part of the compiled step). `magistral()` is the default recipe."""
  kl_beta: float = 0.0  # (1) 0: no KL term, no reference model
  token_sum: bool = True  # (2) sum of token losses / total generated tokens
  minibatch_advantage: bool = True  # (3) r - group mean, then normalised per minibatch
  eps_low: float = 0.2
  eps_high: float = 0.28  # (4) clip-higher; equal to eps_low turns it off
  drop_flat_groups: bool = True  # (5)

  @classmethod
  def from_config(cls, g) -> "Settings":
    m = g.magistral
    return cls(kl_beta=0.0 if m.no_kl else g.kl_beta, token_sum=m.token_sum,
               minibatch_advantage=m.minibatch_advantage, eps_low=g.eps_low,
               eps_high=g.eps_high if m.clip_higher else g.eps_low, drop_flat_groups=m.drop_flat_groups)


def group_advantages(rewards: jax.Array, s: Settings) -> tuple[jax.Array, jax.Array]:
  """rewards `[prompts, G]` -> advantages and kept (1.0 / 0.0) `[prompts, G]`, before any minibatch step."""
  centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)
  if not s.minibatch_advantage:  # classic GRPO: the group's std (unbiased, as tunix and TRL)
    centred = centred / (jnp.std(rewards, axis=1, keepdims=True, ddof=1) + EPS)
  flat = jnp.max(rewards, axis=1, keepdims=True) == jnp.min(rewards, axis=1, keepdims=True)
  kept = jnp.where(flat & s.drop_flat_groups, 0.0, 1.0) * jnp.ones_like(rewards)
  return centred, kept


def normalize_minibatch(advantages: jax.Array, kept: jax.Array, s: Settings) -> jax.Array:
  """`[rows]` advantages of one minibatch -> (A - mean) / std over its kept sequences (change 3)."""
  if not s.minibatch_advantage:
    return advantages
  n = jnp.maximum(jnp.sum(kept), 1.0)
  mean = jnp.sum(advantages * kept) / n
  std = jnp.sqrt(jnp.sum(jnp.square(advantages - mean) * kept) / n)
  return (advantages - mean) / (std + EPS)


def k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """Per-token estimate of KL(pi || pi_ref) from samples of pi: e^(ref - logp) - (ref - logp) - 1 >= 0."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def token_losses(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, s: Settings,
                 ref_logp: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """logp, old_logp `[rows, T]`, advantages `[rows]` -> per-token loss `[rows, T]` and whether the
  clipped branch was taken (its gradient is 0) `[rows, T]`."""
  ratio = jnp.exp(logp - old_logp)
  a = advantages[:, None]
  unclipped, clipped = ratio * a, jnp.clip(ratio, 1.0 - s.eps_low, 1.0 + s.eps_high) * a
  loss = -jnp.minimum(unclipped, clipped)
  if s.kl_beta:
    loss = loss + s.kl_beta * k3(logp, ref_logp)
  return loss, clipped < unclipped


def aggregate(per_token: jax.Array, mask: jax.Array, s: Settings) -> tuple[jax.Array, jax.Array]:
  """-> (loss_sum, count) whose ratio is the minibatch loss: tokens summed over the tokens generated
  (change 2), or the mean over sequences of each sequence's token mean. `mask` `[rows, T]` is 1 on the
  kept sequences' generated tokens."""
  summed = jnp.sum(jnp.where(mask != 0, per_token * mask, 0.0), axis=1)
  if s.token_sum:
    return jnp.sum(summed), jnp.sum(mask)
  n = jnp.sum(mask, axis=1)
  has = n > 0
  return jnp.sum(jnp.where(has, summed / jnp.maximum(n, 1.0), 0.0)), jnp.sum(has.astype(jnp.float32))


def surrogate_sums(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, kept: jax.Array,
                   mask: jax.Array, s: Settings, ref_logp: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(loss_sum, count, statistics summed over live tokens) of some rows whose advantages are already
  normalised: sums add up over microbatches, and loss_sum / count is the minibatch loss."""
  per_token, clipped = token_losses(logp, old_logp, advantages, s, ref_logp)
  live = mask * kept[:, None]
  loss_sum, count = aggregate(per_token, live, s)
  stats = {"clip_fraction": jnp.sum(clipped * live),
           "kl_sampling": jnp.sum(k3(jax.lax.stop_gradient(logp), old_logp) * live),
           "live_tokens": jnp.sum(live)}
  if s.kl_beta:
    stats["kl_reference"] = jnp.sum(k3(jax.lax.stop_gradient(logp), ref_logp) * live)
  return loss_sum, count, stats


def per_token_stats(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Summed statistics -> means over live tokens (and the live-token count itself)."""
  tokens = jnp.maximum(stats["live_tokens"], 1.0)
  return {k: (v if k == "live_tokens" else v / tokens) for k, v in stats.items()}


def minibatch_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, kept: jax.Array,
                   mask: jax.Array, s: Settings, ref_logp: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss of one minibatch (a mean) and its per-token statistics, from per-token log-probs `[rows, T]`,
  per-sequence advantages and kept flags `[rows]`, and the generated-token mask `[rows, T]`."""
  adv = normalize_minibatch(advantages, kept, s)
  loss_sum, count, stats = surrogate_sums(logp, old_logp, adv, kept, mask, s, ref_logp)
  return loss_sum / jnp.maximum(count, 1.0), per_token_stats(stats)
