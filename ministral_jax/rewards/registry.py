"""Rewards by name: the one place a new reward registers (`grpo.rewards` picks them in the config).

A reward function scores a batch of responses: `fn(batch: Responses) -> [n] float`. The trainer sums the
configured rewards (each with its weight), applies the formatting gate (a reward of 0 for a response whose
reasoning format is broken, as Magistral does), then adds the soft length penalty.

    math     1 if the last \\boxed{} after the thinking equals the reference answer (math-verify, in a
             killable process pool)
    code     1 if the last ```python block after the thinking, followed by the reference (a test program of
             asserts), runs and exits 0 in the sandbox (`code_sandbox.run`: fresh interpreter, limits)
    format   1 if the response is one [THINK]...[/THINK] block followed by a boxed answer
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from ministral_jax.errors import UserError
from ministral_jax.rewards import code_sandbox
from ministral_jax.rewards import format as answer_format


@dataclasses.dataclass
class Responses:
  """A batch of decoded responses (control tokens rendered by name) and what grading needs."""
  texts: Sequence[str]
  references: Sequence[str]  # per response: the gold answer (math) or test program (code)
  verifier: object = None  # a `math_verifier.VerifierPool`, shared across steps


RewardFn = Callable[[Responses], np.ndarray]
REWARDS: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
  def add(fn: RewardFn) -> RewardFn:
    REWARDS[name] = fn
    return fn
  return add


def check_names(names: Sequence[str]) -> list[str]:
  return [f"reward {n!r} does not exist; registered: {sorted(REWARDS)} (add one with rewards.registry.register)"
          for n in names if n not in REWARDS]


def score(names: Sequence[str], batch: Responses) -> dict[str, np.ndarray]:
  """Each named reward's `[n]` scores."""
  if check_names(names):
    raise UserError("; ".join(check_names(names)))
  return {n: np.asarray(REWARDS[n](batch), np.float32) for n in names}


@register("math")
def math_correct(batch: Responses) -> np.ndarray:
  if batch.verifier is None:
    raise ValueError("The math reward needs a VerifierPool in Responses.verifier.")
  answers = [answer_format.strip_thinking(t) for t in batch.texts]
  return np.asarray(batch.verifier.verify(answers, list(batch.references)), np.float32)


_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def code_of(text: str) -> str | None:
  """The last fenced code block of the answer (the thinking removed), or None."""
  blocks = _CODE_BLOCK.findall(answer_format.strip_thinking(text))
  return blocks[-1] if blocks else None


@register("code")
def code_passes(batch: Responses) -> np.ndarray:
  out = []
  for text, tests in zip(batch.texts, batch.references):
    code = code_of(text)
    out.append(0.0 if code is None else float(code_sandbox.run(code + "\n\n" + tests, timeout_s=5.0).passed))
  return np.asarray(out, np.float32)


@register("format")
def format_ok(batch: Responses) -> np.ndarray:
  return np.asarray([answer_format.check_reasoning(t).ok for t in batch.texts], np.float32)


def length_penalty(lengths: np.ndarray, max_len: int, buffer: int) -> np.ndarray:
  """DAPO's soft overlong penalty: 0 up to `max_len - buffer` tokens, then falling linearly to -1 at
  `max_len` (a truncated response gets -1); `buffer` 0 turns it off."""
  if buffer <= 0:
    return np.zeros(len(lengths), np.float32)
  start = max_len - buffer
  return -np.clip((np.asarray(lengths, np.float32) - start) / buffer, 0.0, 1.0)
