r"""The paper's recipe at real scale: Mistral Small 3.1 (24B) -> 14B -> 8B -> 3B by Cascade Distillation.

COMMAND: python -m ministral_jax.main --config=configs/cascade_ministral3.py --workdir=gs://BUCKET/cascade --config.parent.checkpoint=gs://BUCKET/ckpt/mistral_small_3_1_24b_base --config.data.paths='gs://BUCKET/mix/*.jsonl'

Run it on every worker of a TPU pod slice at once (e.g. v5p-256; the mesh
fills `fsdp` with every device and splits heads over `tensor`=4). The parent
is Mistral Small 3.1 Base (orbax, or the HF directory read directly; convert
the 24B once with `checkpoint.convert`). Every stage distills from the parent
(the paper's teacher) at 16,384 tokens, then runs a long-context stage at
262,144 tokens with YaRN x16 over the 16K original context and the query
temperature (beta 0.1), as the released configs have. The next stage is
pruned from the short-context model. Child shapes and RoPE bases are the
published ones (model/config.py presets).

Token budgets are documented estimates: the paper gives 1-3T tokens for the
whole cascade, not a split per stage. Here: 1.0T / 0.8T / 0.8T at 16K and
40B per long-context stage (2.7T), at 8.4M tokens per step. From-scratch
baselines are off (training 3B-14B models from scratch is its own project).
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.cascade import task as cascade
from ministral_jax.data import pipeline
from ministral_jax.eval import task as eval_task
from ministral_jax.model import config as model_config
from ministral_jax.prune import pruner
from ministral_jax.train import distill, loop, optimizer, pretrain

SHORT, LONG = 16_384, 262_144
TOKENS_PER_STEP = 512 * SHORT  # 8.4M; the long stage: 32 x 262,144, the same
EXEC = dict(param_dtype="float32", dtype="bfloat16", remat_policy="full")


def _steps(tokens: float) -> int:
  return int(tokens // TOKENS_PER_STEP)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.task = "cascade"
  c.seed = 0
  c.data = pipeline.data_config()
  c.data.update(source="jsonl", paths="gs://YOUR_BUCKET/pretraining_mix/*.jsonl", tokenizer="tekken",
                seq_len=SHORT, epochs=1)
  c.mesh = sharding.mesh_config(data=1, fsdp=-1, tensor=4)
  c.train = loop.train_config(global_batch=512)
  c.train.update(log_every=50, eval_every=2000, eval_batches=16, checkpoint_every=1000, keep_checkpoints=3)
  c.loss = pretrain.loss_config()
  c.eval = eval_task.eval_config()
  c.eval.max_batches = 64

  c.parent = ml_collections.ConfigDict()
  c.parent.checkpoint = "gs://YOUR_BUCKET/ckpt/mistral_small_3_1_24b_base"  # required: never pretrained here
  c.parent.model = model_config.preset_dict("mistral_small_3_1_24b", **EXEC)
  c.parent.steps = 0
  c.parent.optimizer = optimizer.optimizer_config(lr=3e-4)

  published = lambda name: {k: model_config.preset(name).to_dict()[k]
                            for k in ("n_layers", "d_model", "d_ffn", "rope_theta", "tie_embeddings")}
  c.stages = [
      cascade.stage_config("ministral3_14b", **published("ministral3_14b"), short_steps=_steps(1.0e12),
                         long_steps=_steps(40e9)),
      cascade.stage_config("ministral3_8b", **published("ministral3_8b"), short_steps=_steps(0.8e12),
                         long_steps=_steps(40e9)),
      cascade.stage_config("ministral3_3b", **published("ministral3_3b"), short_steps=_steps(0.8e12),
                         long_steps=_steps(40e9)),
  ]
  c.prune = pruner.prune_config()
  c.prune.update(calibration_batches=64, calibration_batch_size=8, calibration_dtype="bfloat16")
  c.distill = distill.distill_config(teacher="parent")
  c.distill_optimizer = optimizer.optimizer_config(lr=1e-4)  # Minitron: ~1/5 of the pretraining peak
  c.distill_optimizer.warmup_steps = 2000
  c.long = ml_collections.ConfigDict(dict(seq_len=LONG, global_batch=TOKENS_PER_STEP // LONG, yarn_factor=16.0,
                                          query_temperature_beta=0.1))
  # 262,144 tokens of one sequence split over 16 chips (context parallelism, zigzag-balanced), heads
  # over 4; params and optimizer state over fsdp x context. On a 512-chip v5p slice: fsdp = 8.
  c.long.mesh = sharding.mesh_config(data=1, fsdp=-1, context=16, tensor=4)
  c.baselines = False
  return c
