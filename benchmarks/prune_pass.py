"""The pruning pass: time against one plain forward over the same tokens, and memory at real width.

    python -m benchmarks.prune_pass [--width=512] [--layers=8] [--batches=8] [--batch=4] [--seq=256]

Time. A random parent (`--width`, `--layers`, d_ffn 3 x width, heads 8/2 x 64,
vocabulary 1024) is pruned to 3/4 of its layers, width and FFN, once
one-shot (one calibration pass) and once re-calibrated (a pass per step).
The whole pass (calibration, scoring with the host eigendecomposition, the
jitted rewrite) is timed against one plain forward (the model's logits) over
the same calibration tokens, each warm (compiled), round-robin over `--steps`
repetitions on the same machine, so the ratio is what to read, not the times.

Memory, from XLA's compiled memory analysis (exact; nothing is allocated):
one calibration batch (1 x 4096 tokens, fp32, every statistic) of
Ministral 3 3B on one device next to its plain forward, and the 8B -> 3B
rewrite sharded on a simulated 8-device (fsdp 4 x tensor 2) mesh.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import cpu_model, markdown_table, time_calls  # noqa: E402
from ministral_jax import sharding  # noqa: E402
from ministral_jax.model import config, transformer  # noqa: E402
from ministral_jax.prune import calibration, pruner, rewrite  # noqa: E402

GIB = 2**30


def _batches(n: int, batch: int, seq: int, vocab: int):
  rng = np.random.RandomState(0)
  data = [{"inputs": rng.randint(3, vocab, (batch, seq)).astype(np.int32),
           "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
           "segment_ids": np.ones((batch, seq), np.int32)} for _ in range(n)]
  return lambda: iter(data)


def time_pass(args) -> list[list[str]]:
  part = sharding.Partitioner(sharding.make_mesh(dict(data=1), devices=jax.devices()[:1]))
  parent = config.preset("cpu_small", d_model=args.width, n_layers=args.layers, d_ffn=3 * args.width,
                         n_heads=8, n_kv_heads=2, head_dim=64)
  target = parent.replace(n_layers=3 * args.layers // 4, d_model=3 * args.width // 4, d_ffn=9 * args.width // 4)
  params = jax.jit(lambda k: transformer.init_params(parent, k))(jax.random.key(0))
  batches = _batches(args.batches, args.batch, args.seq, parent.vocab_size)
  forward = jax.jit(lambda p, t: transformer.Transformer(parent).apply({"params": p}, t)[0])

  def plain():
    for b in batches():
      jax.block_until_ready(forward(params, b["inputs"]))

  def prune(recalibrate: bool):
    pcfg = pruner.prune_config()
    pcfg.recalibrate = recalibrate
    return lambda: jax.block_until_ready(pruner.prune(params, parent, target, pcfg, batches, part).params)

  def calibrate_only():
    calibration.calibrate(params, parent, batches(), part, ("norm_ratio", "second_moment", "ffn_act"))

  fns = {"plain forward (logits)": plain, "calibration pass alone": calibrate_only,
         "whole pass, one-shot": prune(False), "whole pass, recalibrated": prune(True)}
  times = time_calls(fns, args.steps)
  base = statistics.median(times["plain forward (logits)"])
  tokens = args.batches * args.batch * args.seq
  print(f"\nParent {config.param_count(parent):,} params ({parent.n_layers} layers, d {parent.d_model}, "
        f"ffn {parent.d_ffn}) -> {config.param_count(target):,}; {tokens:,} calibration tokens; "
        f"{cpu_model()}; median of {args.steps}.")
  return [[name, f"{statistics.median(t):.3f}", f"{statistics.median(t) / base:.2f}"] for name, t in times.items()]


def memory_rows() -> list[list[str]]:
  one = sharding.Partitioner(sharding.make_mesh(dict(data=1), devices=jax.devices()[:1]))
  cfg = config.preset("ministral3_3b")  # fp32: on CPU, XLA hoists an fp32 copy of bf16 weights out of the layer loop
  params = transformer.abstract_params(cfg)
  batch = {k: jax.ShapeDtypeStruct((1, 4096), jnp.int32) for k in ("inputs", "positions", "segment_ids")}
  rows = []
  with one.activate():
    calib = jax.jit(lambda p, b: calibration.batch_stats(p, cfg, b)).lower(params, batch).compile()
    hidden = jax.jit(lambda p, t: transformer.Transformer(cfg).apply({"params": p}, t, return_hidden=True)[0]
                     ).lower(params, batch["inputs"]).compile()
    logits = jax.jit(lambda p, t: transformer.Transformer(cfg).apply({"params": p}, t)[0]
                     ).lower(params, batch["inputs"]).compile()
  for name, c in (("3B calibration batch (all statistics)", calib), ("3B plain forward, hidden states", hidden),
                  ("3B plain forward, logits", logits)):
    m = c.memory_analysis()
    rows.append([name, "1", f"{m.argument_size_in_bytes / GIB:.3f}", f"{m.output_size_in_bytes / GIB:.3f}",
                 f"{m.temp_size_in_bytes / GIB:.3f}"])
  parent, target = config.preset("ministral3_8b"), config.preset("ministral3_3b")
  part = sharding.Partitioner.from_config(dict(data=1, fsdp=4, tensor=2))
  shard = lambda tree, s: jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, s)
  plan = rewrite.Plan(layers=jax.ShapeDtypeStruct((26,), jnp.int32),
                      rotation=jax.ShapeDtypeStruct((4096, 3072), jnp.float32),
                      ffn=jax.ShapeDtypeStruct((26, 9216), jnp.int32))
  compiled = pruner._rewriter(part, target, True, "head", None).lower(
      shard(transformer.abstract_params(parent), part.param_shardings(parent)), plan).compile()
  m = compiled.memory_analysis()
  rows.append(["8B -> 3B rewrite (fp32), per device", "8", f"{m.argument_size_in_bytes / GIB:.3f}",
               f"{m.output_size_in_bytes / GIB:.3f}", f"{m.temp_size_in_bytes / GIB:.3f}"])
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--width", type=int, default=512)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--batches", type=int, default=8)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--steps", type=int, default=3)
  args = ap.parse_args()
  rows = time_pass(args)
  print(markdown_table(["pass", "seconds", "/ plain forward"], rows))
  print("\nCompiled memory (XLA analysis, GiB per device):")
  print(markdown_table(["program", "devices", "arguments", "outputs", "temporaries"], memory_rows()))


if __name__ == "__main__":
  main()
