r"""The built-in default: a tiny random Ministral-3-shaped model, saved and sampled. No download.

COMMAND: python -m ministral_jax.main --config=configs/tiny_sample.py --workdir=/tmp/ministral_jax/tiny_sample

Run it again with the same --workdir and it restores <workdir>/params. To
sample from a real checkpoint instead:
  --config.init_from=/path/to/hf_or_native_dir --config.model=<its preset> --workdir=...
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.model import config as model_config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "sample"
  c.seed = 0
  # The Tekken file bundled with mistral-common: 131,072 ids, like Ministral 3.
  c.model = model_config.preset_dict(arg, vocab_size=131_072)
  c.tokenizer = "tekken"
  c.init_from = ""
  c.mesh = sharding.mesh_config(data=-1)
  c.prompts = ["The capital of France is", "def fibonacci(n):"]
  c.max_new_tokens = 16
  c.temperature = 0.0
  return c
