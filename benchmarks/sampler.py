"""Sampling throughput: our rollout engine against transformers' `generate`, same weights, one run.

    python -m benchmarks.sampler [--batches=8,64] [--prompt=16] [--new=128] [--steps=3]
        [--torch-attn=sdpa] [--torch-threads=0] [--json=out.json]

A ~5M-parameter `Ministral3ForCausalLM` is built by transformers with random
weights, saved with `save_pretrained` and imported with `checkpoint.hf.load_hf`,
so both sides run the very same fp32 weights. For each batch size, the same
random prompts (`--prompt` tokens each, all of one length, so transformers
needs no padding) are continued greedily for `--new` tokens with EOS disabled
(`stop_ids=[-1]` here, `eos_token_id=None` there), so both generate the same
number of tokens:

  - ours: `sampler.rollout` (one jitted program: prefill, then a `while_loop`
    of decode steps), and, for the breakdown, the jitted `sampler.prefill`
    alone on the same shapes; decode loop = rollout - prefill;
  - ours again at temperature 1 (GRPO's sampling: no top-k, no top-p), for
    the cost of drawing: its ms / step beside the greedy one;
  - torch: `model.generate(do_sample=False)` under `no_grad`, with as many
    torch threads as XLA's CPU pool (the cores we may use; `--torch-threads`).

The ceiling: a decode step cannot beat the machine's matmul peak (a 2048^2 fp32
`jnp.dot`, best of the same rounds) on its matmul FLOPs (`flops_per_token`
forward at the rollout's mean context), so torch's time over that bound is the
largest ratio any sampler could reach against it here; the table prints it.

Every call is warmed up once (compilation, thread pools) and then timed
round-robin (`common.time_calls`): the shared CPU machine drifts by 2x over
minutes, so only ratios measured in the same rounds mean anything. The greedy
outputs are compared token for token (fraction of equal tokens; at fp32 they
should all be equal). tokens/s counts generated tokens over the whole call,
prefill included.

On a loaded machine (another job on the same cores) torch's OpenMP threads
lose far more than XLA's: its barriers wait for a descheduled thread. Compare
runs only when the load was alike (`uptime`), or pass `--torch-threads=1`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import cpu_model, cpu_threads, markdown_table, time_calls
from ministral_jax.checkpoint import hf
from benchmarks.model_throughput import jax_matmul, torch_matmul
from ministral_jax.model.config import ModelConfig, flops_per_token, param_count
from ministral_jax.sample import sampler

# ~5.1M parameters: embeddings and LM head 2 x 4096 x 256, four blocks with GQA (8 query / 2 KV heads).
# The YaRN original context (64) lies inside a 16 + 128 token rollout, so both engines cross it.
PEAK_N = 2048  # the square matmul that measures the machine's peak
HF_CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                 tie_word_embeddings=False,
                 rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=8.0,
                                      original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
                                      mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1))


def build_models(path: str) -> tuple[Any, Any, ModelConfig]:
  """-> (the torch model, our params, our config), the same random weights."""
  import torch
  from transformers import Ministral3Config, Ministral3ForCausalLM
  torch.manual_seed(0)
  model = Ministral3ForCausalLM(Ministral3Config(**HF_CONFIG)).eval()
  model.generation_config.eos_token_id = None  # never stop early: both sides make --new tokens
  model.save_pretrained(path)
  params, cfg = hf.load_hf(path)
  return model, jax.device_put(params), cfg


def ours(params: Any, cfg: ModelConfig, prompts: np.ndarray, new: int, out: dict) -> dict[str, Callable[[], Any]]:
  sampling = sampler.Sampling(temperature=0.0, max_new_tokens=new)
  rng = jax.random.key(0)
  rows = [p.tolist() for p in prompts]
  tokens, lengths = sampler.pad_prompts(rows, cfg.pad_id, sampler.bucket(prompts.shape[1]))
  tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
  cache_len = tokens.shape[1]  # as the rollout runs it: the prompts' slots only

  def rollout() -> None:
    result = sampler.rollout(params, cfg, rows, sampling, rng, stop_ids=[-1])  # -1: no stop token
    out["tokens"], out["steps"] = result.tokens, result.steps

  sampled = dataclasses.replace(sampling, temperature=1.0)  # GRPO's setting: no top-k, no top-p
  return {"ours": rollout,
          "ours prefill": lambda: jax.block_until_ready(sampler.prefill(params, cfg, tokens, lengths, cache_len)),
          "ours T=1": lambda: sampler.rollout(params, cfg, rows, sampled, rng, stop_ids=[-1])}


def torch_generate(model: Any, prompts: np.ndarray, new: int, attn: str, out: dict) -> Callable[[], Any]:
  import torch
  model.set_attn_implementation(attn)
  ids = torch.from_numpy(prompts).long()
  mask = torch.ones_like(ids)

  def call() -> None:
    with torch.no_grad():
      result = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    out["tokens"] = result[:, prompts.shape[1]:].numpy()
  return call


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batches", default="8,64", help="comma-separated batch sizes")
  parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (every prompt this long)")
  parser.add_argument("--new", type=int, default=128, help="generated tokens per row")
  parser.add_argument("--steps", type=int, default=3, help="timed rounds; the median is reported")
  parser.add_argument("--torch-attn", default="sdpa", help="transformers attention implementation")
  parser.add_argument("--torch-threads", type=int, default=0, help="0: the cores we may use (XLA's CPU pool)")
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args()
  start = time.perf_counter()
  import torch
  import transformers
  threads = cpu_threads()
  torch_threads = args.torch_threads or threads
  torch.set_num_threads(torch_threads)

  with tempfile.TemporaryDirectory() as tmp:
    model, params, cfg = build_models(tmp)
  batches = [int(b) for b in args.batches.split(",") if b]
  rng = np.random.default_rng(0)
  fns: dict[tuple[int, str], Callable[[], Any]] = {}
  outputs: dict[tuple[int, str], dict] = {}
  for b in batches:
    prompts = rng.integers(3, cfg.vocab_size, (b, args.prompt), dtype=np.int64)
    prompts[:, 0] = cfg.bos_id
    outputs[(b, "ours")], outputs[(b, "torch")] = {}, {}
    fns.update({(b, name): fn for name, fn in ours(params, cfg, prompts, args.new, outputs[(b, "ours")]).items()})
    fns[(b, "torch")] = torch_generate(model, prompts, args.new, args.torch_attn, outputs[(b, "torch")])
  fns[(0, "jax peak")], fns[(0, "torch peak")] = jax_matmul(PEAK_N, "float32"), torch_matmul(PEAK_N)
  times = time_calls(fns, args.steps)
  med = {k: statistics.median(v) for k, v in times.items()}
  peak = {k: 2 * PEAK_N**3 / min(times[(0, f"{k} peak")]) for k in ("jax", "torch")}
  # matmul FLOPs per generated token, at the mean context (prompt + new / 2; causal: flops_per_token halves)
  token_flops = flops_per_token(cfg, 2 * (args.prompt + args.new // 2), backward=False)

  rows, results = [], []
  for b in batches:
    n_tokens = b * args.new
    mine, theirs = outputs[(b, "ours")], outputs[(b, "torch")]
    assert theirs["tokens"].shape == mine["tokens"].shape == (b, args.new), (theirs["tokens"].shape,
                                                                              mine["tokens"].shape)
    match = float(np.mean(mine["tokens"] == theirs["tokens"]))
    ours_s, torch_s, prefill_s = med[(b, "ours")], med[(b, "torch")], med[(b, "ours prefill")]
    decode_s = max(ours_s - prefill_s, 0.0)
    steps = mine["steps"]
    sampled_step = max(med[(b, "ours T=1")] - prefill_s, 0.0) / args.new
    ceiling = torch_s / (n_tokens * token_flops / peak["jax"])
    rows.append([str(b), f"{n_tokens / ours_s:,.0f}", f"{n_tokens / torch_s:,.0f}", f"{torch_s / ours_s:.2f}",
                 f"{ceiling:.1f}", f"{100 * n_tokens * token_flops / ours_s / peak['jax']:.1f}",
                 f"{100 * n_tokens * token_flops / torch_s / peak['torch']:.1f}", f"{match:.4f}", f"{1e3 * prefill_s:,.1f}", f"{1e3 * decode_s:,.1f}",
                 f"{1e3 * decode_s / steps:.3f}", f"{1e3 * sampled_step:.3f}", f"{1e3 * torch_s / args.new:.3f}"])
    results.append(dict(batch=b, ours_s=times[(b, "ours")], torch_s=times[(b, "torch")],
                        prefill_s=times[(b, "ours prefill")], ours_tokens_per_s=n_tokens / ours_s,
                        torch_tokens_per_s=n_tokens / torch_s, ratio=torch_s / ours_s, match=match,
                        sampled_s=times[(b, "ours T=1")], decode_steps=steps, ratio_ceiling=ceiling))

  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  print(f"Machine: {cpu_model()}, {threads} cores, load average {load} (1, 5, 15 min); "
        f"JAX backend {jax.default_backend()}")
  print(f"Versions: jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
  print(f"Model: random Ministral3ForCausalLM, {param_count(cfg) / 1e6:.2f}M params, fp32 both sides "
        f"(ours imported with hf.load_hf); prompt {args.prompt} tokens, {args.new} new tokens, greedy, no EOS; "
        f"torch attn {args.torch_attn}, {torch_threads} threads; median of {args.steps} round-robin rounds "
        f"after 1 warm-up")
  print(f"Matmul peak ({PEAK_N}^2 fp32, best round): JAX {peak['jax'] / 1e9:.0f} GFLOP/s, torch "
        f"{peak['torch'] / 1e9:.0f} GFLOP/s; {token_flops / 1e6:.2f} MFLOP of matmuls per generated token")
  print()
  print(markdown_table(["batch", "ours tokens/s", "torch tokens/s", "ours / torch", "ceiling on ours / torch",
                        "ours % of peak", "torch % of peak", "greedy tokens equal",
                        "ours prefill ms", "ours decode loop ms", "ours ms / decode step",
                        "ours ms / step, T=1 sampling", "torch ms / token step"], rows))
  elapsed = time.perf_counter() - start
  print(f"\nTotal time {elapsed:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), threads=threads, peak_flops=peak, token_flops=token_flops, torch_threads=torch_threads, results=results,
                     total_seconds=elapsed), f, indent=2)


if __name__ == "__main__":
  main()
