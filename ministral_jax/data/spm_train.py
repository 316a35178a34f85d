"""Train a small SentencePiece model for tiny experiments, cached by content.

With a tiny model, Mistral's 32K or 131K vocabularies would put most of the
parameters in the embedding table, so small runs train their own tokenizer
on the training text. Training options follow Mistral's own SentencePiece
files (BPE, byte fallback, split digits, no text normalisation) so any text
encodes and `decode(encode(text)) == text`, code indentation included.

The model file is named by a hash of the training sentences and options:
the same corpus always maps to the same file, a second call loads it instead
of retraining, and a changed corpus can never pick up a stale model. Training
itself is deterministic (no sentence sampling), and the file is written to a
temporary name and renamed, so a crashed or concurrent run never leaves a
truncated model behind.

Every model also gets Mistral's instruct control tokens (`CHAT_CONTROL_TOKENS`:
[INST], [/INST], [SYSTEM_PROMPT], [/SYSTEM_PROMPT], [THINK], [/THINK]) as
single control ids right after <unk>/<s>/</s>, so the same tokenizer can
render chat data for SFT (`chat.py`). SentencePiece never produces a control
id from text, so plain encoding, and so pretraining, only loses those 6 ids
of the vocabulary.

A model for image data (`image_tokens=True`, which the pipeline asks for when
`data.image_slots > 0`) also gets `IMAGE_CONTROL_TOKENS` ([IMG], [IMG_BREAK],
[IMG_END]) right after those six, for the image layout `chat.py` renders. Only
then: a text-only model's options, and so its file, name and ids, are exactly
what they were before images existed.

`vocab_size` is an upper bound: a corpus too small to support that many
merges yields fewer pieces instead of failing, which still fits a model sized
for `vocab_size`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import tempfile
from typing import Iterable

from ministral_jax.errors import UserError

# Input cap: a few MB trains in seconds on 2 cores and is plenty for <=8K pieces.
MAX_TRAIN_CHARS = 4_000_000
# SentencePiece drops longer sentences; minified or data lines are not worth learning from.
_MAX_SENTENCE_BYTES = 16384
_SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
CHAT_CONTROL_TOKENS = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[THINK]", "[/THINK]")
IMAGE_CONTROL_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
_TRAINER_OPTIONS = {
    "model_type": "bpe",
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "byte_fallback": True,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "character_coverage": 0.9995,
    "max_sentence_length": _MAX_SENTENCE_BYTES,
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "hard_vocab_limit": False,
    "control_symbols": list(CHAT_CONTROL_TOKENS),
    **_SPECIAL_IDS,
}
# 256 byte pieces + unk/bos/eos + the chat (and image) control tokens, plus room for merges.
MIN_VOCAB_SIZE = 300


def _options(image_tokens: bool) -> dict:
  if not image_tokens:
    return _TRAINER_OPTIONS  # text-only models stay byte-identical (and keep their cache names)
  return {**_TRAINER_OPTIONS, "control_symbols": [*CHAT_CONTROL_TOKENS, *IMAGE_CONTROL_TOKENS]}


def training_sentences(documents: Iterable[str], max_chars: int = MAX_TRAIN_CHARS) -> list[str]:
  """Non-blank lines of the documents, in order, until `max_chars` characters."""
  sentences, total = [], 0
  for document in documents:
    for line in document.splitlines():
      if line.strip() and len(line.encode("utf-8", errors="replace")) <= _MAX_SENTENCE_BYTES:
        sentences.append(line)
        total += len(line)
        if total >= max_chars:
          return sentences
  return sentences


def _fingerprint(sentences: list[str], vocab_size: int, options: dict) -> str:
  digest = hashlib.sha256(json.dumps({"vocab_size": vocab_size, **options}, sort_keys=True).encode())
  for sentence in sentences:
    digest.update(sentence.encode("utf-8", errors="surrogatepass") + b"\n")
  return digest.hexdigest()[:16]


def _train_bytes(sentences: list[str], vocab_size: int, options: dict) -> bytes:
  import sentencepiece

  model = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        num_threads=min(2, os.cpu_count() or 1), minloglevel=2, **options,
    )
  except RuntimeError as exc:
    raise UserError(f"SentencePiece training with vocab_size={vocab_size} failed: {exc}") from exc
  return model.getvalue()


def train_or_load(documents: Iterable[str], vocab_size: int, cache_dir: str | os.PathLike[str], *,
                  image_tokens: bool = False) -> pathlib.Path:
  """Path of a SentencePiece model trained on `documents`, training it only if no cached copy exists.

  `image_tokens` adds [IMG], [IMG_BREAK], [IMG_END] as control ids (for conversations with images).
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise UserError(
        f"spm_vocab_size={vocab_size} is too small: byte fallback alone needs 259 ids; use at least {MIN_VOCAB_SIZE}"
    )
  sentences = training_sentences(documents)
  if not sentences:
    raise UserError("cannot train a SentencePiece model: the training documents contain no text")
  options = _options(image_tokens)
  cache_dir = pathlib.Path(cache_dir)
  path = cache_dir / f"spm_{vocab_size}_{_fingerprint(sentences, vocab_size, options)}.model"
  if path.is_file():
    return path
  cache_dir.mkdir(parents=True, exist_ok=True)
  data = _train_bytes(sentences, vocab_size, options)
  fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp_", suffix=".model")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path
