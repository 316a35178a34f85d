"""The one mesh abstraction: a device mesh plus one logical-axis rules table.

Every parameter and main activation carries logical axis names ("embed",
"heads", "activation_batch", ...; see `model/layers.py`). `RULES` maps each
name to mesh axes. Parallelism is configuration: change `mesh.fsdp` or a rule,
never model code. Trainers, the pruning pass, the sampler and checkpoint
restore all take a `Partitioner`.

Mesh axes (outer to inner, so the innermost, `tensor`, gets the fastest
links): `data` (pure data parallel: params replicated), `fsdp` (data parallel
with params, grads and optimizer state sharded), `context` (one sequence
split over devices for long contexts: activations by token, params sharded
with fsdp; see `model/context_parallel.py`), `tensor` (Megatron-style
heads/mlp/vocab split). Batches are split over `data` x `fsdp`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import threading
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ministral_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "context", "tensor")
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "context"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # KV cache
    ("cache_batch", ("data", "fsdp")),
    ("cache_sequence", None),
    ("cache_kv_heads", "tensor"),
)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1, context: int = 1) -> ml_collections.ConfigDict:
  """The `mesh` block of an experiment config. One axis may be -1 (fill the rest).

  `context` > 1 splits each sequence over that many devices (long-context runs).

  `dcn_*` give the number of slices (multi-pod) along an axis; the mesh is
  then `dcn * ici` along it, with slices outermost.
  """
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, context=context, tensor=tensor,
                                        dcn_data=1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1))


def initialize_distributed() -> None:
  """Multi-host start-up: joins this process to the others before anything touches a device.

  Runs when `MINISTRAL_JAX_MULTIHOST=1` (set by `launch.tpu run` on every worker
  and by `launch.local_pod`) or `JAX_COORDINATOR_ADDRESS` is set. The
  coordinator, process count and process id come from `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` when given; otherwise
  `jax.distributed.initialize()` finds them itself through JAX's cluster
  detection (Cloud TPU metadata, SLURM, Open MPI, Kubernetes). CPU devices talk
  through gloo. A peer that never joins (a wrong process count, a host that did
  not start) is one clear error and exit status 2 after
  `MINISTRAL_JAX_INIT_TIMEOUT` seconds (default 300) on every process that did.
  """
  env = os.environ
  if env.get("MINISTRAL_JAX_MULTIHOST") != "1" and not env.get("JAX_COORDINATOR_ADDRESS"):
    return
  coordinator = env.get("JAX_COORDINATOR_ADDRESS") or None
  count = int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None
  index = int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None
  if count is not None and index is not None and not 0 <= index < count:
    raise UserError(f"JAX_PROCESS_ID={index} is not in [0, JAX_NUM_PROCESSES={count}); give each of the "
                    f"{count} processes its own id from 0 to {count - 1}.")
  timeout = int(env.get("MINISTRAL_JAX_INIT_TIMEOUT", "300"))
  expected = f"{count} processes" if count else "every process of the job"
  message = (f"error: this process (id {index}) could not join {expected} at coordinator "
             f"{coordinator or '(found by JAX)'} within {timeout} s. Start all of them (one per host, each with the same "
             "JAX_NUM_PROCESSES and its own JAX_PROCESS_ID), and make sure the coordinator's port is reachable.")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices of several processes
  # JAX aborts the whole process (a C++ fatal error, no Python exception) when a peer never registers;
  # a watchdog says why first, a little before JAX's own deadline.
  joined = threading.Event()
  threading.Thread(target=_join_watchdog, args=(joined, timeout, message), daemon=True).start()
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=count, process_id=index,
                               initialization_timeout=timeout + 30)
  except Exception as e:  # noqa: BLE001 - a bad address or a refused connection is a Python error
    raise UserError(f"{message[len('error: '):]} ({str(e).strip().splitlines()[0][:300]})") from None
  finally:
    joined.set()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def _join_watchdog(joined: threading.Event, timeout: float, message: str) -> None:
  if not joined.wait(timeout):
    print(message, file=sys.stderr, flush=True)
    os._exit(2)


def _resolve_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise UserError(f"Mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1.")
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape):
    raise UserError(f"Mesh {dict(zip(MESH_AXES, shape))}: axis sizes must be positive or -1.")
  if -1 in shape:
    if n_devices % known:
      raise UserError(f"Mesh {dict(zip(MESH_AXES, shape))}: the fixed axes ({known} devices) do not "
                       f"divide the {n_devices} devices. Change the mesh sizes in the config.")
    shape[shape.index(-1)] = n_devices // known
  if math.prod(shape) != n_devices:
    raise UserError(f"Mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
                     f"{n_devices} are available. Make the product of mesh.data * mesh.fsdp * "
                     f"mesh.context * mesh.tensor equal {n_devices}, or set one axis to -1.")
  return tuple(shape)


def make_mesh(mesh_cfg: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, context, tensor) mesh, hybrid ICI x DCN when dcn_* > 1."""
  mesh_cfg = dict(mesh_cfg or mesh_config())
  unknown = set(mesh_cfg) - set(MESH_AXES) - {f"dcn_{a}" for a in MESH_AXES}
  if unknown:
    raise UserError(f"Unknown mesh fields {sorted(unknown)}; known: {list(MESH_AXES)} and dcn_<axis>.")
  devices = list(devices if devices is not None else jax.devices())
  dcn = tuple(int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES)
  n_slices = math.prod(dcn)
  if len(devices) % n_slices:
    raise UserError(f"dcn sizes {dcn} ({n_slices} slices) do not divide the {len(devices)} devices.")
  ici = _resolve_shape(mesh_cfg, len(devices) // n_slices)
  if n_slices > 1:
    device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """A mesh and its rules; turns logical axis names into shardings."""
  mesh: Mesh
  rules: Rules = RULES

  @classmethod
  def from_config(cls, mesh_cfg: Mapping[str, int] | None = None,
                  rules: Rules | None = None) -> "Partitioner":
    return cls(make_mesh(mesh_cfg), tuple(rules) if rules is not None else RULES)

  # --- logical names -> shardings ---
  def spec(self, logical_axes: Sequence[str | None]) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(logical_axes), self.rules)

  def sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical_axes))

  def shardings(self, logical_tree: Any) -> Any:
    """A tree of PartitionSpecs of logical names -> the same tree of NamedShardings."""
    return jax.tree.map(lambda spec: self.sharding(tuple(spec)), logical_tree,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))

  def axis_size(self, mesh_axes: str | tuple[str, ...] | None) -> int:
    if mesh_axes is None:
      return 1
    names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    return math.prod(self.mesh.shape[a] for a in names)

  # --- parameters ---
  def param_shardings(self, model_cfg) -> Any:
    from ministral_jax.model import transformer
    axes = transformer.param_logical_axes(model_cfg)
    self.check_divisible(transformer.abstract_params(model_cfg), axes)
    return self.shardings(axes)

  def check_divisible(self, abstract: Any, logical_tree: Any) -> None:
    """Every sharded dimension must divide its mesh axes: one error lists all that don't."""
    problems = []
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(
        logical_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
      spec = self.spec(tuple(flat_axes[path]))
      for dim, (size, mesh_axes) in enumerate(zip(leaf.shape, spec)):
        if size % self.axis_size(mesh_axes):
          problems.append(f"{jax.tree_util.keystr(path)} dim {dim} (size {size}, logical "
                          f"'{flat_axes[path][dim]}') over mesh axes {mesh_axes} "
                          f"(size {self.axis_size(mesh_axes)})")
    if problems:
      raise UserError("The mesh does not divide these sharded dimensions:\n  " + "\n  ".join(problems)
                       + f"\nMesh: {dict(self.mesh.shape)}. Pick mesh sizes that divide them, or map "
                       "the logical axis to None in the rules.")

  def shard_params(self, params: Any, model_cfg) -> Any:
    return jax.device_put(params, self.param_shardings(model_cfg))

  # --- batches ---
  def batch_sharding(self, ndim: int = 2) -> NamedSharding:
    return self.sharding(("activation_batch",) + (None,) * (ndim - 1))

  def check_batch(self, global_batch: int) -> None:
    n = self.axis_size(self.spec(("activation_batch",))[0])
    if global_batch % n:
      raise UserError(f"Global batch {global_batch} cannot be split over the {n} batch shards of mesh "
                       f"{dict(self.mesh.shape)} (data x fsdp). Use a multiple of {n}.")

  def context_size(self) -> int:
    """How many devices one sequence is split over (`mesh.context` under the default rules)."""
    return self.axis_size(self.spec(("activation_length",))[0])

  def check_sequence(self, seq_len: int) -> None:
    from ministral_jax.model import context_parallel
    context_parallel.check_length(seq_len, self.context_size())

  def process_rows(self, global_batch: int) -> tuple[int, int]:
    """The rows `[start, stop)` of a global batch that this process's devices hold: what its input
    pipeline reads (`shard_batch` then places them)."""
    self.check_batch(global_batch)
    index = self.batch_sharding(1).addressable_devices_indices_map((global_batch,))
    spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in index.values()})
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:
      raise UserError(f"This process's devices hold rows {spans} of the batch, not one contiguous range; order "
                      "the mesh so that each host's devices are adjacent along data x fsdp.")
    return start, stop

  def shard_batch(self, batch: Any) -> Any:
    """Host-local numpy arrays `[local_batch, ...]` -> global arrays split over data x fsdp.

    On one host this is a device_put; on a pod each process passes its own
    slice and gets back the global array.
    """
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_process_local_data(self.batch_sharding(x.ndim), x)
    return jax.tree.map(put, batch)

  # --- anything else (optimizer state, caches) ---
  def like_params(self, tree: Any, params_shardings: Any) -> Any:
    """Shardings for a tree (e.g. optax state) whose sub-trees mirror the params.

    A leaf whose key path ends with a parameter's key path (optax's `mu`,
    `nu`, ... hold the params tree) gets that parameter's sharding; everything
    else (step counters, scalars) is replicated.
    """
    by_path = {jax.tree_util.keystr(p): s
               for p, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]}
    replicated = NamedSharding(self.mesh, PartitionSpec())

    def pick(path, leaf):
      key = jax.tree_util.keystr(path)
      for param_key, sharding in by_path.items():
        if key.endswith(param_key) and np.ndim(leaf) > 0:
          return sharding
      return replicated
    return jax.tree_util.tree_map_with_path(pick, tree)

  @contextlib.contextmanager
  def activate(self) -> Iterator[None]:
    """Inside: the mesh is current and activation constraints follow the rules."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield
