"""Image loading, Pixtral preprocessing and the image-token layout, offline.

The Pixtral vision encoder sees an image as a float32 `[3, H, W]` tensor with
H and W multiples of 28 (patch 14 x spatial merge 2), normalised with the CLIP
mean/std; the text model sees it as `rows = H // 28` rows of `cols = W // 28`
`[IMG]` tokens, each row closed by `[IMG_BREAK]` and the last one by
`[IMG_END]` (spec §5.4). The projector emits exactly one embedding per `[IMG]`,
so the pixels and the tokens must come from the same resize decision.

Two references exist and they do not agree to the pixel, so both are here:

  preprocess_mistral  mistral-common's own `ImageEncoder` (what Mistral's native
                      inference feeds the model): Python `round` on downscale,
                      OpenCV INTER_CUBIC on float32 pixels (no clipping).
  preprocess_hf       transformers' `PixtralImageProcessor` (what the HF
                      checkpoints are evaluated with): `floor` on downscale, PIL
                      bicubic on uint8 pixels (clipped and rounded to 0..255).

`preprocess_mistral` calls the library, it does not re-implement it;
`preprocess_hf` re-implements transformers' arithmetic with PIL + numpy because
transformers is a test-only dependency (tests/test_images.py checks both
against their references). An image larger than `max_image_size` is scaled
down as each reference does, never rejected.

Neither reference applies EXIF orientation, so neither does `load_image`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import math
import os
import pathlib
from typing import TYPE_CHECKING, NamedTuple, Sequence, Union

import numpy as np
from PIL import Image

from ministral_jax.errors import UserError

if TYPE_CHECKING:
  from ministral_jax.data.tokenizers import Tokenizer

# CLIP statistics, as in mistral-common (DATASET_MEAN/STD) and PixtralImageProcessor.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
MAX_IMAGE_SIZE = 1540

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

ACCEPTED = ("accepted: a path to an image file in any format Pillow reads (PNG, JPEG, WebP, GIF, BMP, TIFF, "
            "...), its raw bytes, a base64 string or a 'data:image/...;base64,' URL, a PIL image, or a numpy "
            "uint8 array of shape HxWx3 (RGB), HxWx4 (RGBA) or HxW (grayscale)")


class ProcessedImage(NamedTuple):
  """What the vision encoder needs of one image; unpacks as `pixels, (rows, cols)`."""

  pixels: np.ndarray  # float32 [3, H, W], H = rows * patch * merge, W = cols * patch * merge
  grid: tuple[int, int]  # (rows, cols): image tokens per side after the spatial merge


class ImageTokenIds(NamedTuple):
  """Ids of `[IMG]`, `[IMG_BREAK]`, `[IMG_END]`; they differ between tokenizer files."""

  img: int
  img_break: int
  img_end: int


# --------------------------------------------------------------------------------------------------- loading


def _describe(source: object) -> str:
  """A short name for an input the caller did not name, for error messages."""
  if isinstance(source, Image.Image):
    return "PIL image"
  if isinstance(source, np.ndarray):
    return "numpy image"
  if isinstance(source, (bytes, bytearray, memoryview)):
    return f"image bytes ({len(source)} bytes)"
  if isinstance(source, os.PathLike):
    return f"image file {os.fspath(source)}"
  if isinstance(source, str):
    if source.startswith("data:"):
      return f"data URL image ({source[:40]}...)" if len(source) > 40 else f"data URL image ({source})"
    if len(source) <= 512:  # a path or a short string: show it whole, so a path is never cut
      return f"image {source!r}"
    return f"base64 image ({len(source)} chars, starting {source[:24]!r})"
  return f"image of type {type(source).__name__}"


def _to_rgb(image: Image.Image) -> Image.Image:
  """RGB with transparent areas composited over white, exactly as mistral-common's `_convert_to_rgb`.

  Doing it here (rather than leaving it to each reference) makes both paths
  start from the same RGB pixels; tests check it against the library.
  """
  if image.mode == "RGB":
    return image
  if image.mode != "RGBA":
    image = image.convert("RGBA")
  background = Image.new("RGBA", image.size, "WHITE")
  background.paste(image, (0, 0), image)
  return background.convert("RGB")


def _decode(data: bytes, what: str) -> Image.Image:
  try:
    image = Image.open(io.BytesIO(data))
    image.load()  # Image.open reads only the header: force the decode so truncated files fail here
  # Pillow's decoders raise many exception types on corrupt input (OSError, SyntaxError, struct.error, ...).
  except Exception as exc:  # noqa: BLE001
    raise UserError(f"{what}: cannot decode as an image ({type(exc).__name__}: {exc}); {ACCEPTED}") from exc
  return image


def _read_file(path: pathlib.Path, what: str) -> Image.Image:
  if not path.is_file():
    problem = "is a directory, not an image file" if path.is_dir() else "no such file"
    raise UserError(f"{what}: {problem}; pass an existing image file; {ACCEPTED}")
  try:
    data = path.read_bytes()
  except OSError as exc:
    raise UserError(f"{what}: cannot read the file ({exc}); check its permissions") from exc
  return _decode(data, what)


def _from_array(array: np.ndarray, what: str) -> Image.Image:
  shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))
  if array.dtype != np.uint8 or not shape_ok or 0 in array.shape:
    raise UserError(
        f"{what}: a numpy image must be uint8 HxWx3 (RGB), HxWx4 (RGBA) or HxW (grayscale), got dtype "
        f"{array.dtype} shape {array.shape}; convert floats in [0, 1] with "
        "(x * 255).round().astype(np.uint8) and move channels last")
  mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1] if array.ndim == 3 else 2]
  return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def _from_string(text: str, what: str) -> Image.Image:
  if text.startswith("data:"):
    from mistral_common.utils.data_url import maybe_strip_base64_data_url_prefix

    try:
      payload = maybe_strip_base64_data_url_prefix(text)
    except ValueError as exc:
      raise UserError(f"{what}: {exc}; {ACCEPTED}") from exc
    return _decode(_b64decode(payload, what), what)
  if text.startswith(("http://", "https://")):
    raise UserError(f"{what}: images are never downloaded at run time; download it first and pass the local "
                    f"path; {ACCEPTED}")
  if text.startswith("file://"):
    return _read_file(pathlib.Path(text.removeprefix("file://")), what)
  if _is_existing_path(text):
    return _read_file(pathlib.Path(text).expanduser(), what)
  try:
    data = base64.b64decode("".join(text.split()), validate=True)
  except (binascii.Error, ValueError):
    raise UserError(f"{what}: no such file, and not valid base64 either; {ACCEPTED}") from None
  return _decode(data, what)


def _is_existing_path(text: str) -> bool:
  """A long base64 string is no path: the OS rejects it (name too long) or it has a NUL; both mean 'no'."""
  try:
    return pathlib.Path(text).expanduser().exists()
  except (OSError, ValueError):
    return False


def _b64decode(payload: str, what: str) -> bytes:
  try:
    return base64.b64decode("".join(payload.split()), validate=True)
  except (binascii.Error, ValueError) as exc:
    raise UserError(f"{what}: the data URL's payload is not valid base64 ({exc}); {ACCEPTED}") from exc


def load_image(source: ImageSource, name: str | None = None) -> Image.Image:
  """Any supported image input to a decoded RGB PIL image (transparency over white, as mistral-common does).

  `name` is how errors refer to the item (e.g. "base64 image #3 of conversation 12"): a batch with one bad
  image must say which one. By default a path names itself.
  """
  what = name or _describe(source)
  if isinstance(source, Image.Image):
    try:
      source.load()
    except Exception as exc:  # noqa: BLE001 - see _decode
      raise UserError(
          f"{what}: cannot decode the PIL image ({type(exc).__name__}: {exc}); {ACCEPTED}") from exc
    image = source
  elif isinstance(source, np.ndarray):
    image = _from_array(source, what)
  elif isinstance(source, (bytes, bytearray, memoryview)):
    image = _decode(bytes(source), what)
  elif isinstance(source, os.PathLike):
    image = _read_file(pathlib.Path(source).expanduser(), what)
  elif isinstance(source, str):
    image = _from_string(source, what)
  else:
    raise UserError(f"{what}: unsupported image input type {type(source).__name__}; {ACCEPTED}")
  if image.width < 1 or image.height < 1:
    raise UserError(f"{what}: the image is empty ({image.width}x{image.height}); {ACCEPTED}")
  return _to_rgb(image)


# --------------------------------------------------------------------------------------------- preprocessing


def _check_geometry(max_image_size: int, patch_size: int, spatial_merge_size: int) -> int:
  for field, value in (("max_image_size", max_image_size), ("patch_size", patch_size),
                       ("spatial_merge_size", spatial_merge_size)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise UserError(f"image preprocessing: {field} must be a positive integer, got {value!r} (Ministral 3: "
                      f"max_image_size {MAX_IMAGE_SIZE}, patch_size {PATCH_SIZE}, spatial_merge_size "
                      f"{SPATIAL_MERGE_SIZE})")
  return patch_size * spatial_merge_size


@functools.lru_cache(maxsize=16)
def _mistral_encoder(patch_size: int, max_image_size: int, spatial_merge_size: int):
  from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs

  config = ImageConfig(image_patch_size=patch_size, max_image_size=max_image_size,
                       spatial_merge_size=spatial_merge_size)
  # The ids only label the encoder's token list, which is not used here (`image_tokens` builds it).
  return ImageEncoder(config, SpecialImageIDs(img=10, img_break=12, img_end=13))


def preprocess_mistral(image: ImageSource, max_image_size: int = MAX_IMAGE_SIZE, patch_size: int = PATCH_SIZE,
                       spatial_merge_size: int = SPATIAL_MERGE_SIZE, *,
                       name: str | None = None) -> ProcessedImage:
  """Pixels and token grid through mistral-common's `ImageEncoder`, the reference of the native checkpoints.

  Downscale (if needed) keeps the aspect ratio with Python `round`, then each side is rounded up to a multiple
  of `patch_size * spatial_merge_size` and resized with OpenCV INTER_CUBIC on float32 pixels.
  """
  unit = _check_geometry(max_image_size, patch_size, spatial_merge_size)
  rgb = load_image(image, name=name)
  from mistral_common.protocol.instruct.chunk import ImageChunk

  try:
    encoding = _mistral_encoder(int(patch_size), int(max_image_size), int(spatial_merge_size))(
        ImageChunk(image=rgb))
  except ImportError as exc:
    raise UserError(f"mistral-common's image encoder needs OpenCV ({exc}); install it with "
                    "`pip install opencv-python-headless` (listed in setup.py's install_requires)") from exc
  pixels = np.ascontiguousarray(encoding.image, dtype=np.float32)
  return ProcessedImage(pixels, (pixels.shape[1] // unit, pixels.shape[2] // unit))


def hf_grid(height: int, width: int, max_image_size: int = MAX_IMAGE_SIZE, patch_size: int = PATCH_SIZE,
            spatial_merge_size: int = SPATIAL_MERGE_SIZE) -> tuple[int, int]:
  """(rows, cols) that transformers' PixtralImageProcessor gives an image of this size, without decoding it.

  Lets a data pipeline budget sequence length from image sizes alone. Same arithmetic as transformers'
  `get_resize_output_image_size`: floor on downscale, then round each side up to the unit. A side that
  floors to 0 (aspect ratio past max_image_size:1) is kept at 1 pixel, as mistral-common does; transformers
  would fail on it.
  """
  unit = _check_geometry(max_image_size, patch_size, spatial_merge_size)
  ratio = max(height / max_image_size, width / max_image_size)
  if ratio > 1:
    height = max(int(math.floor(height / ratio)), 1)
    width = max(int(math.floor(width / ratio)), 1)
  return (height - 1) // unit + 1, (width - 1) // unit + 1


def preprocess_hf(image: ImageSource, max_image_size: int = MAX_IMAGE_SIZE, patch_size: int = PATCH_SIZE,
                  spatial_merge_size: int = SPATIAL_MERGE_SIZE, *, name: str | None = None) -> ProcessedImage:
  """Pixels and token grid as transformers' PixtralImageProcessor (PIL backend) makes them.

  Re-implemented with PIL + numpy since transformers is test-only here: bicubic PIL resize (resample 3) of the
  uint8 image to the `hf_grid` size, x * (1/255) in float64 cast to float32, then (x - mean) / std in float32,
  the same operations in the same precision as transformers, so the result is bit-identical.
  """
  unit = _check_geometry(max_image_size, patch_size, spatial_merge_size)
  rgb = load_image(image, name=name)
  rows, cols = hf_grid(rgb.height, rgb.width, max_image_size, patch_size, spatial_merge_size)
  resized = rgb.resize((cols * unit, rows * unit), resample=Image.Resampling.BICUBIC)
  scaled = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
  normed = (scaled - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
  return ProcessedImage(np.ascontiguousarray(normed.transpose(2, 0, 1)), (rows, cols))


# ---------------------------------------------------------------------------------------------- token layout


def image_tokens(rows: int, cols: int, img_id: int = 10, break_id: int = 12, end_id: int = 13) -> list[int]:
  """The token span of one image: `rows` rows of `cols` [IMG] ids, each closed by [IMG_BREAK], the last by
  [IMG_END]. Defaults are the Tekken ids (Ministral 3, Pixtral); SentencePiece v7 files use 10/14/15."""
  if rows < 1 or cols < 1:
    raise UserError(f"an image needs at least one token row and column, got rows={rows} cols={cols}")
  tokens = ([img_id] * cols + [break_id]) * rows
  tokens[-1] = end_id
  return tokens


def image_token_ids(tokenizer: Tokenizer) -> ImageTokenIds:
  """[IMG], [IMG_BREAK], [IMG_END] ids read from a `ministral_jax.data.tokenizers.Tokenizer`.

  Raises UserError (naming the missing token and files that define it) for a file without image tokens,
  e.g. SentencePiece v3, which has [IMG] but no [IMG_BREAK].
  """
  return ImageTokenIds(tokenizer.special_id("[IMG]"), tokenizer.special_id("[IMG_BREAK]"),
                       tokenizer.special_id("[IMG_END]"))


def check_model_ids(tokenizer: Tokenizer, image_token_id: int, image_break_id: int, image_end_id: int) -> None:
  """The model's image token ids are the tokenizer's (a vision model trained on another vocabulary's ids would
  put image features on the wrong tokens)."""
  ids = image_token_ids(tokenizer)
  model = ImageTokenIds(image_token_id, image_break_id, image_end_id)
  if ids != model:
    raise UserError(f"The tokenizer {tokenizer.path} numbers [IMG], [IMG_BREAK], [IMG_END] {tuple(ids)} but the "
                    f"model config says {tuple(model)}; set model.image_token_id={ids.img}, "
                    f"model.image_break_id={ids.img_break}, model.image_end_id={ids.img_end}.")


def _grid_of(item: ProcessedImage | tuple, index: int) -> tuple[int, int]:
  """Accepts a preprocess result or a bare (rows, cols)."""
  grid = item[1] if len(item) == 2 and isinstance(item[0], np.ndarray) else item
  try:
    rows, cols = (int(v) for v in grid)
  except (TypeError, ValueError):
    raise UserError(f"image #{index}: expected a preprocess_* result (pixels, (rows, cols)) or a "
                    f"(rows, cols) grid, got {type(item).__name__}") from None
  return rows, cols


def expand_image_placeholders(tokens: Sequence[int], images: Sequence[ProcessedImage | tuple[int, int]],
                              img_id: int = 10, break_id: int = 12, end_id: int = 13) -> list[int]:
  """Replace the k-th single [IMG] placeholder (one per image, as chat templates emit) by image k's span.

  `images` are `preprocess_*` results or bare (rows, cols) grids, in prompt order. The counts must match
  exactly: a silent mismatch would misalign every image embedding that follows.
  """
  placeholders = sum(1 for t in tokens if t == img_id)
  if placeholders != len(images):
    hint = ""
    if any(t in (break_id, end_id) for t in tokens):
      hint = (f" (the tokens already contain [IMG_BREAK]/[IMG_END] ids {break_id}/{end_id}: they look "
              "expanded already; expand the template's output only once)")
    raise UserError(
        f"{placeholders} [IMG] placeholder(s) (id {img_id}) in the token list but {len(images)} image(s) "
        f"given{hint}; the prompt must hold exactly one [IMG] per image, in order: add or remove images, or "
        "fix the prompt's image chunks")
  out: list[int] = []
  k = 0
  for token in tokens:
    if token == img_id:
      out.extend(image_tokens(*_grid_of(images[k], k), img_id=img_id, break_id=break_id, end_id=end_id))
      k += 1
    else:
      out.append(int(token))
  return out
