"""`python -m ministral_jax.main` with one more GRPO reward, `digits` (the fraction of a response's characters
that are digits): a reward that even an untrained policy earns a little of, so every group carries signal.
It shows how a reward registers from outside the package. Run with `tests/` on PYTHONPATH."""

import numpy as np

from ministral_jax.rewards import registry


@registry.register("digits")
def digits(batch: registry.Responses) -> np.ndarray:
  return np.array([sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in batch.texts], np.float32)


if __name__ == "__main__":  # the math verifier's workers are spawned: they import this module, not run it
  from ministral_jax import main
  main.run()
