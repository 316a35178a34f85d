"""Training and inference throughput of our decoder, against transformers, in one run.

    python -m benchmarks.model_throughput [--preset=bench_100m] [--seq=1024] [--batch=1]
        [--steps=3] [--dtype=float32] [--torch-attn=sdpa,eager] [--attention=auto,xla] [--json=out.json]

What is measured, in one process:
  1. The matmul peak each framework reaches on this machine: the best of
     `--steps` timed square matmuls (a jitted `jnp.dot` in `--dtype`; `torch.mm`
     in fp32 with as many threads as XLA's CPU pool, i.e. the cores we may use).
  2. Our model: forward (jitted `apply`) and forward+backward (`jax.value_and_grad`
     of the mean next-token cross-entropy) in tokens/s, median of `--steps`.
  3. The same config as transformers' `Ministral3ForCausalLM` on torch CPU fp32,
     per attention implementation: forward under `no_grad`, and forward +
     `loss.backward()`, on the same tokens, timed the same way.
Achieved FLOP/s count matmul FLOPs only (`flops_per_token`), so "% of peak" is
model FLOP utilisation against what the same framework gets on a bare matmul.

Why ratios rather than times: the CPU machine is small, shared and noisy, so
absolute times drift between runs by more than the differences of interest.
What carries over is the ratio of measurements taken in the same run (all
passes are timed round-robin, step by step, see `common.time_calls`) and the
fraction of a peak measured in those same rounds.

On a GPU the same module measures MFU against the GPU's bf16 matmul peak (the
torch side is CPU-only and is skipped off CPU):
    python -m benchmarks.model_throughput --preset=ministral3_3b --dtype=bfloat16 --seq=4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import cpu_model, cpu_threads, markdown_table, time_calls
from ministral_jax.checkpoint.hf import config_to_hf
from ministral_jax.model.config import ModelConfig, flops_per_token, param_count, preset
from ministral_jax.model.transformer import Transformer, init_params


def jax_matmul(n: int, dtype: str) -> Callable[[], Any]:
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.dtype(dtype)) for i in (1, 2))
  dot = jax.jit(jnp.dot)
  return lambda: jax.block_until_ready(dot(a, b))


def torch_matmul(n: int) -> Callable[[], Any]:
  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  return lambda: torch.mm(a, b)


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy of logits[:, t] against tokens[:, t + 1], in float32."""
  logits = logits[:, :-1].astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


def jax_passes(cfg: ModelConfig, tokens: np.ndarray) -> dict[str, Callable[[], Any]]:
  model = Transformer(cfg)
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(tokens)
  forward = lambda p, t: model.apply({"params": p}, t)[0]
  fwd = jax.jit(forward)
  fwd_bwd = jax.jit(jax.value_and_grad(lambda p, t: next_token_loss(forward(p, t), t)))
  return {"fwd": lambda: jax.block_until_ready(fwd(params, tokens)),
          "fwd+bwd": lambda: jax.block_until_ready(fwd_bwd(params, tokens))}


def torch_passes(cfg: ModelConfig, tokens: np.ndarray, attn: str) -> dict[str, Callable[[], Any]]:
  import torch
  import transformers
  torch.manual_seed(0)
  hf = config_to_hf(cfg, dtype="float32")  # Ministral3ForCausalLM (MistralForCausalLM without YaRN)
  hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "torch_dtype"})
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn, dtype=torch.float32)
  assert type(model).__name__ == hf["architectures"][0], type(model)
  ids = torch.from_numpy(tokens).long()

  def fwd() -> None:
    with torch.no_grad():
      model(input_ids=ids, use_cache=False)

  def fwd_bwd() -> None:
    model.zero_grad(set_to_none=True)  # fresh gradients each step, like value_and_grad
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

  return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="bench_100m")
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--steps", type=int, default=3,
                      help="timed rounds: model passes report the median, matmul peaks the best")
  parser.add_argument("--dtype", default="float32", help="JAX compute and peak-matmul dtype")
  parser.add_argument("--attention", default="auto",
                      help="comma-separated model.attention_impl values to time side by side (e.g. auto,xla)")
  parser.add_argument("--torch-attn", default="sdpa,eager", help="comma-separated; empty: no torch")
  parser.add_argument("--matmul-n", type=int, default=0, help="peak matmul size (0: 4096 CPU, 8192 else)")
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args()
  start = time.perf_counter()

  on_cpu = jax.default_backend() == "cpu"
  threads = cpu_threads()
  attns = [a for a in args.torch_attn.split(",") if a] if on_cpu else []
  cfg = preset(args.preset, dtype=args.dtype)
  impls = [a for a in args.attention.split(",") if a]
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32)
  n = args.matmul_n or (4096 if on_cpu else 8192)

  # Everything, matmul peaks included, is timed round-robin in one loop: the
  # machine's speed drifts by 2x over minutes, and this way every measurement
  # sees the same drift. Peaks take the best step, model passes the median.
  fns = {("jax", "matmul"): jax_matmul(n, args.dtype)}
  if attns:
    import torch
    torch.set_num_threads(threads)
    fns[("torch", "matmul")] = torch_matmul(n)
  for impl in impls:
    name = "jax" if impl == impls[0] else f"jax {impl}"
    fns.update({(name, p): fn for p, fn in jax_passes(cfg.replace(attention_impl=impl), tokens).items()})
  for attn in attns:
    fns.update({(f"torch {attn}", p): fn for p, fn in torch_passes(cfg, tokens, attn).items()})
  times = time_calls(fns, args.steps)
  peaks = {impl: 2 * n**3 / min(ts) for (impl, pass_), ts in times.items() if pass_ == "matmul"}

  n_tokens = args.batch * args.seq
  tokens_per_s = {key: n_tokens / statistics.median(ts) for key, ts in times.items() if key[1] != "matmul"}
  rows, results = [], []
  for (impl, pass_), tok_s in tokens_per_s.items():
    flop_s = tok_s * flops_per_token(cfg, args.seq, backward=pass_ == "fwd+bwd")
    peak = peaks[impl.split()[0]]
    ratio = "" if impl == "jax" else f"{tokens_per_s[('jax', pass_)] / tok_s:.2f}"
    ts = times[(impl, pass_)]
    rows.append([f"{impl} {pass_}", f"{tok_s:,.0f}", f"{flop_s / 1e9:,.1f}", f"{100 * flop_s / peak:.1f}",
                 ratio, f"{1e3 * min(ts):,.1f}-{1e3 * max(ts):,.1f}"])
    results.append(dict(impl=impl, pass_=pass_, seconds=ts, tokens_per_s=tok_s, flop_per_s=flop_s,
                        fraction_of_peak=flop_s / peak))

  device = jax.devices()[0]
  machine = f"{cpu_model()}, {threads} cores" + ("" if on_cpu else f"; {device.device_kind}")
  versions = {"jax": jax.__version__}
  if attns:
    import transformers
    versions.update(torch=torch.__version__, transformers=transformers.__version__)
  print(f"Machine: {machine}; JAX backend {jax.default_backend()}")
  print("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
  print(f"Model: {args.preset}, {param_count(cfg) / 1e6:.1f}M params, JAX dtype {args.dtype}, "
        f"batch {args.batch} x seq {args.seq}; median of {args.steps} steps after 1 warm-up")
  print(f"Matmul peak ({n}x{n}, best of {args.steps}): JAX {args.dtype} {peaks['jax'] / 1e9:,.1f} GFLOP/s"
        + (f"; torch float32 {peaks['torch'] / 1e9:,.1f} GFLOP/s, torch.set_num_threads({threads}) "
           f"= XLA's CPU pool size" if attns else ""))
  print()
  print(f"Rows 'jax' use attention_impl={impls[0]}; the ratio column is that row's tokens/s over this row's.")
  print(markdown_table(["pass", "tokens/s", "GFLOP/s", "% of own matmul peak", "jax / this row (tokens/s)",
                        "step ms (min-max)"], rows))
  elapsed = time.perf_counter() - start
  print(f"\nTotal time {elapsed:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), machine=machine, versions=versions, threads=threads, matmul_n=n,
                     peak_flop_per_s=peaks, results=results, total_seconds=elapsed), f, indent=2)


if __name__ == "__main__":
  main()
