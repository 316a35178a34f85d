"""Context parallelism: one sequence split over the `context` mesh axis.

At 262,144 tokens the activations of one sequence do not fit one chip, so the
rules map `activation_length` to the `context` mesh axis (`sharding.RULES`):
every per-token op (projections, norms, MLP, loss) then runs on its own slice
of the sequence with no communication. Attention is the one op that mixes
tokens. Inside `shard_map` each device keeps its queries and all-gathers the
keys and values of the whole sequence (`lax.all_gather`, whose transpose in
the backward pass is a reduce-scatter of dK and dV), then runs the local
kernel with global causal indices, so fully masked tiles are still skipped.

Causal load balance: with contiguous slices, device d has d + 1 of C slices of
visible keys, so the last device does ~2x the average work. The decoder
therefore feeds the sequence in *zigzag* order: cut into 2C chunks, device d
holds chunks d and 2C - 1 - d (one early, one late), which gives every device
the same amount of the causal triangle. The permutation is a reshape and a
reverse at the input, undone on the final hidden states; positions, segment
ids and causal indices travel with their tokens, so the model's output does
not depend on it.

Choosing it is configuration: `mesh.context` > 1 in the experiment config.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ministral_jax.errors import UserError
from ministral_jax.model.blockwise_attention import Layout

Axes = str | tuple[str, ...] | None


class Plan(NamedTuple):
  """The mesh axes that the active rules give attention's dimensions (None = unsharded)."""
  batch: Axes
  context: Axes  # None unless the sequence is split over more than one device
  heads: Axes
  kv_heads: Axes
  context_size: int


def _size(mesh, axes: Axes) -> int:
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else axes
  size = 1
  for name in names:
    size *= mesh.shape[name]
  return size


def current_plan() -> Plan | None:
  """None without an active multi-device mesh (`Partitioner.activate()`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  # One call per dimension: a spec never repeats a mesh axis, so heads and kv_heads (both "tensor")
  # must not share a call.
  batch, length = nn.logical_to_mesh_axes(("activation_batch", "activation_length"))
  heads, = nn.logical_to_mesh_axes(("activation_heads",))
  kv_heads, = nn.logical_to_mesh_axes(("activation_kv_heads",))
  size = _size(mesh, length)
  return Plan(batch, length if size > 1 else None, heads, kv_heads, size)


def context_shards() -> int:
  plan = current_plan()
  return plan.context_size if plan is not None else 1


def check_length(seq: int, shards: int) -> None:
  """The zigzag order cuts the sequence into 2 x shards equal chunks."""
  if shards > 1 and seq % (2 * shards):
    raise UserError(f"A sequence of {seq} tokens cannot be split over mesh.context={shards}: context "
                    f"parallelism needs the length to be a multiple of 2 x context = {2 * shards}. Pad or pack "
                    f"to a multiple of {2 * shards} (data.seq_len), or change mesh.context.")


def zigzag(x: jax.Array, shards: int) -> jax.Array:
  """Reorders axis 1 so that device d of `shards` holds chunks d and 2*shards - 1 - d."""
  chunks = x.reshape(x.shape[0], 2 * shards, -1, *x.shape[2:])
  early, late = chunks[:, :shards], chunks[:, shards:][:, ::-1]
  return jnp.stack([early, late], axis=2).reshape(x.shape)


def unzigzag(x: jax.Array, shards: int) -> jax.Array:
  """The inverse of `zigzag`."""
  pairs = x.reshape(x.shape[0], shards, 2, -1, *x.shape[2:])
  early, late = pairs[:, :, 0], pairs[:, :, 1][:, ::-1]
  return jnp.concatenate([early, late], axis=1).reshape(x.shape)


def sharded_attention(kernel: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array,
                      layout: Layout, plan: Plan) -> jax.Array:
  """Runs `kernel(q, k, v, layout)` per device; with a context axis, keys and values are all-gathered."""
  if plan.context is not None:  # the local queries need their global causal coordinates
    batch = q.shape[0]
    if layout.q_index is None:
      layout = layout._replace(q_index=jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), (batch, q.shape[1])))
    if layout.kv_index is None:
      layout = layout._replace(kv_index=jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (batch, k.shape[1])))
  present = tuple(name for name in Layout._fields if getattr(layout, name) is not None)
  ids = tuple(getattr(layout, name) for name in present)

  def local(q, k, v, *ids):
    fields = dict(zip(present, ids))
    if plan.context is not None:
      gather = lambda x: jax.lax.all_gather(x, plan.context, axis=1, tiled=True)  # noqa: E731
      k, v = gather(k), gather(v)
      fields = {name: gather(x) if name.startswith("kv_") else x for name, x in fields.items()}
    return kernel(q, k, v, Layout(**fields))

  q_spec = P(plan.batch, plan.context, plan.heads, None)
  kv_spec = P(plan.batch, plan.context, plan.kv_heads, None)
  id_spec = P(plan.batch, plan.context)
  return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec) + (id_spec,) * len(ids), out_specs=q_spec,
                       check_vma=False)(q, k, v, *ids)
