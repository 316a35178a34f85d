"""Image understanding: the Pixtral ViT, the multimodal projector, and how their output enters the decoder.

    patches  --patch_conv-->  ln_pre  --> N pre-norm blocks (2D RoPE, attention inside each image)
             --> RMSNorm --> 2x2 patch merger --> w_in --> GELU --> w_out  -->  the `[IMG]` embeddings

The ViT blocks are the decoder's own `layers.Block` (same names: attention_norm,
attention/wq..wo, ffn_norm, feed_forward/w1..w3), run bidirectionally with a
config derived from the vision fields (`vision_block_config`).

Images arrive packed, one buffer per batch row (`Images`): the patches of every
image of that row, concatenated without padding between images, then padded
to a bucketed length. Inside an image the patches are in *merge order*: the
2x2 blocks row-major over the image's `(rows/2, cols/2)` grid, and inside a
block (0,0), (0,1), (1,0), (1,1). Attention is permutation-equivariant given the
explicit (row, col) RoPE positions, so this order changes nothing in the ViT,
and it makes the patch merger a reshape: four consecutive patches are one
merged token, and merged tokens come out in the row-major order of the
`[IMG]` tokens. Attention is blocked between images by segment ids (the
flash kernels skip the cross-image tiles, so mixed sizes waste no compute).

Transformers' reference (`PixtralVisionModel`, `Mistral3MultiModalProjector`)
works on one concatenated sequence with a dense block-diagonal mask; the
parity tests compare against it (`tests/test_vision.py`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ministral_jax.errors import UserError
from ministral_jax.model import layers
from ministral_jax.model.blockwise_attention import Layout
from ministral_jax.model.config import ModelConfig

PAD_IMAGE = -1  # image id of the padding slots of a row's patch buffer


@flax.struct.dataclass
class Images:
  """One packed patch buffer per batch row (see the module docstring for the order)."""
  patches: jax.Array  # [batch, slots, patch, patch, channels] float, normalised pixels
  rows: jax.Array  # [batch, slots] int32: the patch's row inside its image
  cols: jax.Array  # [batch, slots] int32
  image_ids: jax.Array  # [batch, slots] int32: which image of the row (PAD_IMAGE for padding)


def vision_block_config(cfg: ModelConfig) -> ModelConfig:
  """The decoder-block config that runs one ViT layer: MHA, no GQA, eps 1e-5 (Pixtral hard-codes it)."""
  return cfg.replace(
      d_model=cfg.vision_d_model, n_layers=cfg.vision_layers, n_heads=cfg.vision_heads,
      n_kv_heads=cfg.vision_heads, head_dim=cfg.vision_d_model // cfg.vision_heads, d_ffn=cfg.vision_d_ffn,
      norm_eps=1e-5, vocab_size=1, vision_layers=0, tie_embeddings=True)


def rope_2d(cfg: ModelConfig, rows: jax.Array, cols: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """Axial RoPE cos/sin `[batch, slots, head_dim]`: rows turn the even frequencies, columns the odd ones."""
  head_dim = cfg.vision_d_model // cfg.vision_heads
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = np.float32(1.0) / np.power(np.float32(cfg.vision_rope_theta), exponents, dtype=np.float32)
  angles = jnp.concatenate([rows.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq[0::2]),
                            cols.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq[1::2])], axis=-1)
  angles = jnp.concatenate([angles, angles], axis=-1)  # [batch, slots, head_dim], rotate-half layout
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


class VisionEncoder(nn.Module):
  """Pixtral: patch conv -> ln_pre -> bidirectional blocks; no final norm (the last layer's output is used)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, images: Images) -> jax.Array:
    cfg, vcfg = self.cfg, vision_block_config(self.cfg)
    dt = jnp.dtype(cfg.dtype)
    p, d = cfg.vision_patch_size, cfg.vision_d_model
    conv = layers.param(self, "patch_conv", (p, p, 3, d), (None, None, None, "embed")).astype(dt)
    # A stride-p conv with a p x p kernel is one matmul per patch.
    x = jnp.einsum("bshwc,hwcd->bsd", images.patches.astype(dt), conv,
                   precision=layers.precision(cfg))  # [batch, slots, vision_d_model]
    x = layers.RMSNorm(vcfg, name="ln_pre")(x)
    rope = rope_2d(cfg, images.rows, images.cols, dt)
    layout = Layout(images.image_ids, images.image_ids)
    block = layers.Block
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=layers.remat_policy(cfg.remat_policy), prevent_cse=False)
    stack = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.vision_layers,
        unroll=1 if cfg.scan_layers else cfg.vision_layers, metadata_params={nn.PARTITION_NAME: "layers"},
    )(vcfg, causal=False, name="layers")
    x, _ = stack(x, None, rope, jnp.ones((1, 1, 1, 1), dt), layout, None)
    return x


class Projector(nn.Module):
  """RMSNorm -> 2x2 patch merger -> w_in -> GELU -> w_out (Mistral3MultiModalProjector)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """ViT output `[batch, slots, vision_d_model]` in merge order -> `[batch, slots/4, d_model]`."""
    cfg, prec, dt = self.cfg, layers.precision(self.cfg), jnp.dtype(self.cfg.dtype)
    dv, d, m = cfg.vision_d_model, cfg.d_model, cfg.spatial_merge_size ** 2
    x = layers.RMSNorm(cfg, name="norm")(x)
    batch, slots, _ = x.shape
    # Four consecutive slots are one 2x2 block; torch's unfold orders the merged vector channel-major.
    x = x.reshape(batch, slots // m, m, dv).transpose(0, 1, 3, 2).reshape(batch, slots // m, dv * m)
    merge = layers.param(self, "merging_layer", (dv * m, dv), ("mlp", "embed")).astype(dt)
    x = jnp.einsum("bsk,kd->bsd", x, merge, precision=prec)
    w_in = layers.param(self, "w_in", (dv, d), ("embed", "mlp")).astype(dt)
    w_out = layers.param(self, "w_out", (d, d), ("mlp", "embed")).astype(dt)
    h = jnp.einsum("bsd,de->bse", x, w_in, precision=prec)
    if cfg.projector_bias:
      h = h + layers.param(self, "b_in", (d,), ("mlp",), nn.initializers.zeros).astype(dt)
    h = jnp.einsum("bse,ed->bsd", jax.nn.gelu(h, approximate=False), w_out, precision=prec)
    if cfg.projector_bias:
      h = h + layers.param(self, "b_out", (d,), ("embed",), nn.initializers.zeros).astype(dt)
    return nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))


def insert_image_features(embeddings: jax.Array, tokens: jax.Array, features: jax.Array,
                          image_token_id: int) -> jax.Array:
  """Each row's `[IMG]` embeddings replaced, in order, by that row's image features.

  embeddings `[batch, seq, d_model]`; features `[batch, merged_slots, d_model]`.
  `[IMG_BREAK]` / `[IMG_END]` keep their text embeddings (transformers' masked_scatter).
  The host checks that each row has exactly as many `[IMG]` tokens as real features.
  """
  is_image = tokens == image_token_id
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)  # [batch, seq]
  gathered = jnp.take_along_axis(features, index[..., None], axis=1).astype(embeddings.dtype)
  return jnp.where(is_image[..., None], gathered, embeddings)


BATCH_KEYS = ("patches", "patch_rows", "patch_cols", "patch_images")  # how data batches carry Images


def from_batch(batch: dict) -> Images | None:
  """The `Images` of a training batch (data/chat.py packs them under BATCH_KEYS), or None for text."""
  if "patches" not in batch:
    return None
  return Images(*(batch[k] for k in BATCH_KEYS))


# --------------------------------------------------------------------------
# Host side: pixels -> a packed Images batch.
# --------------------------------------------------------------------------
def patchify(pixels: np.ndarray, patch: int, merge: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`[3, H, W]` normalised pixels -> patches `[n, patch, patch, 3]`, rows `[n]`, cols `[n]` in merge order."""
  channels, height, width = pixels.shape
  unit = patch * merge
  if channels != 3 or height % unit or width % unit or height == 0 or width == 0:
    raise UserError(f"An image of shape {pixels.shape} cannot be split into {patch}-pixel patches merged "
                    f"{merge}x{merge}: expected [3, H, W] with H and W positive multiples of {unit}. "
                    "Preprocess it with ministral_jax.data.images (which resizes to such sizes).")
  gh, gw = height // unit, width // unit
  # [3, gh, merge, patch, gw, merge, patch] -> [gh, gw, merge(dy), merge(dx), patch, patch, 3]
  x = pixels.reshape(3, gh, merge, patch, gw, merge, patch).transpose(1, 4, 2, 5, 3, 6, 0)
  grid = np.indices((gh, gw, merge, merge))
  rows = (grid[0] * merge + grid[2]).reshape(-1)
  cols = (grid[1] * merge + grid[3]).reshape(-1)
  return x.reshape(-1, patch, patch, 3), rows.astype(np.int32), cols.astype(np.int32)


def pack_images(per_row: Sequence[Sequence[np.ndarray]], slots: int, patch: int, merge: int = 2) -> Images:
  """Per batch row, its images (`[3, H, W]` each, in the order of their `[IMG]` tokens) -> `Images`.

  `slots` is the buffer length (a multiple of merge**2; bucket it so that few shapes compile).
  """
  unit = merge * merge
  if slots % unit:
    raise UserError(f"The image patch buffer length {slots} must be a multiple of {unit} (the 2x2 merge).")
  batch = len(per_row)
  patches = np.zeros((batch, slots, patch, patch, 3), np.float32)
  rows, cols = np.zeros((batch, slots), np.int32), np.zeros((batch, slots), np.int32)
  ids = np.full((batch, slots), PAD_IMAGE, np.int32)
  for b, images in enumerate(per_row):
    start = 0
    for k, pixels in enumerate(images):
      p, r, c = patchify(np.asarray(pixels, np.float32), patch, merge)
      if start + len(p) > slots:
        raise UserError(f"Batch row {b}: its images need {start + len(p)}+ patches but the buffer holds "
                        f"{slots}. Raise the image patch budget (data.image_slots) or use smaller images.")
      patches[b, start:start + len(p)], rows[b, start:start + len(p)] = p, r
      cols[b, start:start + len(p)], ids[b, start:start + len(p)] = c, k
      start += len(p)
  return Images(patches, rows, cols, ids)  # numpy: the caller shards or device_puts it


def image_token_count(pixels: np.ndarray, patch: int, merge: int = 2) -> int:
  """`[IMG]` tokens one image becomes: one per 2x2 block of patches."""
  unit = patch * merge
  return (pixels.shape[1] // unit) * (pixels.shape[2] // unit)


def patch_count(pixels: np.ndarray, cfg: ModelConfig) -> int:
  """Slots one image takes in a patch buffer."""
  return image_token_count(pixels, cfg.vision_patch_size, cfg.spatial_merge_size) * cfg.spatial_merge_size ** 2


def check_image_tokens(rows: Sequence[Sequence[int]], images: Sequence[Sequence[np.ndarray]],
                       cfg: ModelConfig) -> None:
  """Each row has exactly as many `[IMG]` tokens as its images become (checked before any work)."""
  if not cfg.vision_layers:
    raise UserError("Images were given to a text-only model (model.vision_layers=0); use a multimodal "
                    "checkpoint/config (e.g. preset 'ministral3_3b_vision') or drop the images.")
  if len(images) != len(rows):
    raise UserError(f"{len(images)} image lists for {len(rows)} prompts: give one list (maybe empty) per prompt.")
  for r, (tokens, row_images) in enumerate(zip(rows, images)):
    have = int(np.sum(np.asarray(tokens) == cfg.image_token_id))
    want = sum(image_token_count(p, cfg.vision_patch_size, cfg.spatial_merge_size) for p in row_images)
    if have != want:
      raise UserError(f"Row {r}: {have} [IMG] tokens (id {cfg.image_token_id}) but its {len(row_images)} "
                      f"image(s) fill {want}. Expand each image's placeholder with its layout "
                      "(data/images.py expand_image_placeholders) so that the counts agree.")
