r"""The built-in default: a tiny random Ministral-3-shaped model, saved and sampled. No download.

COMMAND: python -m ministral_jax.main --config=configs/tiny_sample.py --workdir=/tmp/ministral_jax/tiny_sample

Run it again with the same --workdir and it restores <workdir>/params; a
different model or seed there is refused (use a new --workdir).

Prompts. `prompts` is one string holding one prompt per line:
  --config.prompts='Once upon a time'
  --config.prompts="$(printf 'Once upon a time\nThe capital of France is')"   (two prompts)
  --config.prompts=$'Once upon a time\nThe capital of France is'            (the same, in bash)
(ml_collections cannot override a list field, and a tuple field would parse
'Once upon a time' as Python and fail.) Or read them from a text file, one
prompt per line, instead of `prompts`:
  --config.prompt_file=prompts.txt --config.prompts=''
An empty prompt (an empty line) is an error, as is setting both fields.

To sample a real checkpoint (orbax, Hugging Face or Mistral-native directory,
read in place; its architecture is its own, config.model's execution fields
such as param_dtype and dtype apply):
  --config.init_from=/path/to/checkpoint --config.model.param_dtype=bfloat16 --config.model.dtype=bfloat16
  --config.tokenizer=/path/to/checkpoint/tekken.json --workdir=...

With images (a multimodal checkpoint, or the tiny random one of `:tiny_vision`):
  --config.images=photo.png   (one per prompt, comma-separated, or one for every prompt)
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.model import config as model_config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "sample"
  c.seed = 0  # the random model's init (without init_from) and the sampling
  # The Tekken file bundled with mistral-common: 131,072 ids, like Ministral 3.
  c.model = model_config.preset_dict(arg, vocab_size=131_072)
  c.tokenizer = "tekken"
  c.init_from = ""
  c.mesh = sharding.mesh_config(data=-1)
  c.prompts = "The capital of France is\ndef fibonacci(n):"  # one prompt per line
  c.prompt_file = ""  # or a text file, one prompt per line (then set prompts='')
  # Multimodal models (e.g. the tiny_vision preset): comma-separated image files, one per prompt or one for
  # all; each is preprocessed for the ViT and its [IMG] layout goes right after the prompt's BOS.
  c.images = ""
  c.max_new_tokens = 16
  c.temperature = 0.0
  return c
