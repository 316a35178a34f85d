"""Test setup: 8 simulated CPU devices (set before JAX is imported) and fp32 matmuls."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Parity tests compare against torch fp32 matmuls; keep XLA's CPU dots at full precision.
jax.config.update("jax_default_matmul_precision", "highest")
