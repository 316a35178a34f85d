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

Chat examples are never split (a conversation cut in two would train its
second half without the question): `pack_whole` uses grain's first-fit
packer, which fills `bins` rows at a time with whole examples and pads the
rest. Its checkpoint is the parent position where the current group of rows
began plus how many of them were emitted, so a restore re-packs that group
and continues exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import numpy as np

from ministral_jax.data.tokenizers import Tokenizer
from ministral_jax.errors import UserError

Batch = dict[str, np.ndarray]
FEATURES = ("inputs", "targets", "segment_ids", "positions")
# `pack_whole` rows also carry the loss mask; the row-slot state lists documents already emitted under EMITTED.
WHOLE_FEATURES = (*FEATURES, "loss_mask")
EMITTED = "emitted"
_INDEX = "index"


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


def pack_whole(share: grain.MapDataset, to_example: Callable[[Any], Batch], seq_len: int, bins: int,
               read_options: grain.ReadOptions) -> grain.IterDataset:
  """Whole examples (`inputs`, `targets`, `loss_mask`, each at most `seq_len`) first-fit into rows of `seq_len`.

  Rows have `WHOLE_FEATURES`, padding is 0 everywhere (segment id 0, loss
  mask 0). A group of `bins` rows holds documents past the first one not yet
  emitted, so the iterator's state also lists the documents (positions in
  `share`) of the group's rows already emitted: a run continuing this stream
  (`pipeline.stream_position`) then skips exactly those.
  """
  if seq_len < 1 or bins < 1:
    raise UserError(f"seq_len and chat_pack_bins must be positive, got seq_len={seq_len}, bins={bins}")
  examples = share.map_with_index(lambda i, doc: {**to_example(doc), _INDEX: i}).to_iter_dataset(read_options)
  lengths = {k: seq_len for k in ("inputs", "targets", "loss_mask")}
  packed = grain.experimental.FirstFitPackIterDataset(
      examples, length_struct=lengths, num_packing_bins=bins, shuffle_bins=False, meta_features=(_INDEX,))
  return _Tracked(packed)


class _Tracked(grain.IterDataset):
  """The first-fit rows, renamed, with the emitted documents of the current group in the state."""

  def __iter__(self) -> grain.DatasetIterator:
    return _TrackedIterator(self._parent.__iter__())


class _TrackedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._emitted: list[int] = []

  def __next__(self) -> Batch:
    row = next(self._parent)
    # grain's packer state says how many rows of the current group it has emitted; 0 = a group is done.
    if self._parent.get_state()["next_row"] == 0:
      self._emitted = []
    else:
      self._emitted.extend(int(i) for i in row[_INDEX])
    return {"inputs": row["inputs"], "targets": row["targets"], "segment_ids": row["inputs_segment_ids"],
            "positions": row["inputs_positions"], "loss_mask": row["loss_mask"]}

  def get_state(self) -> dict[str, Any]:
    return {"packer": self._parent.get_state(), EMITTED: sorted(self._emitted)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["packer"])
    self._emitted = [int(i) for i in state[EMITTED]]
