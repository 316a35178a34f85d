r"""The paper's SFT at real scale: the cascade's 3B child fine-tuned on conversations at 16K, distilled from a 14B teacher.

COMMAND: python -m ministral_jax.main --config=configs/sft_ministral3.py:reasoning --workdir=gs://BUCKET/sft/ministral3_3b_reasoning --config.init_from=gs://BUCKET/cascade/ministral3_3b/params --config.sft.teacher=gs://BUCKET/sft/ministral3_14b_reasoning/params --config.data.paths='gs://BUCKET/sft_mix/*.jsonl'

Run it on every worker of a TPU pod slice at once (e.g. v5p-64: `fsdp` takes
every device, heads split over `tensor`=4). The student is the cascade's 3B
short-context child (or any 3B checkpoint: orbax, HF, native); its tokenizer
is the Tekken file it records or ships (`data.tokenizer="init_from"`; a v13+
Tekken, so `[THINK]` is a control token). The teacher is a post-trained 14B
(the paper: a preference-tuned teacher beats an SFT-only one; for the 3B
reasoning model, Magistral Small, which has the same vocabulary) held frozen
in bfloat16. Loss: 0.5 * KL(teacher || student) + 0.5 * CE on the assistant's
tokens. The data mix is whatever `data.paths` holds; the reasoning variant is
the same trainer on conversations whose assistant turns carry `thinking`.

Budgets are estimates (the paper gives none per stage): 2,000 steps of 128
conversations packed into 16,384-token rows (4.2B tokens), fp8 matmuls
(`sft.fp8`, as the paper), fp32 master weights, every layer rematerialised.
`tests/test_real_sizes.py` compiles this job's exact train step (student +
teacher) on a simulated 8-device CPU mesh, without weights.
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.data import pipeline
from ministral_jax.eval import generate
from ministral_jax.eval import task as eval_task
from ministral_jax.model import config as model_config
from ministral_jax.train import loop, optimizer, pretrain, sft

SEQ = 16_384
EXEC = dict(param_dtype="float32", dtype="bfloat16", remat_policy="full")
TEACHER = "ministral3_14b"  # the teacher's shape, for the abstract check (the checkpoint says it at run time)


def get_config(arg: str = "reasoning") -> ml_collections.ConfigDict:
  if arg not in ("reasoning", "instruct"):
    raise ValueError(f"configs/sft_ministral3.py:{arg}: use reasoning or instruct")
  c = ml_collections.ConfigDict()
  c.task = "sft"
  c.seed = 0
  c.init_from = "gs://YOUR_BUCKET/cascade/ministral3_3b/params"  # required: the cascade's 3B child
  c.model = model_config.preset_dict("ministral3_3b", **EXEC)
  c.mesh = sharding.mesh_config(data=1, fsdp=-1, tensor=4)
  c.loss = pretrain.loss_config()
  c.eval = eval_task.eval_config()

  c.data = pipeline.data_config()
  c.data.update(source="chat", paths=f"gs://YOUR_BUCKET/sft_mix/{arg}/*.jsonl", tokenizer="init_from", seq_len=SEQ,
                epochs=0)

  c.sft = sft.sft_config(teacher=f"gs://YOUR_BUCKET/sft/ministral3_14b_{arg}/params", kd_weight=0.5)
  c.sft.update(teacher_dtype="bfloat16", fp8=True)
  c.train = loop.train_config(steps=2000, global_batch=128)
  c.train.update(grad_accum=4, log_every=10, eval_every=250, eval_batches=8, checkpoint_every=250,
                 keep_checkpoints=3)
  c.optimizer = optimizer.optimizer_config(lr=1e-5)
  c.optimizer.update(warmup_steps=100, min_lr_ratio=0.1)

  c.generate = generate.generate_config(family="arithmetic", level=6)  # a smoke check; real evals: task `eval`
  c.generate.update(n=256, max_new_tokens=4096, batch_size=64, reasoning=arg == "reasoning")
  return c
