"""Greedy responses to held-out prompts, and what they are judged on: Online DPO's periodic eval and the
post-training report. Per response: correct (math-verify on the answer after the thinking), looping (no
EOS within the limit, or the repetition detector `rewards.format.is_looping`), and its length in tokens.
Against a baseline's responses to the same prompts: the win rate by the stated rule (`rewards/judge.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from ministral_jax.model.config import ModelConfig
from ministral_jax.rewards import format as answer_format
from ministral_jax.rewards import judge
from ministral_jax.sample import sampler


def loop_config() -> ml_collections.ConfigDict:
  """The repetition detector's settings (`rewards.format.is_looping`)."""
  return ml_collections.ConfigDict(dict(max_period=64, min_repeats=4, min_tokens=32, truncated_loses=True))


def looping(tokens: Sequence[int], stopped: bool, loop: ml_collections.ConfigDict) -> bool:
  """Caught in a loop: no EOS within the length limit (unless `loop.truncated_loses` is off), or a tail that
  repeats (`is_looping`)."""
  return (not stopped and loop.truncated_loses) or answer_format.is_looping(tokens, loop.max_period, loop.min_repeats, loop.min_tokens)


@dataclasses.dataclass
class Answers:
  texts: list[str]
  lengths: np.ndarray  # [n] generated tokens, EOS included
  stopped: np.ndarray  # [n] bool
  loops: np.ndarray  # [n] bool
  correct: np.ndarray  # [n] bool


def respond(params: Any, model_cfg: ModelConfig, prompts: Sequence[Sequence[int]], references: Sequence[str],
            tokenizer, max_new_tokens: int, batch: int, verifier, loop: ml_collections.ConfigDict) -> Answers:
  """Every prompt answered greedily (in batches of `batch`, one prompt width), judged. On a pod every process
  passes and gets back every row."""
  from ministral_jax.train import grpo
  width = sampler.bucket(max(len(p) for p in prompts))
  sampling = sampler.Sampling(0.0, 1.0, 0, max_new_tokens)
  parts = [sampler.rollout(params, model_cfg, prompts[i:i + batch], sampling, jax.random.key(0),
                           stop_ids=[tokenizer.eos_id], width=width) for i in range(0, len(prompts), batch)]
  completions = [c for part in parts for c in part.completions()]
  stopped = np.concatenate([part.stopped for part in parts])
  texts = grpo.decode(tokenizer, completions)
  correct = verifier.verify([answer_format.strip_thinking(t) for t in texts], list(references))
  loops = np.asarray([looping(c, s, loop) for c, s in zip(completions, stopped)])
  return Answers(texts, np.asarray([len(c) for c in completions]), stopped, loops, np.asarray(correct, bool))


def summary(answers: Answers, baseline: Answers | None = None) -> dict[str, float]:
  """accuracy, mean_length, truncated, loop_rate, and win_rate against `baseline` (ties count 1/2)."""
  out = {"accuracy": float(np.mean(answers.correct)), "mean_length": float(np.mean(answers.lengths)),
         "truncated": float(np.mean(~answers.stopped)), "loop_rate": float(np.mean(answers.loops))}
  if baseline is not None:
    out["win_rate"] = float(np.mean(judge.prefer(answers.correct, answers.loops, answers.lengths, baseline.correct,
                                                 baseline.loops, baseline.lengths)))
  return out
