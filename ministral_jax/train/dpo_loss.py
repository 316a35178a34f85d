"""DPO's arithmetic, shared by offline DPO and Online DPO: the margin and the loss with hard or soft labels.

For a pair of responses (y1, y2) to one prompt, with sequence log-probabilities under the policy (log pi)
and under the frozen reference (log pi_ref):

    delta = beta * [(log pi(y1) - log pi_ref(y1)) - (log pi(y2) - log pi_ref(y2))]
    loss  = -[p * log sigmoid(delta) + (1 - p) * log sigmoid(-delta)]

p is the probability that y1 is the better response:
  - hard labels (sigmoid DPO, Rafailov et al. 2023): p = 1, y1 the chosen response;
  - label smoothing (cDPO): p = 1 - eps for every pair, what tunix and torchtune call `label_smoothing`;
  - soft labels (Ministral 3's Online DPO): p = the pairwise reward model's P(y1 > y2), per pair.
The loss is the binary cross-entropy between sigmoid(delta) and p, so for p < 1 its minimum is at the finite
margin delta = logit(p) instead of pushing delta to infinity; at p = 1/2 it pulls delta back to 0.

Everything here is a pure function of arrays, so tests compare it with a hand computation and with tunix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sequence_log_probs(token_log_probs: jax.Array, mask: jax.Array) -> jax.Array:
  """`[rows, T]` per-token log-probabilities of the response tokens, `[rows, T]` mask -> `[rows]` sums."""
  return jnp.sum(token_log_probs * mask, axis=-1)


def margin(policy_1: jax.Array, reference_1: jax.Array, policy_2: jax.Array, reference_2: jax.Array,
           beta: float | jax.Array) -> jax.Array:
  """`[pairs]` delta: beta times the difference of the two responses' log-ratios to the reference."""
  return beta * ((policy_1 - reference_1) - (policy_2 - reference_2))


def pair_losses(delta: jax.Array, label: float | jax.Array = 1.0) -> jax.Array:
  """`[pairs]` binary cross-entropy between sigmoid(delta) and `label` = P(y1 > y2) (1: hard labels)."""
  return -(label * jax.nn.log_sigmoid(delta) + (1.0 - label) * jax.nn.log_sigmoid(-delta))


def pair_stats(delta: jax.Array, label: float | jax.Array, beta: float | jax.Array, policy_1: jax.Array,
               reference_1: jax.Array, policy_2: jax.Array, reference_2: jax.Array) -> dict[str, jax.Array]:
  """Sums over pairs of what a DPO run logs (divide by the pair count): the implicit rewards
  beta * log(pi / pi_ref) of each side, the margin, and whether the policy ranks the pair as the label does."""
  reward_1, reward_2 = beta * (policy_1 - reference_1), beta * (policy_2 - reference_2)
  agrees = jnp.where(label >= 0.5, delta > 0, delta < 0)
  return {"reward_first": jnp.sum(reward_1), "reward_second": jnp.sum(reward_2), "margin": jnp.sum(delta),
          "ranking_accuracy": jnp.sum(agrees.astype(jnp.float32)), "label_mean": jnp.sum(label * jnp.ones_like(delta))}
