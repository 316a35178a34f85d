"""Small result files (reports, summaries, identities) written so that a kill never leaves one half-written,
local or gs://.

In a multi-process job every process computes the same result and only
process 0 writes it (the others return at once): N hosts writing one file on
shared storage would race, and on gs:// each write is a new object version.
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

from etils import epath


def _primary() -> bool:
  jax = sys.modules.get("jax")  # a launcher that never imported JAX is one process, and stays JAX-free
  return jax is None or jax.process_index() == 0


def write_text(path: str | epath.Path, text: str | bytes) -> None:
  """Writes a temporary sibling, then renames it over `path` (process 0 only)."""
  if not _primary():
    return
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.write_bytes(text.encode() if isinstance(text, str) else text)
  tmp.replace(path)


def write_json(path: str | epath.Path, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=1))
