r"""GRPO in miniature: the reasoning-SFT tiny model trained on verifiable rewards (Magistral's GRPO).

COMMAND: python -m ministral_jax.main --config=configs/grpo_tiny.py --workdir=/tmp/ministral_jax/grpo_tiny

Without `init_from` the job first runs `configs/sft_tiny.py:reasoning` in <workdir>/sft (itself from
nothing: a tiny parent pretrained on the built-in corpus, then reasoning SFT on the task suite), then
GRPO from its params and tokenizer on the same family's problems. Start from any reasoning checkpoint
instead with `--config.init_from=DIR` (its recorded tokenizer is used). Each of Magistral's five changes
is a switch, all on by default; the ablations turn one off:
  --config.grpo.magistral.no_kl=False              (a KL term to the frozen starting policy, beta 0.04)
  --config.grpo.magistral.token_sum=False          (per-sequence mean of token losses)
  --config.grpo.magistral.minibatch_advantage=False  (advantages divided by the group's std instead)
  --config.grpo.magistral.clip_higher=False        (eps_high = eps_low = 0.2)
  --config.grpo.magistral.drop_flat_groups=False   (groups with equal rewards stay in the batch)
Variants (the argument): `default`, and `quick` (toy sizes, for tests and Colab).
Progress, metrics.jsonl and TensorBoard are in <workdir>; the held-out accuracy runs every
train.eval_every steps; `python -m ministral_jax.train.grpo_report <workdir>` plots reward and accuracy.
"""

import ml_collections

from ministral_jax import configs
from ministral_jax.train import grpo, loop, optimizer


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  if arg not in ("default", "quick"):
    raise ValueError(f"configs/grpo_tiny.py:{arg}: use default or quick")
  quick = arg == "quick"
  # Starts from configs/sft_tiny.py:reasoning's model (made in <workdir>/sft without init_from); its prompts are
  # the same family and level as that SFT data (`tasks`).
  c = configs.after_sft_stage(__file__, "quick" if quick else "reasoning",
                              ("model", "mesh", "loss", "eval", "data", "tasks"))
  c.task = "grpo"

  c.grpo = grpo.grpo_config()
  # 8 prompts x 8 samples per step; 2 passes over 2 minibatches (4 updates, so the clip acts). T = 0.7: at
  # T = 1 the SFT model's samples are right ~2% of the time and most groups carry no signal.
  c.grpo.update(samples=4 if quick else 8, epochs=1 if quick else 2, minibatches=1 if quick else 2,
                eval_problems=16 if quick else 256, eval_batch=16 if quick else 128, eval_samples=1 if quick else 8,
                eval_temperature=0.7)
  c.grpo.sampling.update(max_new_tokens=32 if quick else 256, temperature=0.7)
  c.train = loop.train_config(steps=4 if quick else 60, global_batch=8)
  c.train.update(log_every=2 if quick else 5, eval_every=4 if quick else 30, checkpoint_every=2 if quick else 10)
  c.optimizer = optimizer.optimizer_config(lr=1e-5, schedule="constant")
  c.optimizer.update(warmup_steps=0 if quick else 5, weight_decay=0.0)
  return c
