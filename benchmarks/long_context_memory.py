"""Compiled memory of one long-context training step, dense attention vs the flash kernels.

    python -m benchmarks.long_context_memory [--devices=64] [--context=16] [--tensor=4]
        [--models=ministral3_3b,ministral3_14b] [--seqs=16384,262144] [--impls=xla,blockwise]
        [--json=out.json]

For each model, sequence length and attention kernel, the real pretrain train
step (`train/loop.py`: chunked loss, AdamW, fp32 master weights, bf16
compute, full remat) is lowered and compiled from shapes alone on a
simulated CPU mesh shaped like a v5p slice: batch 1, the sequence split over
`context` (zigzag order), heads over `tensor`, parameters and optimizer
state over fsdp x context. Nothing is allocated; the numbers are XLA's
compiled memory analysis per device, which is exact for the compiled
program. "fits" compares arguments + temporaries with a v5p chip's 95 GiB.

`xla` is the dense reference (the `[batch, 1, seq, seq]` mask and XLA's
softmax over stored scores, i.e. what the decoder did before the flash
kernels); `blockwise` is the pure-JAX flash kernel the CPU and the context
axis use. On a TPU `auto` picks splash where the sequence is not split and
blockwise under context parallelism. A case that XLA cannot compile prints
its error instead of numbers.
"""

from __future__ import annotations

import argparse
import os
import sys


def _args() -> argparse.Namespace:
  p = argparse.ArgumentParser()
  p.add_argument("--devices", type=int, default=64)
  p.add_argument("--context", type=int, default=16)
  p.add_argument("--tensor", type=int, default=4)
  p.add_argument("--models", default="ministral3_3b,ministral3_14b")
  p.add_argument("--seqs", default="16384,262144")
  p.add_argument("--impls", default="xla,blockwise")
  p.add_argument("--json", default="")
  return p.parse_args()


def main() -> None:
  args = _args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import json
  import time

  import jax

  from benchmarks.common import markdown_table
  from ministral_jax import configs, sharding
  from ministral_jax.model import config as model_config
  from ministral_jax.train import loop, pretrain

  gib, v5p_hbm = 2**30, 95
  rows, records = [], []
  mesh = sharding.mesh_config(data=1, fsdp=1, context=args.context, tensor=args.tensor)
  mesh.fsdp = args.devices // (args.context * args.tensor)
  part = sharding.Partitioner.from_config(mesh)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name in args.models.split(","):
    for seq in map(int, args.seqs.split(",")):
      for impl in args.impls.split(","):
        cfg = configs.load(os.path.join(repo, "configs", "pretrain_tiny.py"))
        cfg.model = model_config.preset_dict(name, param_dtype="float32", dtype="bfloat16", remat_policy="full",
                                             attention_impl=impl, attention_block=512)
        cfg.mesh = mesh
        cfg.data.seq_len, cfg.train.global_batch = seq, part.axis_size(("data", "fsdp"))
        model_cfg = model_config.ModelConfig.from_dict(cfg.model)
        start = time.perf_counter()
        try:
          mem = loop.compile_step(cfg, pretrain.make_task(cfg, model_cfg, part), model_cfg, part,
                                  ["inputs", "targets", "positions", "segment_ids"]).memory_analysis()
        except Exception as e:  # noqa: BLE001 - a case XLA cannot compile is a result, not a crash
          rows.append([name, f"{seq:,}", impl, "-", "-", "-", f"failed: {str(e).splitlines()[0][:80]}"])
          continue
        args_gib, temp_gib = mem.argument_size_in_bytes / gib, mem.temp_size_in_bytes / gib
        record = dict(model=name, seq=seq, impl=impl, mesh=dict(part.mesh.shape), argument_GiB=args_gib,
                      temp_GiB=temp_gib, compile_s=time.perf_counter() - start)
        records.append(record)
        rows.append([name, f"{seq:,}", impl, f"{args_gib:.2f}", f"{temp_gib:.2f}",
                     "yes" if args_gib + temp_gib <= v5p_hbm else "no", f"{record['compile_s']:.0f} s"])
        print(record, file=sys.stderr, flush=True)
  print(f"mesh {dict(part.mesh.shape)} ({args.devices} simulated devices), batch = data x fsdp = "
        f"{part.axis_size(('data', 'fsdp'))}, jax {jax.__version__}")
  print(markdown_table(["model", "seq", "attention", "args GiB/dev", "temp GiB/dev", f"fits {v5p_hbm} GiB",
                        "compile"], rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=2)


if __name__ == "__main__":
  main()
