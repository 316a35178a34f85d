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

Images (chat with `image_slots` > 0): an example also carries its images'
patches in merge order (`PATCH_FEATURES`: patches [n, p, p, 3] float32,
patch_rows, patch_cols, patch_image [n] int32, the image's index within the
example; n = 0 for a text-only example), and the first-fit packer budgets them
per row like the tokens, so a row's patches and its `[IMG]` tokens come from
the same conversations in the same order. A row then carries `IMAGE_FEATURES`
[image_slots, ...]: its patch buffer with a row-unique image id per patch
(0, 1, ... in order; `PAD_IMAGE` on padding), what `vision.Images` takes
(`vision.from_batch`).
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import numpy as np

from ministral_jax.data.tokenizers import Tokenizer
from ministral_jax.errors import UserError
from ministral_jax.model import vision

Batch = dict[str, np.ndarray]
FEATURES = ("inputs", "targets", "segment_ids", "positions")
# `pack_whole` rows also carry the loss mask; the row-slot state lists documents already emitted under EMITTED.
WHOLE_FEATURES = (*FEATURES, "loss_mask")
EMITTED = "emitted"
_INDEX = "index"
# An example's image patches (n of them) and a packed row's patch buffer (image_slots of them).
PATCH_FEATURES = ("patches", "patch_rows", "patch_cols", "patch_image")
IMAGE_FEATURES = vision.BATCH_KEYS  # what `vision.from_batch` turns into the model's `Images`
PAD_IMAGE = vision.PAD_IMAGE
_PAD_VALUES = {"patch_images": PAD_IMAGE}


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
  """Pad a short final batch with all-padding rows (zeros everywhere, segment id 0, image id PAD_IMAGE)."""
  missing = batch_size - len(batch["inputs"])
  if not missing:
    return batch
  return {k: np.pad(v, ((0, missing),) + ((0, 0),) * (v.ndim - 1), constant_values=_PAD_VALUES.get(k, 0))
          for k, v in batch.items()}


def pack_whole(share: grain.MapDataset, to_example: Callable[[Any], Batch], seq_len: int, bins: int,
               read_options: grain.ReadOptions, image_slots: int = 0) -> grain.IterDataset:
  """Whole examples (`inputs`, `targets`, `loss_mask`, each at most `seq_len`) first-fit into rows of `seq_len`.

  Rows have `WHOLE_FEATURES`, padding is 0 everywhere (segment id 0, loss
  mask 0). A group of `bins` rows holds documents past the first one not yet
  emitted, so the iterator's state also lists the documents (positions in
  `share`) of the group's rows already emitted: a run continuing this stream
  (`pipeline.stream_position`) then skips exactly those.

  With `image_slots` > 0 examples also carry `PATCH_FEATURES` (at most
  `image_slots` patches each) and rows also `IMAGE_FEATURES` (see the module
  docstring).
  """
  if seq_len < 1 or bins < 1 or image_slots < 0:
    raise UserError(f"seq_len and chat_pack_bins must be positive and image_slots not negative, got "
                    f"seq_len={seq_len}, bins={bins}, image_slots={image_slots}")
  examples = share.map_with_index(lambda i, doc: {**to_example(doc), _INDEX: i}).to_iter_dataset(read_options)
  lengths = {k: seq_len for k in ("inputs", "targets", "loss_mask")}
  if image_slots:
    lengths.update({k: image_slots for k in PATCH_FEATURES})
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
    out = {"inputs": row["inputs"], "targets": row["targets"], "segment_ids": row["inputs_segment_ids"],
           "positions": row["inputs_positions"], "loss_mask": row["loss_mask"]}
    if "patches" in row:
      out.update(patches=row["patches"], patch_rows=row["patch_rows"], patch_cols=row["patch_cols"],
                 patch_images=_row_image_ids(row["patch_image_segment_ids"], row["patch_image"]))
    return out

  def get_state(self) -> dict[str, Any]:
    return {"packer": self._parent.get_state(), EMITTED: sorted(self._emitted)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["packer"])
    self._emitted = [int(i) for i in state[EMITTED]]


def _row_image_ids(segments: np.ndarray, image: np.ndarray) -> np.ndarray:
  """Row-unique image ids 0, 1, ... from (example's segment id in the row, image index in the example).

  The packer appends each example's patches after the row's earlier ones, so a
  row's real patches come first and an image's patches are contiguous: a new
  image starts wherever the (segment, index) pair changes. Padding (segment 0)
  gets PAD_IMAGE.
  """
  real = segments > 0
  change = np.ones(len(segments), bool)
  change[1:] = (segments[1:] != segments[:-1]) | (image[1:] != image[:-1])
  return np.where(real, np.cumsum(change) - 1, PAD_IMAGE).astype(np.int32)
