r"""Prune a real parent to the next size of the Ministral 3 cascade (paper, Algorithm 2).

COMMAND: python -m ministral_jax.main --config=configs/prune_ministral3.py:8b_to_3b --workdir=gs://BUCKET/prune/8b_to_3b --config.prune.parent=gs://BUCKET/ckpt/ministral3_8b

The argument is the cascade step: 24b_to_14b (Mistral Small 3.1 -> 14B: FFN
only), 14b_to_8b (layers, hidden, FFN) or 8b_to_3b (the same, and a tied
child of an untied parent). The parent is an orbax params checkpoint or a
Hugging Face / Mistral-native directory (read directly). Run it on every
worker of a pod slice at once (e.g. TPU v5p-32); the workdir may be on GCS.
Only the steps whose size shrinks run. The target's other fields (RoPE theta,
YaRN, the query temperature) are the published child's. Calibration reads
the data block with the Tekken tokenizer: the built-in corpus by default (no
download), a JSONL or TFDS mix at scale (`--config.data.source=jsonl
--config.data.paths=gs://.../*.jsonl`).
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.data import pipeline
from ministral_jax.eval import task as eval_task
from ministral_jax.model import config as model_config
from ministral_jax.prune import pruner
from ministral_jax.train import pretrain

STEPS = {
    "24b_to_14b": ("mistral_small_3_1_24b", "ministral3_14b"),
    "14b_to_8b": ("ministral3_14b", "ministral3_8b"),
    "8b_to_3b": ("ministral3_8b", "ministral3_3b"),
}


def get_config(arg: str = "8b_to_3b") -> ml_collections.ConfigDict:
  parent_name, target_name = STEPS[arg]
  parent, target = model_config.preset(parent_name), model_config.preset(target_name)
  c = ml_collections.ConfigDict()
  c.task = "prune"
  c.seed = 0
  c.prune = pruner.shrinking_steps(pruner.prune_config(parent=""), parent, target)
  c.prune.calibration_batches = 128  # x 8 rows x 4096 tokens = 4.2M tokens
  c.prune.calibration_batch_size = 8
  c.prune.calibration_dtype = "bfloat16"
  c.model = model_config.preset_dict(target_name, param_dtype="bfloat16", dtype="bfloat16")
  c.data = pipeline.data_config()
  c.data.tokenizer = "tekken"
  c.data.seq_len = 4096
  c.mesh = sharding.mesh_config(data=1, fsdp=-1, tensor=1)
  c.loss = pretrain.loss_config()
  c.eval = eval_task.eval_config()
  return c
