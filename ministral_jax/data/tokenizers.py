"""Mistral tokenizers (SentencePiece and Tekken), loaded offline.

Training and sampling need token ids that match the checkpoint's embedding
table, so the tokenizer must be the exact file the model was trained with.
The `mistral-common` wheel ships the historical Mistral tokenizer files in
`mistral_common/data/`; this module finds them there (no network access) and
also loads any other file by path, e.g. the `tekken.json` that ships with a
Ministral 3 checkpoint.

Bundled names accepted by `load_tokenizer` / `bundled_tokenizer_path`:

  spm_v1          tokenizer.model.v1                           (SentencePiece, 32000 ids)
  spm_v2          mistral_instruct_tokenizer_240216.model.v2   (SentencePiece, 32768 ids)
  spm_v3          mistral_instruct_tokenizer_240323.model.v3   (SentencePiece, 32768 ids)
  spm_v7          mistral_instruct_tokenizer_241114.model.v7   (SentencePiece, 32768 ids)
  spm_v7m1        mistral_instruct_tokenizer_241114.model.v7m1 (same pieces as spm_v7)
  tekken_240718   tekken_240718.json                           (Tekken, 131072 ids)
  tekken_240911   tekken_240911.json                           (Tekken, 131072 ids)
  tekken          alias for tekken_240911

The BPE itself is never re-implemented here: SentencePiece files go through
the `sentencepiece` library, Tekken files through mistral-common's
`Tekkenizer` (tiktoken underneath). This module only adds a uniform surface,
strict special-token lookup and clear errors.

Special tokens: `encode` treats text literally by default, so user text that
happens to contain "[INST]" can never inject a control token; pass
`parse_special=True` to turn special-token strings into their ids. `decode`
drops special tokens by default (clean text for samples); pass
`keep_special=True` to render them by name, which makes
`encode(decode(ids, keep_special=True), parse_special=True) == ids` hold for
Tekken files.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import re
from typing import Iterable, Literal, Mapping, Sequence

from ministral_jax.errors import UserError

Kind = Literal["sentencepiece", "tekken"]

BUNDLED_FILES: Mapping[str, str] = {
    "spm_v1": "tokenizer.model.v1",
    "spm_v2": "mistral_instruct_tokenizer_240216.model.v2",
    "spm_v3": "mistral_instruct_tokenizer_240323.model.v3",
    "spm_v7": "mistral_instruct_tokenizer_241114.model.v7",
    "spm_v7m1": "mistral_instruct_tokenizer_241114.model.v7m1",
    "tekken_240718": "tekken_240718.json",
    "tekken_240911": "tekken_240911.json",
    "tekken": "tekken_240911.json",
}

# Tokens that no bundled file defines, and where to find them instead. Used
# only to make the "unknown special token" error actionable.
_MINISTRAL3_TEKKEN = "Ministral 3's own tekken.json (it ships with the model checkpoint, not with mistral-common)"
_TOKEN_HOMES: Mapping[str, str] = {"[THINK]": _MINISTRAL3_TEKKEN, "[/THINK]": _MINISTRAL3_TEKKEN}

_SPM_SUFFIX = re.compile(r"\.model(\.v\d+(m\d+)?)?$")


class Tokenizer(abc.ABC):
  """Uniform view of one tokenizer file.

  Subclasses only wrap their library's plain-text encode/decode and report
  their special-token table; everything that must behave identically across
  file kinds (bos/eos handling, special-token parsing, strict lookup, id range
  checks) lives here once.
  """

  kind: Kind
  path: pathlib.Path
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int | None

  @property
  @abc.abstractmethod
  def special_tokens(self) -> Mapping[str, int]:
    """Every special/control token string the file defines, mapped to its id."""

  @abc.abstractmethod
  def _encode_plain(self, text: str) -> list[int]:
    """Encode text with no special-token handling and no bos/eos."""

  @abc.abstractmethod
  def _decode_plain(self, ids: list[int]) -> str:
    """Decode a run of ordinary (non-special) ids."""

  @functools.cached_property
  def _special_names(self) -> Mapping[int, str]:
    return {i: name for name, i in self.special_tokens.items()}

  @functools.cached_property
  def _special_pattern(self) -> re.Pattern[str]:
    # Longest first, so a token that is a prefix of another cannot shadow it.
    names = sorted(self.special_tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, names)) + ")")

  def special_id(self, name: str) -> int:
    """Id of a special token; raises instead of silently falling back to <unk>."""
    try:
      return self.special_tokens[name]
    except KeyError:
      raise UserError(_missing_token_message(name, self)) from None

  def is_special(self, token_id: int) -> bool:
    """Lets callers (loss masks, samplers) treat control ids uniformly across file kinds."""
    return token_id in self._special_names

  def encode(self, text: str, *, bos: bool = False, eos: bool = False, parse_special: bool = False) -> list[int]:
    """Text to ids. Special-token strings stay literal text unless `parse_special`.

    SentencePiece adds its dummy-prefix space to each text chunk, so with
    `parse_special` the chunk after a control token is encoded as if it began
    a new sentence (the chat template, not this method, owns that layout).
    """
    ids = self._encode_chunks(text) if parse_special else self._encode_plain(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def _encode_chunks(self, text: str) -> list[int]:
    ids: list[int] = []
    for chunk in self._special_pattern.split(text):
      if chunk in self.special_tokens:
        ids.append(self.special_tokens[chunk])
      elif chunk:
        ids.extend(self._encode_plain(chunk))
    return ids

  def decode(self, ids: Iterable[int], *, keep_special: bool = False) -> str:
    """Ids to text. Special tokens (bos, eos, [INST], ...) are dropped unless `keep_special`."""
    ids = [int(i) for i in ids]
    self._check_ids(ids)
    parts: list[str] = []
    for special, run in itertools.groupby(ids, self.is_special):
      run = list(run)
      if not special:
        parts.append(self._decode_plain(run))
      elif keep_special:
        parts.extend(self._special_names[i] for i in run)
    return "".join(parts)

  def _check_ids(self, ids: Sequence[int]) -> None:
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise UserError(f"token ids {bad[:8]} are outside [0, {self.vocab_size}) for tokenizer {self.path.name}")

  def __repr__(self) -> str:
    return f"{type(self).__name__}(path={str(self.path)!r}, vocab_size={self.vocab_size})"

  def identity(self) -> dict[str, object]:
    """What a checkpoint records about the tokenizer it was trained with (see `check_same`)."""
    return {"kind": self.kind, "source": str(self.path), "sha256": file_sha256(self.path),
            "vocab_size": self.vocab_size}


class SpmTokenizer(Tokenizer):
  """SentencePiece `*.model[.vN]` file (Mistral v1/v2/v3/v7 tokenizers)."""

  kind: Kind = "sentencepiece"

  def __init__(self, path: pathlib.Path):
    import sentencepiece

    self.path = path
    self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None

  @functools.cached_property
  def special_tokens(self) -> Mapping[str, int]:
    # Control pieces plus <unk>: piece_to_id maps every unknown string to
    # <unk>, so only this explicit table can tell "defined" from "missing".
    sp = self._sp
    return {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}

  def _encode_plain(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def _decode_plain(self, ids: list[int]) -> str:
    return self._sp.decode(ids)


class TekkenTokenizer(Tokenizer):
  """Tekken `*.json` file (tiktoken BPE; the first `num_special_tokens` ids are special)."""

  kind: Kind = "tekken"

  def __init__(self, path: pathlib.Path):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    self.path = path
    self._tk = Tekkenizer.from_file(path)
    self.vocab_size = self._tk.n_words
    self.bos_id = self.special_id("<s>")
    self.eos_id = self.special_id("</s>")
    self.pad_id = self.special_tokens.get("<pad>")

  @functools.cached_property
  def special_tokens(self) -> Mapping[str, int]:
    table = {name: self._tk.get_special_token(name) for name in self._tk.vocab()[: self._tk.num_special_tokens]}
    _check_rank_order(table, self.path)
    return table

  def _encode_plain(self, text: str) -> list[int]:
    return self._tk.encode(text, bos=False, eos=False)

  def _decode_plain(self, ids: list[int]) -> str:
    return self._tk.decode(ids)


def _check_rank_order(table: Mapping[str, int], path: pathlib.Path) -> None:
  """Tekkenizer renders special ids by list position but looks names up by rank;
  a file where the two differ would decode to the wrong token names."""
  for position, (name, rank) in enumerate(table.items()):
    if position != rank:
      raise UserError(
          f"{path}: special_tokens must be listed in rank order 0..N-1 with unique names; "
          f"{name!r} sits at position {position} but has rank {rank}"
      )


def _mistral_common_data_dir() -> pathlib.Path:
  spec = importlib.util.find_spec("mistral_common")
  if spec is None or not spec.submodule_search_locations:
    raise UserError("mistral-common is not installed; the bundled tokenizer files ship inside its wheel")
  return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data"


def _bundled_names() -> str:
  return ", ".join(BUNDLED_FILES)


def bundled_tokenizer_path(name: str) -> pathlib.Path:
  """Path of a tokenizer file shipped in the installed mistral-common wheel (no download)."""
  if name not in BUNDLED_FILES:
    raise UserError(f"unknown bundled tokenizer {name!r}; bundled names: {_bundled_names()}")
  path = _mistral_common_data_dir() / BUNDLED_FILES[name]
  if not path.is_file():
    raise UserError(
        f"bundled tokenizer {name!r} should be at {path} but the installed mistral-common has no such file; "
        f"bundled names: {_bundled_names()}"
    )
  return path


def _resolve(spec: str | os.PathLike[str]) -> pathlib.Path:
  """A bundled name wins over a same-named file in the working directory, so configs mean the same everywhere."""
  if isinstance(spec, str) and spec in BUNDLED_FILES:
    return bundled_tokenizer_path(spec)
  path = pathlib.Path(spec).expanduser()
  if path.is_file():
    return path
  what = "no such tokenizer file" if path.suffix or os.sep in str(spec) else "unknown bundled tokenizer"
  raise UserError(f"{what} {str(spec)!r}; pass a file path or one of the bundled names: {_bundled_names()}")


def _kind_of(path: pathlib.Path) -> Kind:
  if path.suffix == ".json":
    return "tekken"
  if _SPM_SUFFIX.search(path.name):
    return "sentencepiece"
  raise UserError(
      f"cannot tell the tokenizer type of {path}: expected a Tekken '*.json' or a SentencePiece "
      f"'*.model' / '*.model.vN' file; bundled names: {_bundled_names()}"
  )


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
  """Load a tokenizer by bundled name (see module docstring) or by file path, offline.

  Every failure (unknown name, missing file, corrupt or unsupported file)
  surfaces as one ValueError, because the caller's fix is always the same:
  point the config at a valid tokenizer.
  """
  path = _resolve(spec)
  cls = TekkenTokenizer if _kind_of(path) == "tekken" else SpmTokenizer
  try:
    tokenizer = cls(path)
    tokenizer.special_tokens  # noqa: B018 - validate the table now, not at first use
  except ValueError as exc:
    raise UserError(f"could not load tokenizer {path}: {exc}; bundled names: {_bundled_names()}") from exc
  except (OSError, RuntimeError, KeyError, TypeError, AssertionError, json.JSONDecodeError) as exc:
    raise UserError(
        f"could not load tokenizer {path}: {type(exc).__name__}: {exc}; bundled names: {_bundled_names()}"
    ) from exc
  return tokenizer


def _bundled_files_defining(name: str) -> list[str]:
  """Cheap scan for the error message: SentencePiece files are tiny; the bundled
  Tekken files carry no explicit special-token list, so mistral-common's
  default table is theirs."""
  from mistral_common.tokens.tokenizers.tekken import Tekkenizer

  found = []
  for bundled, filename in BUNDLED_FILES.items():
    if bundled == "tekken":
      continue
    if filename.endswith(".json"):
      defined = any(t["token_str"] == name for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS)
    else:
      defined = name in SpmTokenizer(bundled_tokenizer_path(bundled)).special_tokens
    if defined:
      found.append(bundled)
  return found


def _missing_token_message(name: str, tokenizer: Tokenizer) -> str:
  message = f"special token {name!r} is not defined in tokenizer file {tokenizer.path}"
  if name in _TOKEN_HOMES:
    return f"{message}; it is defined in {_TOKEN_HOMES[name]}: load that file by path"
  try:
    homes = _bundled_files_defining(name)
  except (ValueError, OSError, RuntimeError):
    homes = []
  if homes:
    return f"{message}; bundled tokenizers that define it: {', '.join(homes)}"
  return f"{message}; no bundled tokenizer defines it, so use a tokenizer file that does"


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Fail before training: ids past the embedding table would index out of bounds (silently clamped under jit)."""
  if tokenizer.vocab_size > model_vocab_size:
    raise UserError(
        f"tokenizer {tokenizer.path.name} has {tokenizer.vocab_size} ids but the model's embedding has only "
        f"{model_vocab_size} rows; set the model config's vocab_size to at least {tokenizer.vocab_size} "
        f"or use a tokenizer with at most {model_vocab_size} ids"
    )


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # part of the cache key only
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
  stat = os.stat(path)
  return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def check_same(expected: Mapping[str, object] | None, actual: Mapping[str, object], expected_what: str,
               actual_what: str) -> None:
  """Two tokenizers are the same when their files are byte-identical (same hash), whatever their paths.

  `expected` is what a checkpoint recorded; None (a checkpoint from elsewhere, e.g. a Hugging Face
  directory) cannot be checked and passes.
  """
  if expected is None:
    return
  if expected.get("sha256") == actual.get("sha256") and expected.get("vocab_size") == actual.get("vocab_size"):
    return
  raise UserError(
      f"tokenizer mismatch: {expected_what} was made with {expected.get('kind')} tokenizer "
      f"{expected.get('source')} ({expected.get('vocab_size')} ids, sha256 {str(expected.get('sha256'))[:12]}), "
      f"but {actual_what} uses {actual.get('kind')} tokenizer {actual.get('source')} ({actual.get('vocab_size')} "
      f"ids, sha256 {str(actual.get('sha256'))[:12]}). Token ids would mean different things; point the job's "
      "tokenizer field at the file the checkpoint was made with."
  )
