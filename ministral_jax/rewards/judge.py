"""The stated rule that prefers one response to another, in miniature (the paper's human and LLM judges).

    1. a looping response loses to one that does not loop (both loop: a tie);
    2. otherwise a correct answer beats a wrong one;
    3. otherwise (both right or both wrong) the concise one wins: the shorter, when it has at most
       `concise` (90%) of the other's tokens; otherwise a tie.

It labels the PWRM's training pairs (`train/dpo.rule_pair` writes pairs that follow it) and, separately,
judges held-out responses (`eval/responses.py`). A tie counts 1/2 in a win rate.
"""

from __future__ import annotations

import numpy as np


def prefer(correct_a: np.ndarray, loops_a: np.ndarray, length_a: np.ndarray, correct_b: np.ndarray,
           loops_b: np.ndarray, length_b: np.ndarray, concise: float = 0.9) -> np.ndarray:
  """`[n]` P(a > b) in {0, 1/2, 1} by the rule, elementwise."""
  ca, cb = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
  la, lb = np.asarray(loops_a, bool), np.asarray(loops_b, bool)
  na, nb = np.asarray(length_a, np.float64), np.asarray(length_b, np.float64)
  by_length = np.where(na <= concise * nb, 1.0, np.where(nb <= concise * na, 0.0, 0.5))
  by_correct = np.where(ca & ~cb, 1.0, np.where(cb & ~ca, 0.0, by_length))
  return np.where(la & ~lb, 0.0, np.where(lb & ~la, 1.0, np.where(la & lb, 0.5, by_correct)))
