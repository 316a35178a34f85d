r"""Score a checkpoint on lm-evaluation-harness tasks through our backend (CPU, about a minute on a tiny model).

COMMAND: python -m ministral_jax.main --config=configs/lm_eval_tiny.py --workdir=/tmp/ministral_jax/pretrain_tiny

With no `eval.checkpoint` it scores `<workdir>/params`, e.g. the model `configs/pretrain_tiny.py` trained in
that workdir (run that first), with the tokenizer the checkpoint records. The default tasks are the three
offline ones built from the held-out split of the built-in corpus (`eval/harness_tasks.py`): multiple choice,
line completion (exact match) and perplexity. Any harness task works when its data is reachable, e.g.
`--config.eval.tasks=arc_easy,hellaswag --config.eval.num_fewshot=0`; `--config.eval.limit=16` scores the first
16 documents of each. Results: `<workdir>/lm_eval.json` and `<workdir>/lm_eval.md`.
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.data import pipeline
from ministral_jax.eval import task as eval_task


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: the checkpoint to score (orbax, HF or Mistral-native); empty: `<workdir>/params`."""
  c = ml_collections.ConfigDict()
  c.task = "lm_eval"
  c.data = pipeline.data_config()
  c.data.tokenizer = "init_from"  # the checkpoint's own
  c.mesh = sharding.mesh_config(data=-1)
  c.eval = eval_task.eval_config()
  c.eval.checkpoint = arg
  c.eval.batch_size = 16
  return c
