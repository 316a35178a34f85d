r"""The paper's GRPO at real scale: the 3B reasoning model trained on verifiable rewards, long generations.

COMMAND: python -m ministral_jax.main --config=configs/grpo_ministral3.py --workdir=gs://BUCKET/grpo/ministral3_3b_reasoning --config.init_from=gs://BUCKET/sft/ministral3_3b_reasoning/params --config.data.paths='gs://BUCKET/rl_math/*.jsonl'

Run it on every worker of a TPU pod slice at once. The policy starts from the
reasoning SFT checkpoint (its Tekken tokenizer, `data.tokenizer="init_from"`);
the prompts are conversations whose final assistant message holds the
reference answer in \boxed{} (math). Magistral's recipe, all switches on: no
KL and no reference model, token-sum loss, minibatch-normalised advantages,
clip-higher 0.2 / 0.28, flat groups dropped; 16 samples per prompt at T = 1,
up to 16,384 new tokens with DAPO's soft length penalty over the last 2,048,
the formatting gate. Each step: 64 prompts x 16 samples, 4 minibatches of
16 prompts (one update each). Budgets are estimates (the paper gives none).
`tests/test_real_sizes.py` compiles this job's rollout and train step on a
simulated 8-device CPU mesh, without weights.
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.data import pipeline
from ministral_jax.eval import task as eval_task
from ministral_jax.model import config as model_config
from ministral_jax.train import grpo, loop, optimizer, pretrain

EXEC = dict(param_dtype="float32", dtype="bfloat16", remat_policy="full")
PROMPT_WIDTH = 1024  # the prompt bucket the abstract check compiles for (prompts are bucketed by powers of two)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.task = "grpo"
  c.seed = 0
  c.init_from = "gs://YOUR_BUCKET/sft/ministral3_3b_reasoning/params"  # required: a reasoning checkpoint
  c.model = model_config.preset_dict("ministral3_3b", **EXEC)
  c.mesh = sharding.mesh_config(data=1, fsdp=-1, tensor=4)
  c.loss = pretrain.loss_config()
  c.eval = eval_task.eval_config()
  c.data = pipeline.data_config()
  c.data.update(source="chat", paths="gs://YOUR_BUCKET/rl_math/*.jsonl", tokenizer="init_from",
                seq_len=PROMPT_WIDTH + 16_384, epochs=0)

  c.grpo = grpo.grpo_config()
  c.grpo.update(samples=16, epochs=1, minibatches=4, microbatches=16, length_penalty_buffer=2048, eval_problems=512,
                eval_batch=128, eval_samples=4)
  c.grpo.sampling.update(temperature=1.0, max_new_tokens=16_384)
  c.train = loop.train_config(steps=500, global_batch=64)
  c.train.update(log_every=1, eval_every=50, checkpoint_every=10, keep_checkpoints=3)
  c.optimizer = optimizer.optimizer_config(lr=1e-6, schedule="constant")
  c.optimizer.update(warmup_steps=10, weight_decay=0.0)
  return c
