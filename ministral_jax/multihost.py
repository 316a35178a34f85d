"""What several JAX processes (the hosts of a pod) must agree on, in one place.

Every function here is a collective on a multi-process job: every process
calls it at the same point, in the same order, or the job hangs. On one
process each is a no-op or a plain local operation.
"""

from __future__ import annotations

import json
import socket
import uuid
from typing import Any

import jax
import numpy as np
from etils import epath

from ministral_jax.errors import UserError


def sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def gather_json(obj: Any) -> list[Any]:
  """Every process's `obj`, in process order, on every process (as padded bytes through the devices)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))  # [processes, longest]
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


# Error types that keep their type when `agree` raises them on every process.
_AGREED = (UserError, FileExistsError, FileNotFoundError)


def agree(error: BaseException | None) -> None:
  """Raises on every process when any process passes an error (the first failing process's), else
  returns; a barrier too. The failing process re-raises its own exception; the others raise one of the
  same type (UserError, FileExistsError, FileNotFoundError; RuntimeError otherwise) with its message,
  so a problem only one host sees (a NaN in its slice of a file) stops every host at once."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  mine = None
  if error is not None:
    kind = next((k for k, cls in enumerate(_AGREED) if isinstance(error, cls)), None)
    mine = {"kind": kind, "text": str(error) if kind is not None else f"{type(error).__name__}: {error}"}
  reports = gather_json(mine)
  first = next((p for p, r in enumerate(reports) if r is not None), None)
  if first is None:
    return
  if first == jax.process_index() and error is not None:
    raise error
  kind, text = reports[first]["kind"], reports[first]["text"]
  raise _AGREED[kind](text) if kind is not None else RuntimeError(f"process {first} failed: {text}")


def host_value(x: Any) -> np.ndarray:
  """A (possibly multi-process) array as one numpy array on every process: a global array that this
  process cannot address whole is gathered; anything else is read locally."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def local_rows(x: Any) -> np.ndarray:
  """This process's rows of a global array split along its first axis (all rows when this process can
  address it whole): what each host scores after a sharded rollout."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  by_start: dict[int, np.ndarray] = {}
  for shard in x.addressable_shards:  # replicas over the other mesh axes hold the same rows
    by_start.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
  return np.concatenate([by_start[k] for k in sorted(by_start)])


def check_shared_workdir(workdir: str) -> None:
  """Process 0 writes a marker into the workdir; every process must read it back. A workdir that is
  local to each host (a path on its own disk) would split checkpoints and results across hosts."""
  if jax.process_count() == 1:
    return
  root = epath.Path(workdir)
  token = gather_json(uuid.uuid4().hex if jax.process_index() == 0 else None)[0]
  marker = root / f".shared-check-{token}"
  created = False
  if jax.process_index() == 0:
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(token)
  sync("shared-workdir:written")
  seen = marker.exists() and marker.read_text() == token
  results = gather_json({"ok": seen, "host": socket.gethostname()})
  sync("shared-workdir:read")
  if jax.process_index() == 0:
    marker.unlink()
    if created and not any(root.iterdir()):
      root.rmdir()
  sync("shared-workdir:cleaned")  # nobody looks at the workdir while the marker is still there
  blind = [f"process {i} on {r['host']}" for i, r in enumerate(results) if not r["ok"]]
  if blind:
    raise UserError(f"--workdir={workdir} is not shared by all {jax.process_count()} processes: "
                    f"{', '.join(blind)} cannot see what process 0 wrote there. Every host must see the same "
                    "workdir: use a gs:// path or a filesystem mounted on every host.")
