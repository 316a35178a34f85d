r"""Distill a smaller student from a tiny pretrained teacher on the built-in corpus.

COMMAND: python -m ministral_jax.main --config=configs/distill_tiny.py --workdir=/tmp/ministral_jax/distill_tiny --config.distill.teacher=/tmp/ministral_jax/pretrain_tiny/params

Run configs/pretrain_tiny.py first: its <workdir>/params is the teacher. The
student trains the same SentencePiece model on the same corpus (training is
deterministic), so both share one vocabulary. Forward KL(teacher || student)
only; `--config.distill.ce_weight=0.5` mixes in next-token loss.
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.data import pipeline
from ministral_jax.eval import task as eval_task
from ministral_jax.model import config as model_config
from ministral_jax.train import distill, loop, optimizer, pretrain


def get_config(arg: str = "cpu_tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "distill"
  c.seed = 0
  c.init_from = ""  # e.g. a pruned child checkpoint
  c.data = pipeline.data_config()
  c.data.tokenizer = "spm_train"
  c.data.spm_vocab_size = 1024
  c.data.seq_len = 128
  c.model = model_config.preset_dict(arg, n_layers=2, d_ffn=256)  # the student
  c.distill = distill.distill_config(teacher="/tmp/ministral_jax/pretrain_tiny/params")
  c.mesh = sharding.mesh_config(data=-1)
  c.train = loop.train_config(steps=300, global_batch=16)
  c.optimizer = optimizer.optimizer_config(lr=3e-3)
  c.optimizer.warmup_steps = 30
  c.loss = pretrain.loss_config()
  c.eval = eval_task.eval_config()  # for --config.task=eval on this experiment's workdir
  return c
