r"""Pretrain a tiny Ministral-3-shaped model on the built-in corpus (CPU, a few minutes).

COMMAND: python -m ministral_jax.main --config=configs/pretrain_tiny.py --workdir=/tmp/ministral_jax/pretrain_tiny

Kill it and run the same command again: it resumes from the workdir. The
argument picks the model preset (`configs/pretrain_tiny.py:cpu_small` for a
wider one). The tokenizer is a SentencePiece model trained on the corpus and
cached in the workdir (a 131K vocabulary would dominate a model this small).

Sweep (get_hyper): `python -m launch.local --config=configs/pretrain_tiny.py
--workdir=/tmp/ministral_jax/lr_sweep` trains one model per learning rate,
each in its own workdir, and writes sweep.md.
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.data import pipeline
from ministral_jax.eval import task as eval_task
from ministral_jax.model import config as model_config
from ministral_jax.train import loop, optimizer, pretrain


def get_hyper(h):
  return h.sweep("optimizer.lr", [1e-3, 3e-3, 1e-2])


def get_config(arg: str = "cpu_tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.seed = 0
  c.init_from = ""
  c.data = pipeline.data_config()
  c.data.tokenizer = "spm_train"
  c.data.spm_vocab_size = 1024
  c.data.seq_len = 128
  c.model = model_config.preset_dict(arg)
  c.mesh = sharding.mesh_config(data=-1)
  c.train = loop.train_config(steps=300, global_batch=16)
  c.optimizer = optimizer.optimizer_config(lr=3e-3)
  c.optimizer.warmup_steps = 30
  c.loss = pretrain.loss_config()
  c.eval = eval_task.eval_config()  # for --config.task=eval on this experiment's workdir
  return c
