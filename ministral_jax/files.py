"""Small result files written so that a kill never leaves one half-written (local paths or gs://)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from etils import epath


def write_text(path: str | epath.Path, text: str | bytes) -> None:
  """Writes a temporary sibling, then renames it over `path`."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.write_bytes(text.encode() if isinstance(text, str) else text)
  tmp.replace(path)


def write_json(path: str | epath.Path, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=1))
