"""The input pipeline the trainer calls: config block, tokenizer, train and eval batches.

Training data is an infinite (or `epochs`-long), seeded stream of packed
global batches whose position is a small JSON-serialisable state: the trainer
saves `it.get_state()` next to the model checkpoint and a fresh iterator
given that state with `set_state` continues the exact same stream, so a
resumed run sees the same batches an uninterrupted one would have.

Row slots. Row r of every global batch of B rows is the next packed row of
slot r: documents r, r+B, r+2B, ... of the shuffled stream, concatenated and
cut on their own. A process materialises only its rows of the batch (the
rows its devices hold, `Partitioner.process_rows`) and tokenizes only their
documents, so 2 processes x 4 devices see exactly the global batches that 1
process x 8 devices sees, each host reads its own share, and a checkpoint
(the state of every slot) resumes on any process count.

Everything is grain: a random-access `MapDataset` of documents (see
`sources.py`) is shuffled (reshuffled every epoch), split into slots,
tokenized lazily and packed by grain's checkpointable concat-then-split (see
`packing.py`), each slot reading ahead on its own thread; the slots are
zipped into batches. Chat data (`chat.py`) rides on the same machinery
(`slot_iterator`), with a packer that keeps each conversation whole.

All configuration and data errors (unknown source, missing or empty files,
globs matching nothing, an empty split) are raised when the iterator or the
tokenizer is built, before the first training step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from typing import Any, Callable, Iterator, Mapping

import grain
import ml_collections
import numpy as np

from ministral_jax.data import packing, sources, spm_train
from ministral_jax.data.tokenizers import Tokenizer, load_tokenizer
from ministral_jax.errors import UserError

SOURCES = ("builtin", "text", "jsonl", "tfds", "chat", "preference")
SPLITS = ("train", "eval")
STATE_VERSION = 2
# Eval passes tokenize a few ms per document on a few threads; a small read-ahead keeps them cheap.
READ_OPTIONS = grain.ReadOptions(num_threads=min(4, os.cpu_count() or 1), prefetch_buffer_size=32)
# Each training slot tokenizes a couple of documents ahead on its own thread.
SLOT_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
# The tokenizer's training sample is drawn in this fixed order, independent of the run's seed.
_SPM_SAMPLE_SEED = 0


def data_config() -> ml_collections.ConfigDict:
  """The `data` block of an experiment config, with defaults.

  source: "builtin" (Python stdlib text, no download), "text", "jsonl", "tfds", or
    "chat": JSONL conversations ({"messages": [...]}, see `chat.py`) for SFT, read
    by `chat.chat_iterator` / `chat.chat_eval_batches`; here (the tokenizer's
    training text) a conversation is the text of its messages; or "preference":
    JSONL pairs (prompt, chosen, rejected[, p], see `preference.py`) for DPO.
  paths / eval_paths: comma-separated files or globs for text/jsonl/chat. Without
    eval_paths the eval split is a fixed ~2% hash hold-out of the documents in
    `paths` (see `sources.py`); with eval_paths, all of `paths` is training data.
  text_unit: what one document is in a text file: "paragraph", "line" or "file".
  tokenizer: "spm_train" trains a SentencePiece model of at most spm_vocab_size
    ids on the train split, cached in <workdir>/tokenizer/; anything else is a
    bundled name or a file path for `tokenizers.load_tokenizer`.
  max_documents: keep only the first N training documents (0 = all).
  start_document, skip_documents: where the training stream starts, for a run that
    continues another's (the next stage of a cascade): the first position of the
    shuffled stream that run did not read, and the comma-separated positions past
    it that it did read (its slots stop at different places). `stream_position`
    of the other run's final state gives both; no document is read twice and none
    is left out.
  epochs: passes over the training documents before the stream ends with a clear
    error (0 = repeat forever, each epoch reshuffled).
  chat_pack_bins: (source "chat") each row slot packs whole conversations first-fit
    into this many rows at a time; more rows waste less padding and hold more
    conversations in flight.
  image_slots: (source "chat") image patches one row may hold, a multiple of
    image_merge**2 (0 = text only, the default: batches carry no image features and
    image chunks in the data are an error). With it, batches also carry the rows'
    patch buffers (`vision.from_batch`) and a conversation whose images need more
    patches than this is cut or dropped like one longer than seq_len. "spm_train"
    then also gives its tokenizer [IMG], [IMG_BREAK], [IMG_END].
  image_preprocess: how the project's own renderer (spm_train tokenizers) resizes
    and normalises images: "mistral" (mistral-common's ImageEncoder) or "hf"
    (transformers' PixtralImageProcessor); see `images.py`. Mistral tokenizer files
    always use mistral-common's.
  image_patch_size, image_merge, image_max_size: the vision tower's patch side,
    spatial merge and longest image side (the trainer fills them from the model).
  """
  return ml_collections.ConfigDict({
      "source": "builtin",
      "paths": "",
      "eval_paths": "",
      "jsonl_field": "text",
      "text_unit": "paragraph",
      "tfds_name": "",
      "tfds_data_dir": "",
      "tfds_train_split": "train",
      "tfds_eval_split": "validation",
      "tfds_field": "text",
      "tokenizer": "spm_train",
      "spm_vocab_size": 1024,
      "seq_len": 128,
      "shuffle_seed": 0,
      "max_documents": 0,
      "start_document": 0,
      "skip_documents": "",
      "epochs": 0,
      "chat_pack_bins": 8,
      "image_slots": 0,
      "image_preprocess": "mistral",
      "image_patch_size": 14,
      "image_merge": 2,
      "image_max_size": 1540,
  })
# A handoff listing more skipped positions than this starts past them instead (some documents are then
# left out, logged): at real scale that is a tiny fraction, and configs stay small.
MAX_SKIPPED = 20_000


def _file_documents(data_cfg: ml_collections.ConfigDict, split: str) -> list[sources.Entry]:
  field = data_cfg.jsonl_field if data_cfg.source == "jsonl" else None
  entries = lambda patterns: sources.file_entries(patterns, jsonl_field=field, text_unit=data_cfg.text_unit)
  if data_cfg.eval_paths:
    return [entry for _, entry in entries(data_cfg.paths if split == "train" else data_cfg.eval_paths)]
  return sources.split_entries(entries(data_cfg.paths), split)


def documents(data_cfg: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
  """The split's documents as a random-access dataset of strings (max_documents applies to train)."""
  if data_cfg.source not in SOURCES:
    raise UserError(f"unknown data source {data_cfg.source!r}; expected one of {SOURCES}")
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; expected one of {SPLITS}")
  what = f"data source {data_cfg.source!r} ({split} split)"
  if data_cfg.source == "tfds":
    tfds_split = data_cfg.tfds_train_split if split == "train" else data_cfg.tfds_eval_split
    docs = sources.tfds_dataset(
        data_cfg.tfds_name, tfds_split, data_dir=data_cfg.tfds_data_dir, field=data_cfg.tfds_field
    )
  elif data_cfg.source == "builtin":
    docs = sources.as_dataset(sources.split_entries(sources.builtin_entries(), split), what)
  elif data_cfg.source == "chat":
    from ministral_jax.data import chat  # chat builds on this module

    docs = grain.MapDataset.source(chat.split_conversations(data_cfg, split)).map(chat.plain_text)
  elif data_cfg.source == "preference":
    from ministral_jax.data import preference  # builds on chat, which builds on this module

    docs = grain.MapDataset.source(preference.split_pairs(data_cfg, split)).map(preference.plain_text)
  else:
    docs = sources.as_dataset(_file_documents(data_cfg, split), what)
  if split == "train" and data_cfg.max_documents > 0:
    docs = docs[: data_cfg.max_documents]
  return docs


def build_tokenizer(data_cfg: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """Load the configured tokenizer, or train (once, cached by corpus hash) a SentencePiece on the train split."""
  if data_cfg.tokenizer != "spm_train":
    return load_tokenizer(data_cfg.tokenizer)
  docs = documents(data_cfg, "train").shuffle(seed=_SPM_SAMPLE_SEED)
  sample = (docs[i] for i in range(len(docs)))  # read lazily: training stops at a character cap
  path = spm_train.train_or_load(sample, data_cfg.spm_vocab_size, tokenizer_cache(workdir),
                                 image_tokens=data_cfg.get("image_slots", 0) > 0)
  return load_tokenizer(path)


def tokenizer_cache(workdir: str) -> pathlib.Path:
  """`<workdir>/tokenizer`, or a local cache for a gs:// workdir: SentencePiece reads local files, and
  the model's name is a hash of its corpus and options, so hosts and runs can share it."""
  if "://" in str(workdir):
    return pathlib.Path(os.path.expanduser("~/.cache/ministral_jax/tokenizer"))
  return pathlib.Path(workdir) / "tokenizer"


def _mix_seed(*seeds: int) -> int:
  """A 32-bit shuffle seed. Hashing keeps seeds apart: grain reshuffles epoch e with seed+e,
  so raw seeds 0 and 1 would replay each other's epochs one epoch apart."""
  return int.from_bytes(hashlib.sha256(repr(seeds).encode()).digest()[:4], "big")


def _batches(docs: grain.MapDataset, tokenizer: Tokenizer, seq_len: int, batch_size: int) -> grain.IterDataset:
  """Tokenize lazily (a few threads read ahead), pack, batch: one stream (the eval passes)."""
  if batch_size < 1:
    raise UserError(f"batch_size must be positive, got {batch_size}")
  examples = docs.map(packing.tokenize_fn(tokenizer)).to_iter_dataset(READ_OPTIONS)
  return packing.pack(examples, seq_len).batch(batch_size)


def _rows(rows: tuple[int, int] | None, global_batch: int) -> tuple[int, int]:
  start, stop = rows or (0, global_batch)
  if global_batch < 1 or not 0 <= start < stop <= global_batch:
    raise UserError(f"rows {rows} are not a range within the global batch of {global_batch}")
  return start, stop


class _Order(grain.MapDataset):
  """The shuffled stream from `start` on, without the `skip` positions an earlier run read: this run's
  position j is the stream's position `base(j)`."""

  def __init__(self, parent: grain.MapDataset, start: int, skip: list[int]):
    super().__init__(parent)
    skipped = set(skip)
    self._head = [p for p in range(start, max(skip) + 1) if p not in skipped] if skip else []
    self._tail = max(skip) + 1 if skip else start

  def base(self, j: int) -> int:
    return self._head[j] if j < len(self._head) else self._tail + j - len(self._head)

  def __len__(self) -> int:
    return max(0, len(self._head) + len(self._parent) - self._tail)

  def __str__(self) -> str:
    return f"_Order(head={len(self._head)}, tail={self._tail})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.base(index)]


def _skip_list(text: str) -> list[int]:
  try:
    return sorted({int(p) for p in text.split(",") if p.strip()})
  except ValueError:
    raise UserError(f"data.skip_documents={text!r} must be comma-separated stream positions") from None


def _stack(rows: tuple[packing.Batch, ...]) -> packing.Batch:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def slot_iterator(
    data_cfg: ml_collections.ConfigDict,
    docs: grain.MapDataset,
    tokenizer: Tokenizer,
    global_batch: int,
    seed: int,
    rows: tuple[int, int] | None,
    *,
    pack_slot: Callable[[grain.MapDataset], grain.IterDataset],
    identity: Mapping[str, Any] | None = None,
    stats: Mapping[str, int] | None = None,
) -> DataIterator:
  """The row-slot stream over `docs` that every training iterator shares (see the module docstring).

  `pack_slot` turns one slot's share of the shuffled stream (documents r, r+B,
  ... as a MapDataset) into its packed rows; it is the only part that differs
  between data kinds, so shuffling, epochs, the start/skip handoff, the
  per-process rows and the checkpoint format are the same for all of them.
  `identity` adds what else a saved state must match; `stats` rides along for
  the trainer to log.
  """
  start, stop = _rows(rows, global_batch)
  shuffle_seed = _mix_seed(data_cfg.shuffle_seed, seed)
  skip = _skip_list(data_cfg.skip_documents)
  if skip and skip[0] <= data_cfg.start_document:
    raise UserError(f"data.skip_documents must all lie after data.start_document={data_cfg.start_document}")
  stream = _Order(docs.shuffle(seed=shuffle_seed).repeat(data_cfg.epochs or None), data_cfg.start_document, skip)
  slots = [pack_slot(stream[r::global_batch]) for r in range(start, stop)]
  batches = grain.experimental.ZipIterDataset(slots, strict=False).map(_stack)
  full_identity = {
      "source": data_cfg.source,
      "documents": len(docs),
      "seq_len": data_cfg.seq_len,
      "shuffle_seed": shuffle_seed,
      "global_batch": global_batch,
      "tokenizer": f"{tokenizer.path.name}:{tokenizer.vocab_size}",
      "start_document": data_cfg.start_document,
      "skip_documents": skip,
      "epochs": data_cfg.epochs,
      **(identity or {}),
  }
  return DataIterator(iter(batches), identity=full_identity, rows=(start, stop), stats=stats)


def train_iterator(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    global_batch: int,
    seed: int,
    rows: tuple[int, int] | None = None,
) -> DataIterator:
  """This process's rows `[start, stop)` of each packed global batch (dicts of int32 [stop - start, seq_len]).

  Row r comes from slot r (see the module docstring), so the global batches do
  not depend on how many processes read them. Each epoch is reshuffled with a
  seed derived from (data_cfg.shuffle_seed, seed, epoch).
  """
  tokenize = packing.tokenize_fn(tokenizer)

  def pack_slot(share: grain.MapDataset) -> grain.IterDataset:
    return packing.pack(share.map(tokenize).to_iter_dataset(SLOT_READ_OPTIONS), data_cfg.seq_len)

  return slot_iterator(data_cfg, documents(data_cfg, "train"), tokenizer, global_batch, seed, rows,
                       pack_slot=pack_slot)


def _slot_documents_read(state: Any) -> int:
  """Documents one slot's packer has taken from its share of the stream, from grain's nested state.

  The packer's state is its parent's position before the documents in its
  buffer, plus how many those are (`elements_from_buffer_after_checkpoint`):
  a document it has started is counted as read, so a stream continued from
  here (`start_document`) never repeats any part of it.
  """
  if isinstance(state, dict):
    if "next_index" in state:
      return int(state["next_index"])
    if "parent_state" in state:
      return _slot_documents_read(state["parent_state"]) + int(state.get("elements_from_buffer_after_checkpoint", 0))
    return max((_slot_documents_read(v) for v in state.values()), default=0)
  return 0


def _slot_read(state: Any) -> tuple[int, set[int]]:
  """(n, extra): a slot has read its documents 0..n-1 and the ones in `extra` (all >= n).

  A packer that fills several rows at once (chat's whole-conversation packing,
  `packing.pack_whole`) emits rows holding documents past the first one it has
  not emitted yet; it lists those under `emitted`. Other packers read a prefix.
  """
  n = _slot_documents_read(state)
  extra = state.get(packing.EMITTED, ()) if isinstance(state, dict) else ()
  return n, {int(k) for k in extra if int(k) >= n}


def _first_unread(n: int, extra: set[int]) -> int:
  while n in extra:
    n += 1
  return n


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
  """The states of every process (in any order, from any process count) as one state of all slots."""
  if not states:
    raise UserError("no data-iterator state to restore")
  for st in states:
    if st.get("version") != STATE_VERSION:
      raise UserError(f"data iterator state has version {st.get('version')!r}; this code reads {STATE_VERSION}. "
                      "It was written by an older ministral_jax; resume it with that version or start a new run.")
  pipe = states[0]["pipeline"]
  slots = {k: v for st in states for k, v in st["slots"].items()}
  merged = {"version": STATE_VERSION, "pipeline": pipe, "slots": slots}
  if len(slots) == pipe["global_batch"]:  # every process's state: where the whole stream stopped
    start, skip = stream_position(merged)
    merged.update(next_document=start, skip_documents=skip, epoch=start // pipe["documents"])
  return merged


def read_positions(state: dict[str, Any]) -> set[int]:
  """The stream positions (documents) every slot of a run has read, from its merged state."""
  pipe, batch = state["pipeline"], state["pipeline"]["global_batch"]
  order = _Order(grain.MapDataset.range(0), pipe["start_document"], pipe.get("skip_documents", []))
  positions = set()
  for r, v in state["slots"].items():
    n, extra = _slot_read(v)
    positions.update(order.base(int(r) + batch * k) for k in [*range(n), *extra])
  return positions


def stream_position(state: dict[str, Any]) -> tuple[int, list[int]]:
  """(start_document, skip_documents) for a run that continues where `state`'s run stopped: the first
  stream position no slot has read, and the positions past it that some slot has (a document a slot has
  started counts as read). Over `MAX_SKIPPED` of those, the next run starts after all of them instead."""
  pipe, batch = state["pipeline"], state["pipeline"]["global_batch"]
  order = _Order(grain.MapDataset.range(0), pipe["start_document"], pipe.get("skip_documents", []))
  read = {int(r): _slot_read(v) for r, v in state["slots"].items()}
  if len(read) != batch:
    raise UserError(f"the data state holds {len(read)} of the {batch} rows' slots; it is incomplete")
  # Every position of this run before `first` was read.
  first = min(r + batch * _first_unread(n, extra) for r, (n, extra) in read.items())
  ahead = [r + batch * k for r, (n, extra) in read.items()
           for k in [*range(max(0, -(-(first - r) // batch)), n), *extra] if r + batch * k > first]
  start = order.base(first)
  skip = sorted({p for p in pipe.get("skip_documents", []) if p > start} | {order.base(j) for j in ahead})
  if len(skip) > MAX_SKIPPED:
    logging.warning("The next run starts after %d positions some slots already read; %d documents in between "
                    "are left out.", len(skip), skip[-1] + 1 - start - len(skip))
    return skip[-1] + 1, []
  return start, skip


def _from_json(state: Any) -> Any:
  """Undo JSON's tuple-to-list conversion; grain's packer compares its slices with tuples."""
  if isinstance(state, dict):
    return {k: _from_json(v) for k, v in state.items()}
  if isinstance(state, list):
    return tuple(_from_json(v) for v in state)
  return state


class DataIterator(grain.DatasetIterator):
  """A grain iterator whose JSON state is one entry per slot, plus which pipeline it belongs to.

  `get_state()` holds this process's slots; `merge_states` joins every
  process's, and `set_state` takes any state holding this process's slots (so
  a run resumes on another number of processes). A state saved by a pipeline
  with a different corpus size, seq_len, seed, global batch or tokenizer is
  refused, since continuing from it would silently produce a different stream.
  `next_document` and `skip_documents` say where the stream stopped, for a run
  that continues it (`stream_position`). `stats` holds counts the pipeline
  wants the trainer to report (chat: conversations truncated or dropped).
  """

  def __init__(self, parent: grain.DatasetIterator, *, identity: dict[str, Any], rows: tuple[int, int],
               stats: Mapping[str, int] | None = None):
    super().__init__(parent)
    self._identity, self._rows = identity, rows
    self.stats: dict[str, int] = dict(stats or {})

  def __next__(self) -> packing.Batch:
    return next(self._parent)

  def _slot_states(self) -> list[Any]:
    state = self._parent.get_state()  # map -> zip: {"parents": [slot, ...]}
    while "parents" not in state:
      state = state.get("parent", state.get("parent_state"))
    return state["parents"]

  def get_state(self) -> dict[str, Any]:
    start, _ = self._rows
    return merge_states([{"version": STATE_VERSION, "pipeline": dict(self._identity),
                          "slots": {str(start + i): s for i, s in enumerate(self._slot_states())}}])

  def set_state(self, state: dict[str, Any]) -> None:
    state = merge_states([state])
    saved, current = state["pipeline"], self._identity
    if saved != current:
      keys = sorted(current.keys() | saved.keys())
      diff = {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}
      raise UserError(f"data iterator state belongs to a different pipeline (saved vs now): {diff}")
    wanted = [str(r) for r in range(*self._rows)]
    missing = [r for r in wanted if r not in state["slots"]]
    if missing:
      raise UserError(f"the data-iterator state lacks rows {missing[:8]} of the global batch; it was saved by "
                      "another pipeline")
    inner = self._parent.get_state()
    _replace_slots(inner, [_from_json(state["slots"][r]) for r in wanted])
    self._parent.set_state(inner)


def _replace_slots(state: dict, slots: list[Any]) -> None:
  while "parents" not in state:
    state = state.get("parent", state.get("parent_state"))
  state["parents"] = slots


def eval_stream(batches: grain.IterDataset, batch_size: int, max_batches: int, rows: tuple[int, int] | None
                ) -> Iterator[packing.Batch]:
  """This process's `rows` of each global eval batch, the last one padded to `batch_size` rows."""
  start, stop = _rows(rows, batch_size)
  for count, batch in enumerate(batches):
    if max_batches and count >= max_batches:
      return
    yield {k: v[start:stop] for k, v in packing.pad_batch(batch, batch_size).items()}


def eval_batches(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    batch_size: int,
    split: str = "eval",
    max_batches: int = 0,
    rows: tuple[int, int] | None = None,
) -> Iterator[packing.Batch]:
  """One deterministic, unshuffled pass over a split in global batches of `batch_size` rows (this process's
  `rows` of each); the last batch is padded with segment-0 rows. Every process packs the whole split
  (eval splits are small), so the batches do not depend on the process count."""
  batches = _batches(documents(data_cfg, split), tokenizer, data_cfg.seq_len, batch_size)
  return eval_stream(batches, batch_size, max_batches, rows)


def eval_batches_from_file(
    path: str, data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, batch_size: int, max_batches: int = 0,
    rows: tuple[int, int] | None = None,
) -> Iterator[packing.Batch]:
  """Like `eval_batches`, over every document of one file: JSON Lines if it ends in .jsonl, else plain text."""
  field = data_cfg.jsonl_field if str(path).endswith(".jsonl") else None
  keyed = sources.file_entries([str(path)], jsonl_field=field, text_unit=data_cfg.text_unit)
  docs = sources.as_dataset([entry for _, entry in keyed], f"eval file {path}")
  return eval_stream(_batches(docs, tokenizer, data_cfg.seq_len, batch_size), batch_size, max_batches, rows)
