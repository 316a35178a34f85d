"""Document sources: where training text comes from, as grain `MapDataset`s of str.

Every source is exposed the same way (a random-access `MapDataset` whose
elements are document strings), so shuffling, per-process sharding and
checkpointed iteration live once in `pipeline.py` and never depend on the
source. Documents are read lazily; only a small index (file spans) is built up
front, and that indexing pass is also where empty or missing data is reported,
as one ValueError before any training step.

Sources:
  builtin  The Python standard library that ships with the running
           interpreter: one document per `.py` source file (code plus
           docstrings) and one per `pydoc_data` help topic. No download. The
           corpus (and so the split) changes with the Python version.
  text     Plain-text files and globs; a document is a paragraph (blank-line
           separated, the default), a line, or a whole file (`text_unit`).
  jsonl    JSON Lines files and globs; a document is one record's text field.
  tfds     A prepared TFDS dataset read through `tfds.data_source`
           (array_record files; no TensorFlow needed).

Hold-out: builtin, and text/jsonl without `eval_paths`, put a document in the
eval split when a SHA-256 hash of its key (path relative to the corpus root,
plus ":<index>" for sub-file records) falls in the lowest EVAL_FRACTION. Keys
hold no machine-specific paths, so the split is the same everywhere, and
adding files never moves existing documents between splits.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import sysconfig
from typing import Any, Callable, Sequence

import grain

from ministral_jax.errors import UserError

_MAX_LISTED = 10  # bad records named in one error
EVAL_FRACTION = 0.02
TEXT_UNITS = ("paragraph", "line", "file")

# Directory names under the stdlib that hold third-party code, build
# artefacts, or test data (huge, synthetic, sometimes deliberately malformed).
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "lib-dynload", "__pycache__", "test", "tests", "idle_test"}
)
# Files whose text depends on the build machine rather than the Python version,
# plus the topics module, which enters the corpus as its individual topics.
_STDLIB_SKIP_FILES = ("_sysconfigdata", "pydoc_data/topics.py")


@dataclasses.dataclass(frozen=True)
class Span:
  """A document stored as bytes [start, stop) of a file; `field` names its JSON text field."""

  path: str
  start: int
  stop: int
  field: str | None = None

  def raw(self) -> bytes:
    with open(self.path, "rb") as f:
      f.seek(self.start)
      return f.read(self.stop - self.start)

  def read(self) -> str:
    raw = self.raw()
    return json.loads(raw)[self.field] if self.field else raw.decode("utf-8", errors="replace")


Entry = Span | str  # a document to read lazily, or its text already in memory


def _read_entry(entry: Entry) -> str:
  return entry if isinstance(entry, str) else entry.read()


def _stable_fraction(key: str) -> float:
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_entries(keyed: Sequence[tuple[str, Entry]], split: str) -> list[Entry]:
  """The fixed hash hold-out (see module docstring); with 2+ documents the eval split is never empty."""
  if split not in ("train", "eval"):
    raise UserError(f"unknown split {split!r}; expected 'train' or 'eval'")
  fractions = [_stable_fraction(key) for key, _ in keyed]
  in_eval = [f < EVAL_FRACTION for f in fractions]
  if len(keyed) > 1 and not any(in_eval):
    in_eval[fractions.index(min(fractions))] = True
  return [entry for (_, entry), e in zip(keyed, in_eval) if e == (split == "eval")]


def keyed_jsonl(paths: str, parse: Callable[[Any, str], Any], what: str) -> list[tuple[str, Any]]:
  """(hold-out key, `parse(record, "file:line")`) for every non-blank line of the JSONL files, keyed by the
  path relative to the files' common folder and the record's index (so the hold-out does not depend on where
  the files lie). Every bad line (not JSON, or `parse` raising a UserError) is listed in one UserError."""
  files = expand_paths(paths)
  root = os.path.commonpath([os.path.dirname(f) for f in files])
  keyed, problems = [], []
  for path in files:
    rel, count, before = pathlib.Path(os.path.relpath(path, root)).as_posix(), 0, len(problems)
    with open(path, "rb") as f:
      for number, raw in enumerate(f, 1):
        if not raw.strip():
          continue
        where = f"{path}:{number}"
        try:
          keyed.append((f"{rel}:{count}", parse(json.loads(raw), where)))
          count += 1
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
          problems.append(f"{where}: not valid JSON ({exc})")
        except UserError as exc:
          problems.append(str(exc))
    if not count and len(problems) == before:
      problems.append(f"{path}: the file holds no {what}s")
  if problems:
    listed = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - len(listed)} more" if len(problems) > len(listed) else ""
    raise UserError(f"{len(problems)} bad {what} record(s) in {paths!r}; fix or remove these lines:\n  "
                    + "\n  ".join(listed) + more)
  return keyed


def split_records(data_cfg, split: str, keyed: Callable[[str], Sequence[tuple[str, Any]]], what: str) -> list[Any]:
  """The split of records read by `keyed(paths) -> [(hold-out key, record)]`: all of `eval_paths` (eval) or
  `paths` (train) when eval_paths is set, else the hash hold-out of `paths`; never empty."""
  if data_cfg.eval_paths:
    records = [r for _, r in keyed(data_cfg.paths if split == "train" else data_cfg.eval_paths)]
  else:
    records = split_entries(keyed(data_cfg.paths), split)
  if not records:
    raise UserError(f"the {split} split of data.paths={data_cfg.paths!r} has no {what}; with a single one there "
                    "is nothing to hold out, so set data.eval_paths")
  return records


def as_dataset(entries: Sequence[Entry], what: str) -> grain.MapDataset:
  """Random-access dataset of document strings; fails now if there are none."""
  if not entries:
    raise UserError(f"{what} has no documents")
  return grain.MapDataset.source(list(entries)).map(_read_entry)


# ----------------------------------------------------------------------------- builtin


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: pathlib.Path) -> list[str]:
  """Relative posix paths of the stdlib's own .py files, sorted so the order is the same on every machine."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
    for name in filenames:
      rel = (pathlib.Path(dirpath) / name).relative_to(root).as_posix()
      if name.endswith(".py") and not rel.startswith(_STDLIB_SKIP_FILES) and os.path.getsize(root / rel) > 0:
        found.append(rel)
  return sorted(found)


def builtin_entries() -> list[tuple[str, Entry]]:
  """(key, entry) for every builtin document: stdlib sources, then pydoc topics in sorted order."""
  from pydoc_data import topics

  root = stdlib_root()
  keyed: list[tuple[str, Entry]] = []
  for rel in _stdlib_files(root):
    path = str(root / rel)
    keyed.append((rel, Span(path, 0, os.path.getsize(path))))
  keyed.extend((f"pydoc_data/topics.py:{name}", topics.topics[name]) for name in sorted(topics.topics))
  return keyed


# ----------------------------------------------------------------------------- text / jsonl


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
  """Comma-separated files/globs to a sorted, de-duplicated file list; each pattern must match a file."""
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(",")]
  patterns = [p for p in patterns if p]
  if not patterns:
    raise UserError("no data paths given: set data.paths to comma-separated files or globs")
  files: set[str] = set()
  for pattern in patterns:
    matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
    if not matched:
      raise UserError(f"data path {pattern!r} matches no files")
    files.update(os.path.abspath(p) for p in matched)
  return sorted(files)


def _line_spans(path: str, *, paragraphs: bool = False) -> list[tuple[int, int]]:
  """[start, stop) byte spans of non-blank lines (without line endings); with `paragraphs`,
  runs of adjacent non-blank lines merge into one span."""
  spans: list[tuple[int, int]] = []
  offset, previous_blank = 0, True
  with open(path, "rb") as f:
    for line in f:
      body = line.rstrip(b"\r\n")
      blank = not body.strip()
      if not blank and paragraphs and not previous_blank:
        spans[-1] = (spans[-1][0], offset + len(body))
      elif not blank:
        spans.append((offset, offset + len(body)))
      previous_blank = blank
      offset += len(line)
  return spans


def _text_spans(path: str, unit: str) -> list[Span]:
  spans = _line_spans(path, paragraphs=unit == "paragraph")
  if unit == "file":
    spans = [(0, os.path.getsize(path))] if spans else []
  return [Span(path, start, stop) for start, stop in spans]


def _jsonl_spans(path: str, field: str) -> list[Span]:
  """One span per record with a non-empty text field; malformed records fail here, before training."""
  spans = []
  for number, (start, stop) in enumerate(_line_spans(path), 1):
    span = Span(path, start, stop, field)
    try:
      record = json.loads(span.raw())
    except json.JSONDecodeError as exc:
      raise UserError(f"{path}: record {number} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
      raise UserError(f"{path}: record {number} has no string field {field!r} (set data.jsonl_field)")
    if record[field].strip():
      spans.append(span)
  return spans


def file_entries(
    patterns: str | Sequence[str], *, jsonl_field: str | None, text_unit: str = "paragraph"
) -> list[tuple[str, Entry]]:
  """(key, span) for every document in the files; an empty file is an error, not a silent skip."""
  if text_unit not in TEXT_UNITS:
    raise UserError(f"unknown text_unit {text_unit!r}; expected one of {TEXT_UNITS}")
  files = expand_paths(patterns)
  root = os.path.commonpath([os.path.dirname(f) for f in files])
  keyed: list[tuple[str, Entry]] = []
  for path in files:
    spans = _jsonl_spans(path, jsonl_field) if jsonl_field else _text_spans(path, text_unit)
    if not spans:
      raise UserError(f"data file {path} is empty (no non-blank text)")
    rel = pathlib.Path(os.path.relpath(path, root)).as_posix()
    whole_files = text_unit == "file" and not jsonl_field
    keyed.extend((rel if whole_files else f"{rel}:{i}", span) for i, span in enumerate(spans))
  return keyed


# ----------------------------------------------------------------------------- tfds


def tfds_dataset(name: str, split: str, *, data_dir: str = "", field: str = "text") -> grain.MapDataset:
  """A prepared TFDS split via `tfds.data_source` (random access over array_record; never downloads)."""
  if not name:
    raise UserError("data.source='tfds' needs data.tfds_name")
  import tensorflow_datasets as tfds

  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as exc:  # TFDS raises many types (DatasetNotFoundError, AssertionError, ...).
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = data_dir or "the default data_dir"
    raise UserError(f"cannot open TFDS dataset {name!r} split {split!r} in {where}: {first_line}") from exc
  if len(source) == 0:
    raise UserError(f"TFDS dataset {name!r} split {split!r} has no documents")
  read = _field_reader(name, field)
  read(source[0])  # a wrong field name fails now, not at the first training step
  return grain.MapDataset.source(source).map(read)


def _field_reader(name: str, field: str) -> Callable[[dict], str]:
  def read(record: dict) -> str:
    if field not in record:
      raise UserError(
          f"TFDS dataset {name!r} has no feature {field!r} (features: {sorted(record)}); set data.tfds_field"
      )
    value = record[field]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

  return read
