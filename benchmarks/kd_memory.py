"""Memory of the distillation loss and its backward, chunked vs full logits, from XLA's analysis.

    python -m benchmarks.kd_memory [--vocab=131072] [--seq=4096] [--batch=1] [--width=3072]
        [--teacher-width=3072] [--seq-chunk=512] [--vocab-chunk=8192]

Compiles, but never runs, `jax.value_and_grad` of the forward-KL loss with
respect to the student's hidden states and LM head, for `losses.kd_loss`
(chunked) and `losses.naive_kd_loss` (full `[batch, seq, vocab]` fp32 logits
of both models). It prints XLA's compiled memory analysis (`temp`: XLA's
scratch buffers; `argument`: the inputs; `output`: the loss and the two
gradients). Only lowering and compiling: nothing of these sizes is allocated,
and the numbers are exact rather than noisy. `temp` is what chunking changes,
and the issue's goal is chunked temp <= 10% of naive. The arguments and
outputs are the same for both (the head's `[width, vocab]` and its gradient
dominate them). The next-token CE (`losses.cross_entropy`, what pretraining
uses) is shown for comparison.

Defaults: Ministral 3 3B's width (3072) and vocabulary (131,072), for student
and teacher alike (`--teacher-width` makes the teacher wider). The chunks are
the trainer's defaults (`pretrain.loss_config`). Hidden states and heads
share a dtype, as `pretrain.hidden_and_head` passes them: fp32, then bf16.
The compiling backend is whatever JAX has (CPU here; on a GPU machine the same
command reports the GPU compiler's buffers).
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.common import markdown_table
from ministral_jax.train import losses

GIB = 2**30


def compiled_memory(loss: str, chunked: bool, batch: int, seq: int, width: int, teacher_width: int,
                    vocab: int, dtype: Any, **chunks: int) -> Any:
  """XLA's memory analysis of `jit(value_and_grad(loss, (student hidden, student head)))`."""
  s = jax.ShapeDtypeStruct
  student = (s((batch, seq, width), dtype), s((width, vocab), dtype))
  mask = s((batch, seq), jnp.float32)
  if loss == "kd":
    rest = (s((batch, seq, teacher_width), dtype), s((teacher_width, vocab), dtype), mask)
    fn = (lambda *a: losses.kd_loss(*a, **chunks)) if chunked else losses.naive_kd_loss
  else:
    rest = (s((batch, seq), jnp.int32), mask)
    fn = (lambda *a: losses.cross_entropy(*a, **chunks)) if chunked else losses.naive_cross_entropy
  grad = jax.value_and_grad(lambda *a: fn(*a)[0], argnums=(0, 1))
  return jax.jit(grad).lower(*student, *rest).compile().memory_analysis()


def rows_for(loss: str, dtype: Any, args: argparse.Namespace) -> list[list[str]]:
  shape = (args.batch, args.seq, args.width, args.teacher_width, args.vocab, dtype)
  chunks = dict(seq_chunk=args.seq_chunk, vocab_chunk=args.vocab_chunk)
  mem = {impl: compiled_memory(loss, impl == "chunked", *shape, **chunks) for impl in ("chunked", "naive")}
  total = {k: m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes for k, m in mem.items()}
  rows = []
  for impl, m in mem.items():
    ratios = ["", ""] if impl == "naive" else [
        f"{m.temp_size_in_bytes / mem['naive'].temp_size_in_bytes:.1%}", f"{total[impl] / total['naive']:.1%}"]
    rows.append([loss.upper(), jnp.dtype(dtype).name, impl] + [
        f"{b / GIB:.3f}" for b in (m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes,
                                   total[impl])] + ratios)
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--vocab", type=int, default=131_072)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--width", type=int, default=3072, help="student d_model")
  p.add_argument("--teacher-width", type=int, default=3072, help="teacher d_model")
  p.add_argument("--seq-chunk", type=int, default=512)
  p.add_argument("--vocab-chunk", type=int, default=8192)
  args = p.parse_args()
  rows = [row for loss in ("kd", "ce") for dtype in (jnp.float32, jnp.bfloat16)
          for row in rows_for(loss, dtype, args)]
  print(f"JAX {jax.__version__}, compiled for {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        "nothing executed")
  print(f"value_and_grad w.r.t. the student's hidden and head: batch {args.batch} x seq {args.seq}, "
        f"vocab {args.vocab:,}, student width {args.width}, teacher width {args.teacher_width} (KD only); "
        f"chunks {args.seq_chunk} tokens x {args.vocab_chunk} columns\n")
  print(markdown_table(["loss", "dtype", "impl", "temp GiB", "argument GiB", "output GiB", "total GiB",
                        "temp chunked/naive", "total chunked/naive"], rows))


if __name__ == "__main__":
  main()
