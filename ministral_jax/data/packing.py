"""Tokenize documents and pack them into fixed-length rows for next-token training.

Each document becomes [BOS] + tokens + [EOS] and is turned into an
(inputs, targets) pair shifted by one, BEFORE packing, so a target is always
the next token of the same document: packing can place documents side by side
or split a long one across rows, but never pairs an input with a token from a
different document.

Packing is grain's `ConcatThenSplitIterDataset`: documents are concatenated
and cut at `seq_len`, so training rows carry no padding; a document that does
not fit continues at the start of the next row. Its iterator checkpoints by
parent index plus a slice, so restoring is cheap and exact. Every piece gets
its own segment id (1, 2, ... within the row; 0 marks padding, which only the
final row of a finite stream has) and positions restarting at 0, which is what
the model's segment-masked attention and RoPE expect.
"""

from __future__ import annotations

from typing import Callable

import grain
import numpy as np

from ministral_jax.data.tokenizers import Tokenizer
from ministral_jax.errors import UserError

Batch = dict[str, np.ndarray]
FEATURES = ("inputs", "targets", "segment_ids", "positions")


def tokenize_fn(tokenizer: Tokenizer) -> Callable[[str], Batch]:
  """Document text to its shifted (inputs, targets) pair of int32 token arrays."""

  def tokenize(text: str) -> Batch:
    tokens = np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=np.int32)
    return {"inputs": tokens[:-1], "targets": tokens[1:]}

  return tokenize


def _rename(row: Batch) -> Batch:
  # inputs_* and targets_* metadata are identical: both features are split at the same points.
  return {
      "inputs": row["inputs"],
      "targets": row["targets"],
      "segment_ids": row["inputs_segment_ids"],
      "positions": row["inputs_positions"],
  }


def pack(examples: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """(inputs, targets) examples to rows of `seq_len` with segment_ids and positions."""
  if seq_len < 1:
    raise UserError(f"seq_len must be positive, got {seq_len}")
  lengths = {"inputs": seq_len, "targets": seq_len}
  packed = grain.experimental.ConcatThenSplitIterDataset(examples, length_struct=lengths)
  return packed.map(_rename)


def pad_batch(batch: Batch, batch_size: int) -> Batch:
  """Pad a short final batch with all-padding rows (zeros everywhere, segment id 0)."""
  missing = batch_size - len(batch["inputs"])
  return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()} if missing else batch
