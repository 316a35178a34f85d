"""Memory of the distillation loss and its backward: chunked vs full logits, from XLA.

    python -m benchmarks.kd_memory [--vocab=131072] [--seq=4096] [--width=3072] [--teacher_width=3072]

Compiles (never runs) `value_and_grad` of the forward-KL loss with respect to
the student's hidden states and LM head, for both `losses.kd_loss` (chunked)
and `losses.naive_kd_loss` (full `[batch, seq, vocab]` fp32 logits of both
models), and prints XLA's compiled memory analysis. Exact, not noisy; nothing
of that size is allocated. "temp" is what chunking changes; "output" is the
gradients themselves (the head's `[width, vocab]` dominates).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import markdown_table
from ministral_jax.train import losses

GIB = 2**30


def compiled_memory(fn, batch, seq, width, teacher_width, vocab, dtype, **kw):
  s = jax.ShapeDtypeStruct
  args = (s((batch, seq, width), dtype), s((width, vocab), jnp.float32),
          s((batch, seq, teacher_width), dtype), s((teacher_width, vocab), jnp.float32),
          s((batch, seq), jnp.float32))
  grad = jax.value_and_grad(lambda hs, ws, ht, wt, m: fn(hs, ws, ht, wt, m, **kw)[0], argnums=(0, 1))
  return jax.jit(grad).lower(*args).compile().memory_analysis()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--vocab", type=int, default=131_072)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--width", type=int, default=3072)
  p.add_argument("--teacher_width", type=int, default=3072)
  p.add_argument("--seq_chunk", type=int, default=512)
  p.add_argument("--vocab_chunk", type=int, default=8192)
  a = p.parse_args()
  rows = []
  for dtype in (jnp.float32, jnp.bfloat16):
    shape = (a.batch, a.seq, a.width, a.teacher_width, a.vocab, dtype)
    chunked = compiled_memory(losses.kd_loss, *shape, seq_chunk=a.seq_chunk, vocab_chunk=a.vocab_chunk)
    naive = compiled_memory(losses.naive_kd_loss, *shape)
    for name, m in (("chunked", chunked), ("naive", naive)):
      rows.append([jnp.dtype(dtype).name, name, f"{m.temp_size_in_bytes / GIB:.3f}",
                   f"{m.output_size_in_bytes / GIB:.3f}", f"{m.argument_size_in_bytes / GIB:.3f}",
                   f"{chunked.temp_size_in_bytes / naive.temp_size_in_bytes:.1%}" if name == "chunked" else ""])
  print(f"KD loss + backward, batch {a.batch} x seq {a.seq}, vocab {a.vocab}, student width {a.width}, "
        f"teacher width {a.teacher_width}; chunks {a.seq_chunk} tokens x {a.vocab_chunk} columns")
  print(markdown_table(["hidden dtype", "loss", "temp GiB", "output GiB", "argument GiB", "temp chunked/naive"],
                       rows))


if __name__ == "__main__":
  main()
