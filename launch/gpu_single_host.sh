#!/usr/bin/env bash
# Runs any experiment on all GPUs of one host.
#   launch/gpu_single_host.sh --config=configs/describe.py:ministral3_3b --workdir=/tmp/run
# Extra flags go straight to ministral_jax.main. Set DRY_RUN=1 to print the command only.
# Cloud TPU (single and multi-host) launchers arrive with the launch issue (#6).
set -euo pipefail
if [[ "${1:-}" == "--help" || $# -eq 0 ]]; then
  sed -n '2,5p' "$0"; exit 0
fi
# Let XLA overlap collectives with compute, and keep 10% of GPU memory for cuDNN workspaces.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
cmd=(python -m ministral_jax.main "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then echo "XLA_FLAGS='$XLA_FLAGS' ${cmd[*]}"; exit 0; fi
exec "${cmd[@]}"
