r"""Prune a tiny pretrained parent to a smaller child: layers, hidden dimension (PCA), FFN.

COMMAND: python -m ministral_jax.main --config=configs/prune_tiny.py --workdir=/tmp/ministral_jax/prune_tiny --config.prune.parent=/tmp/ministral_jax/pretrain_tiny/params

Run configs/pretrain_tiny.py first: its <workdir>/params is the parent. The
argument is the parent's preset; the target (the `model` block) shrinks it
about as the paper's 8B -> 3B step does (layers x0.76, d_model x0.75, d_ffn
x0.64): cpu_tiny 4/128/384 -> 3/96/256, cpu_small 6/256/768 -> 5/192/512. Scorers, order and re-calibration are in
`prune`, e.g. `--config.prune.layer_scorer=block_influence
--config.prune.order=layers,ffn` (skip the hidden step: then keep d_model=128).
`--config.task=prune_ablation` prunes with every scorer and writes the eval
loss of each child to <workdir>/ablation.md. The child is <workdir>/params, the
`init_from` of a distillation run.
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.data import pipeline
from ministral_jax.eval import task as eval_task
from ministral_jax.model import config as model_config
from ministral_jax.prune import pruner
from ministral_jax.train import pretrain


TARGETS = {"cpu_tiny": dict(n_layers=3, d_model=96, d_ffn=256), "cpu_small": dict(n_layers=5, d_model=192, d_ffn=512)}


def get_config(arg: str = "cpu_tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "prune"
  c.seed = 0
  c.prune = pruner.prune_config(parent="/tmp/ministral_jax/pretrain_tiny/params")
  c.model = model_config.preset_dict(arg, **TARGETS[arg])  # the target
  c.data = pipeline.data_config()  # calibration data; the parent's tokenizer (same corpus, same SentencePiece)
  c.data.tokenizer = "spm_train"
  c.data.spm_vocab_size = 1024
  c.data.seq_len = 128
  c.mesh = sharding.mesh_config(data=-1)
  c.loss = pretrain.loss_config()
  c.eval = eval_task.eval_config()  # the ablation's eval loss: the built-in eval split (+ eval.files)
  c.eval.max_batches = 0  # the whole eval split
  return c
