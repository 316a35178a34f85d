"""Real sizes on paper: the 24B parent and the 3B child compile a training step without weights."""

import pytest

from ministral_jax import sharding
from ministral_jax.model import abstract, config


@pytest.mark.parametrize("name", ["mistral_small_3_1_24b", "ministral3_3b"])
def test_real_size_train_step_compiles_on_8_device_fsdp_tensor_mesh(name, record_property):
  part = sharding.Partitioner.from_config(dict(data=1, fsdp=4, tensor=2))
  cfg = config.preset(name, param_dtype="float32", dtype="bfloat16", remat_policy="full")
  report = abstract.compile_train_step(cfg, part, batch=4, seq=512)
  gib = 2**30
  print(f"\n{name}: params {report.param_bytes_total / gib:.2f} GiB total, "
        f"{report.param_bytes_per_device / gib:.2f} GiB per device; compiled per device: "
        f"arguments {report.argument_bytes / gib:.2f} GiB, temporaries {report.temp_bytes / gib:.2f} GiB")
  record_property("param_bytes_per_device", report.param_bytes_per_device)
  assert report.param_bytes_total == 4 * config.param_count(cfg)
  # Every parameter is split 8 ways (embed over fsdp=4, heads/mlp/vocab over tensor=2), norms aside.
  assert report.param_bytes_per_device == pytest.approx(report.param_bytes_total / 8, rel=1e-3)
  # Arguments = params + AdamW's two moments, all sharded like the params (+ the token batch).
  assert report.argument_bytes == pytest.approx(3 * report.param_bytes_per_device, rel=1e-3)
