r"""Online DPO in miniature: the instruct-SFT tiny model aligned by a pairwise reward model's soft labels.

COMMAND: python -m ministral_jax.main --config=configs/odpo_tiny.py --workdir=/tmp/ministral_jax/odpo_tiny

Without `init_from` the job first runs `configs/sft_tiny.py:instruct` in <workdir>/sft, and without
`odpo.pwrm` it trains its PWRM (`configs/pwrm_tiny.py`, from that SFT model) in <workdir>/pwrm; then Online
DPO from the SFT params (also the frozen reference). Each step samples two answers per prompt at T = 0.7,
the PWRM's calibrated P(first > second) is the label, a looping answer always loses. Switches:
  --config.odpo.labels=hard          sigmoid DPO on the binarised PWRM preference
  --config.odpo.beta_rescale=none    beta as given (default: per pair, beta * 32 / mean response tokens)
  --config.odpo.strip_thinking=True  the PWRM reads the answers alone (reasoning models)
Variants (the argument): `default`, and `quick` (toy sizes, for tests and Colab). The held-out eval reports
accuracy, mean length, truncation and loop rates, and the win rate against the SFT model by the stated rule.
"""

import os

import ml_collections

from ministral_jax import configs
from ministral_jax.train import loop, odpo, optimizer


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  if arg not in ("default", "quick"):
    raise ValueError(f"configs/odpo_tiny.py:{arg}: use default or quick")
  quick = arg == "quick"
  c = configs.after_sft_stage(__file__, "quick" if quick else "instruct",
                              ("model", "mesh", "loss", "eval", "data", "tasks"))
  c.task = "odpo"
  c.pwrm_stage = configs.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pwrm_tiny.py") + f":{arg}")
  c.pwrm_stage.sft_stage = {}  # it starts from this job's SFT model
  c.odpo = odpo.odpo_config()
  c.odpo.update(eval_problems=16 if quick else 128, eval_batch=16 if quick else 128, pwrm_seq_len=384)
  c.odpo.sampling.update(max_new_tokens=32 if quick else 96)
  if quick:  # toy models never stop and every pair would be dropped: judge them by the PWRM alone
    c.odpo.loop.update(truncated_loses=False, min_tokens=10_000)
  c.train = loop.train_config(steps=4 if quick else 60, global_batch=8 if quick else 16)
  c.train.update(log_every=2 if quick else 10, eval_every=4 if quick else 30, checkpoint_every=2 if quick else 10)
  c.optimizer = optimizer.optimizer_config(lr=1e-5 if quick else 5e-6, schedule="constant")
  c.optimizer.update(warmup_steps=0 if quick else 5, weight_decay=0.0)
  return c
