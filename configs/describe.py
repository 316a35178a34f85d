r"""Real sizes on paper: parameter counts and a compiled training step, no weights.

COMMAND: XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m ministral_jax.main --config=configs/describe.py:mistral_small_3_1_24b --workdir=/tmp/ministral_jax/describe

The argument is a preset name (mistral_small_3_1_24b, ministral3_14b,
ministral3_8b, ministral3_3b, ...; `<name>_vision` is the whole multimodal
model, whose step also runs `image_slots` ViT patches per row through the
frozen Pixtral encoder). The mesh defaults to fsdp over all devices with a
tensor axis of 2.
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.model import config as model_config


def get_config(arg: str = "ministral3_3b") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "describe"
  c.model = model_config.preset_dict(arg, param_dtype="float32", dtype="bfloat16", remat_policy="full")
  c.mesh = sharding.mesh_config(data=1, fsdp=-1, tensor=2)
  c.batch = 4
  c.seq = 4096
  c.image_slots = 4096 if c.model.vision_layers else 0  # 4 images of 448x448 per row
  return c
