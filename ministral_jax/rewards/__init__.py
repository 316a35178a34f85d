"""Rewards for post-training: generated problems with exact answers, and the checks that grade responses.

  tasks           seeded problem families (arithmetic, linear equations) with disjoint train/eval splits and
                  short/long chains of thought, written as `messages` JSONL
  math_verifier   math answers graded by equivalence (math-verify) in killable spawned workers
  code_sandbox    Python programs (HumanEval) run in a fresh, limited interpreter
  format          the [THINK]...[/THINK] answer shape, the boxed answer, and a loop detector on token ids

Nothing is imported here: each submodule is loaded on its own, so that the verifier's spawned workers and
the data tools import only what they use (no JAX).
"""
