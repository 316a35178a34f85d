r"""Both post-training recipes in miniature, from one tiny base, in about 20 minutes on a 2-core CPU.

COMMAND: python -m ministral_jax.main --config=configs/posttrain_tiny.py --workdir=/tmp/ministral_jax/posttrain_tiny

  instruct:   SFT (answers without thinking) -> Online DPO, beside an offline-DPO baseline on as many pairs
  reasoning:  reasoning SFT -> GRPO -> Online DPO with the thinking stripped before the PWRM reads it
The PWRM is trained once, from the instruct SFT model, on pairs labelled by the stated rule over the task suite
(`dpo.rule_pair`: correct beats wrong; the concise answer beats the long one; a looping answer always loses);
the same rule judges the held-out answers in the report. Each stage is one job in its own directory; the same
command resumes a killed pipeline. Start from your own base with `--config.posttrain.base=DIR`; leave a stage
out with e.g. `--config.posttrain.recipes.reasoning="('sft', 'odpo')"`. Every job's full config is under
`jobs` (e.g. `--config.jobs.odpo.odpo.labels=hard`). Variants (the argument): `default`, and `quick` (toy sizes,
for tests: about 2 minutes). Result: <workdir>/report.md, report.json and posttrain.png.
"""

import os

import ml_collections

from ministral_jax import configs
from ministral_jax.posttrain import task as posttrain

HERE = os.path.dirname(os.path.abspath(__file__))


def _job(name: str, arg: str) -> ml_collections.ConfigDict:
  return configs.load(os.path.join(HERE, name) + f":{arg}")


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  if arg not in ("default", "quick"):
    raise ValueError(f"configs/posttrain_tiny.py:{arg}: use default or quick")
  quick = arg == "quick"
  c = ml_collections.ConfigDict({"task": "posttrain", "seed": 0})
  c.posttrain = posttrain.posttrain_config()
  c.posttrain.update(reasoning_max_new_tokens=32 if quick else 160)
  c.posttrain.report.update(eval_problems=16 if quick else 128, batch=16 if quick else 128,
                            max_new_tokens=32 if quick else 160)
  j = c.jobs = ml_collections.ConfigDict()
  j.instruct_sft = _job("sft_tiny.py", "quick" if quick else "instruct")
  j.reasoning_sft = _job("sft_tiny.py", "quick" if quick else "reasoning")
  j.pwrm, j.odpo, j.grpo, j.dpo = (_job(f"{n}_tiny.py", arg) for n in ("pwrm", "odpo", "grpo", "dpo"))
  # Half the instruct answers are the long worked solution: a verbose SFT model, as the paper's vanilla SFT was,
  # for the preference stages to make concise.
  j.instruct_sft.tasks.update(style="instruct", long_fraction=0.5)
  j.dpo.pairs.style = "answer"  # the instruct baseline learns from answers without thinking, as its ODPO sees
  if quick:
    j.grpo.grpo.update(eval_at_start=False)
    return c
  # The ~20-minute budget, job by job (measured in the README): base 200 steps; SFT 400 (instruct) and 300
  # (reasoning, batch 8); PWRM 60 steps x 8 pairs; ODPO 30 steps x 8 prompts; GRPO 10 steps x 8 prompts x 8.
  j.instruct_sft.parent.steps = 200
  j.instruct_sft.data.seq_len = 192
  j.instruct_sft.train.update(steps=400, eval_every=200, checkpoint_every=200)
  j.reasoning_sft.tasks.long_fraction = 0.25
  j.reasoning_sft.train.update(steps=300, global_batch=8, eval_every=150, checkpoint_every=150)
  j.pwrm.data.seq_len = 320
  j.pwrm.train.update(steps=60, global_batch=8, eval_every=30, checkpoint_every=30, eval_batches=4)
  j.pwrm.pairs.update(train=480, eval=128)
  j.odpo.train.update(steps=30, global_batch=8, eval_every=30, checkpoint_every=10)
  j.odpo.odpo.update(eval_problems=64, eval_batch=64)
  j.odpo.odpo.sampling.max_new_tokens = 96
  j.odpo.optimizer.lr = j.dpo.optimizer.lr  # the same step size as the offline baseline (3e-5)
  j.dpo.train.update(eval_every=30, checkpoint_every=10)
  j.grpo.train.update(steps=10, eval_every=10, checkpoint_every=5)
  j.grpo.grpo.update(eval_problems=64, eval_batch=64, eval_samples=1, epochs=1, eval_at_start=False)
  j.grpo.grpo.sampling.max_new_tokens = 160
  return c
