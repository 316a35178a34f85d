r"""The paper's post-training at real scale: both recipes for the 3B child, from the cascade's checkpoint.

COMMAND: python -m ministral_jax.main --config=configs/posttrain_ministral3.py --workdir=gs://BUCKET/posttrain/ministral3_3b --config.posttrain.base=gs://BUCKET/cascade/ministral3_3b/params

Run it on every worker of a TPU pod slice at once. The jobs are the real-size configs of each stage:
`configs/sft_ministral3.py:instruct` and `:reasoning` (logit distillation from a post-trained 14B, fp8),
`configs/grpo_ministral3.py`, and below the PWRM (from the instruct SFT model, judging 8,192-token
judgments), Online DPO (64 prompts x 2 samples at T = 0.7, up to 3,072 new tokens for the instruct model;
the reasoning model's ODPO samples up to 16,384 and the PWRM reads its answers without the thinking) and the
offline-DPO baseline. Each job's data paths are placeholders: the preference pairs (`jobs.pwrm.data.paths`,
`jobs.dpo.data.paths`) and the prompt mixes (`jobs.odpo.data.paths`, `jobs.reasoning_odpo.data.paths`) are yours. Budgets are estimates (the
paper gives none per stage). `tests/test_real_sizes.py` compiles the PWRM's step and ODPO's rollout, judgment
and DPO step on a simulated 8-device CPU mesh, without weights.
"""

import os

import ml_collections

from ministral_jax import configs
from ministral_jax.posttrain import task as posttrain
from ministral_jax.train import dpo, loop, odpo, optimizer, pwrm

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT_WIDTH = 1024  # the prompt bucket the abstract check compiles for
JUDGMENT = 8192  # a PWRM row: the prompt and two responses


def _preference_job(task: str, sft: ml_collections.ConfigDict, paths: str, seq_len: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict({"task": task, "seed": 0, "init_from": ""})
  for block in ("model", "mesh", "loss", "eval"):
    c[block] = sft[block].to_dict()
  c.data = sft.data.to_dict()
  c.data.update(source="preference", paths=paths, eval_paths=paths.replace("train", "eval"), seq_len=seq_len)
  c.train = loop.train_config(steps=1000, global_batch=64)
  c.train.update(grad_accum=8, log_every=10, eval_every=250, eval_batches=8, checkpoint_every=50, keep_checkpoints=3)
  c.optimizer = optimizer.optimizer_config(lr=1e-6, schedule="constant")
  c.optimizer.update(warmup_steps=20, weight_decay=0.0)
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict({"task": "posttrain", "seed": 0})
  c.posttrain = posttrain.posttrain_config()
  c.posttrain.update(base="gs://YOUR_BUCKET/cascade/ministral3_3b/params", reasoning_max_new_tokens=16_384)
  c.posttrain.report.update(eval_problems=512, batch=128, max_new_tokens=4096)
  j = c.jobs = ml_collections.ConfigDict()
  j.instruct_sft = configs.load(os.path.join(HERE, "sft_ministral3.py") + ":instruct")
  j.reasoning_sft = configs.load(os.path.join(HERE, "sft_ministral3.py") + ":reasoning")
  j.grpo = configs.load(os.path.join(HERE, "grpo_ministral3.py"))
  j.pwrm = _preference_job("train_pwrm", j.instruct_sft, "gs://YOUR_BUCKET/preferences/train/*.jsonl", JUDGMENT)
  j.pwrm.pwrm = pwrm.pwrm_config(strip_thinking=True)
  j.dpo = _preference_job("dpo", j.instruct_sft, "gs://YOUR_BUCKET/preferences/train/*.jsonl", 4096)
  j.dpo.dpo = dpo.dpo_config(beta=0.1, labels="soft")
  j.odpo = _preference_job("odpo", j.instruct_sft, "", PROMPT_WIDTH + 3072)
  j.odpo.data.update(source="chat", paths="gs://YOUR_BUCKET/odpo_prompts/*.jsonl", eval_paths="")
  j.odpo.train.update(steps=1000, global_batch=64, grad_accum=8, eval_every=100)
  j.odpo.odpo = odpo.odpo_config()
  j.odpo.odpo.update(pwrm_seq_len=JUDGMENT, eval_problems=512, eval_batch=128)
  j.odpo.odpo.sampling.max_new_tokens = 3072
  # The reasoning model's ODPO: its own prompts, the thinking stripped, up to posttrain.reasoning_max_new_tokens.
  j.reasoning_odpo = ml_collections.ConfigDict(j.odpo.to_dict())
  j.reasoning_odpo.data.paths = "gs://YOUR_BUCKET/odpo_prompts_reasoning/*.jsonl"
  j.reasoning_odpo.data.seq_len = PROMPT_WIDTH + 16_384
  return c
