r"""The pairwise reward model in miniature: the instruct-SFT tiny model trained to judge rule-labelled pairs.

COMMAND: python -m ministral_jax.main --config=configs/pwrm_tiny.py --workdir=/tmp/ministral_jax/pwrm_tiny

Without `init_from` the job first runs `configs/sft_tiny.py:instruct` in <workdir>/sft (itself from nothing),
then trains the PWRM from its params. Without `data.paths` it writes its pairs to <workdir>/pairs by the
stated rules over the task suite (`dpo.rule_pair`, answers only): a correct answer beats the same answer with
its result changed; among correct answers the concise one beats the long worked one; a looping answer always
loses. Give your own pairs with `--config.data.paths=train.jsonl --config.data.eval_paths=eval.jsonl`.
When training ends the job fits the temperature on the held-out pairs: `<workdir>/calibration.json` has it,
with the pairwise accuracy and the expected calibration error before and after.
Variants (the argument): `default`, and `quick` (toy sizes, for tests and Colab).
"""

import ml_collections

from ministral_jax import configs
from ministral_jax.train import dpo, loop, optimizer, pwrm


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  if arg not in ("default", "quick"):
    raise ValueError(f"configs/pwrm_tiny.py:{arg}: use default or quick")
  quick = arg == "quick"
  c = configs.after_sft_stage(__file__, "quick" if quick else "instruct")
  c.task = "train_pwrm"
  c.data.update(source="preference", paths="", eval_paths="", tokenizer="init_from", seq_len=384)
  c.pairs = dpo.pairs_config(level=1, train=64 if quick else 2000, eval_=32 if quick else 256, style="answer")
  c.pwrm = pwrm.pwrm_config(strip_thinking=True)
  c.train = loop.train_config(steps=6 if quick else 150, global_batch=8 if quick else 16)
  c.train.update(log_every=2 if quick else 25, eval_every=3 if quick else 75, eval_batches=2 if quick else 0,
                 checkpoint_every=3 if quick else 75)
  c.optimizer = optimizer.optimizer_config(lr=1e-4 if quick else 5e-5)
  c.optimizer.update(warmup_steps=0 if quick else 10, weight_decay=0.0)
  return c
