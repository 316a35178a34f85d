r"""Offline DPO in miniature: the reasoning-SFT tiny model trained on rule-labelled preference pairs.

COMMAND: python -m ministral_jax.main --config=configs/dpo_tiny.py --workdir=/tmp/ministral_jax/dpo_tiny

Without `init_from` the job first runs `configs/sft_tiny.py:reasoning` in <workdir>/sft (itself from nothing),
then DPO from its params, which are also the frozen reference. Without `data.paths` it writes its pairs to
<workdir>/pairs by one stated rule over the task suite: the worked solution of a problem beats the same
solution with its result changed (`dpo.rule_pair`, p = 1). Give your own pairs with
`--config.data.paths=train.jsonl --config.data.eval_paths=eval.jsonl` (JSONL: prompt, chosen, rejected, and
optionally p = P(chosen > rejected), used with `--config.dpo.labels=soft`).
Variants (the argument): `default`, and `quick` (toy sizes, for tests and Colab).
The eval reports the DPO loss on held-out pairs, the ranking accuracy and the mean margin.
"""

import ml_collections

from ministral_jax import configs
from ministral_jax.train import dpo, loop, optimizer


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  if arg not in ("default", "quick"):
    raise ValueError(f"configs/dpo_tiny.py:{arg}: use default or quick")
  quick = arg == "quick"
  # Starts from configs/sft_tiny.py:reasoning's model (made in <workdir>/sft without init_from), also the reference.
  c = configs.after_sft_stage(__file__, "quick" if quick else "reasoning")
  c.task = "dpo"
  c.data.update(source="preference", paths="", eval_paths="", tokenizer="init_from", seq_len=256)
  c.pairs = dpo.pairs_config(level=1, train=64 if quick else 2000, eval_=16 if quick else 128)
  c.dpo = dpo.dpo_config(beta=0.1, labels="hard")
  c.train = loop.train_config(steps=6 if quick else 200, global_batch=8 if quick else 16)
  c.train.update(log_every=2 if quick else 20, eval_every=3 if quick else 100, eval_batches=2 if quick else 0,
                 checkpoint_every=3 if quick else 100)
  c.optimizer = optimizer.optimizer_config(lr=1e-4 if quick else 3e-5)
  c.optimizer.update(warmup_steps=0 if quick else 10, weight_decay=0.0)
  return c
