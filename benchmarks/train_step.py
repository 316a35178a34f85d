"""Training-step throughput: distillation vs student-only, and the tiny default's tokens/s.

    python -m benchmarks.train_step [--steps=5]

1. Distillation step time / student-only step time, beside the FLOP ratio
   (student fwd+bwd + teacher fwd) / (student fwd+bwd), for a teacher about
   twice the student's parameters. Both steps are the real jitted train steps
   of `train/loop.py` (AdamW, chunked losses), timed round-robin in one run.
   The goal is a time ratio within 10% of the FLOP ratio: the teacher costs
   its forward and nothing else.
2. Tokens/s of the tiny default (`configs/pretrain_tiny.py`: cpu_tiny,
   batch 16 x seq 128) and achieved matmul FLOP/s as a fraction of this
   machine's fp32 matmul peak, measured in the same rounds.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import cpu_model, cpu_threads, markdown_table, time_calls
from ministral_jax.model import config, transformer
from ministral_jax.train import distill, loop, optimizer, pretrain


def batch_of(vocab: int, batch: int, seq: int) -> dict:
  rng = np.random.RandomState(0)
  out = {k: rng.randint(0, vocab, (batch, seq)).astype(np.int32) for k in ("inputs", "targets")}
  out["positions"] = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
  out["segment_ids"] = np.ones((batch, seq), np.int32)
  return out


def step_call(task: loop.Task, cfg: config.ModelConfig, batch: dict):
  tx, _ = optimizer.make_optimizer(optimizer.optimizer_config(), 100)
  params = transformer.init_params(cfg, jax.random.key(0))
  state = {"s": loop.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))}
  step = jax.jit(loop.make_train_step(task, tx, grad_accum=1, seed=0), donate_argnums=(0,))

  def call():
    state["s"], out = step(state["s"], batch, task.frozen)
    jax.block_until_ready(out["loss"])
  return call


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  a = p.parse_args()
  loss_cfg = pretrain.loss_config()
  student = config.preset("cpu_small")
  teacher = student.replace(n_layers=2 * student.n_layers)
  tiny = config.preset("cpu_tiny")
  teacher_params = transformer.init_params(teacher, jax.random.key(1))
  big = batch_of(student.vocab_size, a.batch, a.seq)
  calls = {
      "student only": step_call(loop.Task("pretrain", pretrain.make_loss(student, loss_cfg)), student, big),
      "distill": step_call(loop.Task("distill", distill.make_loss(student, teacher, loss_cfg), teacher_params),
                           student, big),
      "tiny default": step_call(loop.Task("pretrain", pretrain.make_loss(tiny, loss_cfg)), tiny,
                                batch_of(tiny.vocab_size, 16, 128)),
  }
  x = jax.random.normal(jax.random.key(2), (2048, 2048))
  dot = jax.jit(jnp.dot)
  calls["matmul 2048"] = lambda: jax.block_until_ready(dot(x, x))
  times = time_calls(calls, a.steps)
  med = {k: statistics.median(v) for k, v in times.items()}
  peak = 2 * 2048**3 / min(times["matmul 2048"])
  f_s, f_t = (config.flops_per_token(c, a.seq, backward=False) for c in (student, teacher))
  flop_ratio = (3 * f_s + f_t) / (3 * f_s)
  print(f"{cpu_model()}, {cpu_threads()} cores; jax {jax.__version__}; median of {a.steps} steps")
  print(f"student {config.param_count(student):,} params, teacher {config.param_count(teacher):,} "
        f"({config.param_count(teacher) / config.param_count(student):.2f}x); batch {a.batch} x seq {a.seq}")
  print(markdown_table(["measure", "value"], [
      ["distill step / student step (time)", f"{med['distill'] / med['student only']:.3f}"],
      ["(student fwd+bwd + teacher fwd) / student fwd+bwd (FLOPs)", f"{flop_ratio:.3f}"],
      ["time ratio / FLOP ratio", f"{med['distill'] / med['student only'] / flop_ratio:.3f}"],
      ["tiny default tokens/s (batch 16 x 128)", f"{16 * 128 / med['tiny default']:,.0f}"],
      ["tiny default % of fp32 matmul peak",
       f"{16 * 128 * config.flops_per_token(tiny, 128) / med['tiny default'] / peak:.1%}"],
      ["fp32 matmul peak (GFLOP/s)", f"{peak / 1e9:.1f}"],
  ]))


if __name__ == "__main__":
  main()
