"""Image preprocessing: pixels and token layout equal mistral-common's and transformers' own output.

Every image is built in memory from a seeded generator; nothing is downloaded. Two kinds of content: `smooth`
(low-frequency pattern plus mild noise, like a photo) and `noise` (uniform random pixels, the worst case for
any resampling difference).
"""

from __future__ import annotations

import base64
import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

from ministral_jax.data import images
from ministral_jax.data.images import (expand_image_placeholders, hf_grid, image_token_ids, image_tokens,
                                       load_image, preprocess_hf, preprocess_mistral)
from ministral_jax.data.tokenizers import bundled_tokenizer_path, load_tokenizer
from ministral_jax.errors import UserError

mc_image = pytest.importorskip("mistral_common.tokens.tokenizers.image")
from mistral_common.protocol.instruct.chunk import ImageChunk  # noqa: E402

UNIT = 28  # patch 14 x spatial merge 2


def smooth(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  planes = [127 + 100 * np.sin(x / 7 + c) * np.cos(y / 9 - c) for c in range(channels)]
  return np.clip(np.stack(planes, -1) + rng.normal(0, 5, (h, w, channels)), 0, 255).astype(np.uint8)


def noise(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def mistral_reference(image: Image.Image, max_image_size: int, patch: int = 14, merge: int = 2):
  """mistral-common's ImageEncoder called directly: its tokens and pixels are the reference."""
  encoder = mc_image.ImageEncoder(mc_image.ImageConfig(patch, max_image_size, merge),
                                  mc_image.SpecialImageIDs(img=10, img_break=12, img_end=13))
  return encoder(ImageChunk(image=image))


# (height, width, max_image_size): tiny, exact multiples, non-multiples, wide, tall, and larger than the limit
# (a reduced limit keeps the arrays small; 17x1600 exceeds the real 1540 limit with a 27k-pixel array).
SIZES = [
    (28, 28, 1540), (56, 84, 1540), (30, 50, 1540), (100, 37, 1540), (1, 1, 1540),
    (40, 300, 1540), (300, 40, 1540),
    (150, 200, 112), (500, 90, 224), (17, 1600, 1540),
]
SIZE_IDS = [f"{h}x{w}-max{m}" for h, w, m in SIZES]


@pytest.mark.parametrize("content", [smooth, noise])
@pytest.mark.parametrize("h,w,max_size", SIZES, ids=SIZE_IDS)
def test_mistral_path_tokens_and_pixels_equal_mistral_common_image_encoder(h, w, max_size, content):
  image = Image.fromarray(content(h, w))
  ref = mistral_reference(image, max_size)
  pixels, (rows, cols) = preprocess_mistral(image, max_image_size=max_size)
  # Exact: both sides run the same library code on the same RGB pixels.
  assert pixels.dtype == np.float32 and pixels.flags.c_contiguous
  assert pixels.shape == (3, rows * UNIT, cols * UNIT)
  np.testing.assert_array_equal(pixels, ref.image)
  assert image_tokens(rows, cols) == ref.tokens
  assert max(rows, cols) <= -(-max_size // UNIT)  # downscaled to the limit, never rejected


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L"])
def test_transparency_and_other_modes_match_mistral_common_white_background(mode):
  rgba = noise(30, 45, seed=3, channels=4)
  rgba[:5, :5, 3] = 0  # fully transparent corner
  image = Image.fromarray(rgba, "RGBA")
  if mode == "P":
    image = image.convert("RGB").convert("P")
    image.info["transparency"] = image.getpixel((0, 0))
  elif mode != "RGBA":
    image = image.convert(mode)
  ref = mistral_reference(image, 1540)
  pixels, grid = preprocess_mistral(image)
  np.testing.assert_array_equal(pixels, ref.image)  # exact: same conversion, then the library itself
  assert image_tokens(*grid) == ref.tokens
  if mode in ("RGBA", "LA"):
    assert np.asarray(load_image(image))[:5, :5].min() == 255  # transparent becomes white
  if importlib.util.find_spec("transformers"):  # its alpha_composite over white gives the same RGB bytes
    np.testing.assert_array_equal(preprocess_hf(image).pixels, hf_reference(image, 1540)[0])


def test_chat_completion_layout_equals_mistral_common_after_placeholder_expansion():
  """Through MistralTokenizer.encode_chat_completion (the bundled Pixtral-12B tekken: patch 16, limit 1024, no
  merge): collapsing each image span to one [IMG], as a chat template emits it, and expanding it again with
  our grids must give back the library's exact token list and pixels."""
  from mistral_common.protocol.instruct.chunk import TextChunk
  from mistral_common.protocol.instruct.messages import UserMessage
  from mistral_common.protocol.instruct.request import ChatCompletionRequest
  from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

  path = bundled_tokenizer_path("tekken")
  ids = image_token_ids(load_tokenizer(path))
  assert tuple(ids) == (10, 12, 13)
  pics = [Image.fromarray(smooth(50, 70, seed=1)), Image.fromarray(noise(1100, 20, seed=2))]
  content = [TextChunk(text="Compare"), ImageChunk(image=pics[0]), TextChunk(text="with"),
             ImageChunk(image=pics[1])]
  request = ChatCompletionRequest(messages=[UserMessage(content=content)])
  ref = MistralTokenizer.from_file(str(path)).encode_chat_completion(request)

  collapsed, in_image = [], False
  for t in ref.tokens:
    if t not in ids:
      collapsed.append(t)
    elif not in_image:
      collapsed.append(ids.img)
    in_image = t in (ids.img, ids.img_break)
  assert collapsed.count(ids.img) == 2

  processed = [preprocess_mistral(p, max_image_size=1024, patch_size=16, spatial_merge_size=1) for p in pics]
  assert expand_image_placeholders(collapsed, processed, *ids) == ref.tokens
  for (pixels, _), ref_pixels in zip(processed, ref.images):
    np.testing.assert_array_equal(pixels, ref_pixels)


def hf_reference(image: Image.Image, max_size: int):
  # transformers 5's PixtralImageProcessor is the torchvision backend (torchvision is not installed here);
  # PixtralImageProcessorPil is its PIL-backend twin, the one whose arithmetic preprocess_hf follows.
  from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

  processor = PixtralImageProcessorPil(patch_size={"height": UNIT, "width": UNIT},
                                       size={"longest_edge": max_size})
  out = processor(image, return_tensors="np")
  return out["pixel_values"][0], tuple(int(v) for v in out["image_sizes"][0])


@pytest.mark.parametrize("content", [smooth, noise])
@pytest.mark.parametrize("h,w,max_size", SIZES, ids=SIZE_IDS)
def test_hf_path_pixels_and_grid_equal_transformers_pixtral_image_processor(h, w, max_size, content):
  pytest.importorskip("transformers")
  image = Image.fromarray(content(h, w))
  ref_pixels, (ref_h, ref_w) = hf_reference(image, max_size)
  pixels, (rows, cols) = preprocess_hf(image, max_image_size=max_size)
  # Exact: the same PIL bicubic resize on the same uint8 pixels, then the same float64->float32 rescale and
  # float32 normalisation as transformers, so no rounding step differs.
  np.testing.assert_array_equal(pixels, ref_pixels)
  assert (rows * UNIT, cols * UNIT) == (ref_h, ref_w)
  assert hf_grid(h, w, max_size) == (rows, cols)
  # PixtralProcessor expands [IMG] into (cols + 1) * rows tokens with rows = H // 28, cols = W // 28.
  assert len(image_tokens(rows, cols)) == (ref_w // UNIT + 1) * (ref_h // UNIT)


# Where the two references differ:
#  * downscale: mistral-common rounds (Python round), transformers floors, so near a multiple of 28 the token
#    grids can differ by one row/column (next test);
#  * resize: OpenCV INTER_CUBIC (a = -0.75, float32, no clipping, no antialiasing when shrinking) vs PIL
#    bicubic (a = -0.5, antialiased support when shrinking, result clipped and rounded to uint8).
# Measured here, in normalised units (1 unit is about 68 grey levels): upscaling, smooth content, mean |diff|
# about 0.007 (max 0.04); noise about 0.06 (max 0.8). Shrinking: smooth 0.034 (max 0.25), noise 0.5 (max 2.3),
# where OpenCV's non-antialiased kernel aliases. When no resize happens, both are bit-identical.
DIFF_CASES = [  # (content, h, w, max_size, mean bound, max bound)
    (smooth, 30, 50, 1540, 0.015, 0.08), (smooth, 300, 40, 1540, 0.015, 0.08),
    (smooth, 150, 200, 112, 0.07, 0.5), (noise, 30, 50, 1540, 0.12, 1.5), (noise, 150, 200, 112, 1.0, 4.0),
]


@pytest.mark.parametrize("content,h,w,max_size,mean_bound,max_bound", DIFF_CASES,
                         ids=[f"{c[0].__name__}-{c[1]}x{c[2]}-max{c[3]}" for c in DIFF_CASES])
def test_mistral_and_hf_paths_differ_slightly_when_their_sizes_agree(content, h, w, max_size, mean_bound,
                                                                      max_bound):
  image = Image.fromarray(content(h, w))
  mc_pixels, mc_grid = preprocess_mistral(image, max_image_size=max_size)
  hf_pixels, hf_grid_ = preprocess_hf(image, max_image_size=max_size)
  assert mc_grid == hf_grid_
  diff = np.abs(mc_pixels - hf_pixels)
  assert 1e-3 < diff.mean() < mean_bound  # real (OpenCV vs PIL bicubic), and small
  assert diff.max() < max_bound


def test_mistral_and_hf_paths_agree_bit_for_bit_without_resize():
  image = Image.fromarray(noise(56, 84))  # already 2x3 units: neither path resamples
  np.testing.assert_array_equal(preprocess_mistral(image).pixels, preprocess_hf(image).pixels)


def test_downscale_round_vs_floor_changes_the_grid_near_a_multiple_of_28():
  # 151x200 with limit 112: ratio 200/112 = 1.7857, height 151/1.7857 = 84.56 -> round 85 (4 rows) in
  # mistral-common, floor 84 (3 rows) in transformers.
  image = Image.fromarray(smooth(151, 200))
  assert preprocess_mistral(image, max_image_size=112).grid == mistral_grid(151, 200, 112) == (4, 4)
  assert preprocess_hf(image, max_image_size=112).grid == hf_reference_grid(image, 112) == (3, 4)


def mistral_grid(h: int, w: int, max_size: int) -> tuple[int, int]:
  tokens = mistral_reference(Image.fromarray(smooth(h, w)), max_size).tokens
  rows = sum(t in (12, 13) for t in tokens)
  return rows, tokens.count(10) // rows


def hf_reference_grid(image: Image.Image, max_size: int) -> tuple[int, int]:
  pytest.importorskip("transformers")
  _, (h, w) = hf_reference(image, max_size)
  return h // UNIT, w // UNIT


def test_image_tokens_rows_of_img_then_break_last_is_end():
  assert image_tokens(2, 3) == [10, 10, 10, 12, 10, 10, 10, 13]
  assert image_tokens(1, 1, img_id=10, break_id=14, end_id=15) == [10, 15]
  assert len(image_tokens(55, 55)) == 55 * 55 + 55  # a 1540x1540 image
  with pytest.raises(UserError, match="rows=0"):
    image_tokens(0, 3)


def test_image_token_ids_come_from_the_tokenizer_file():
  assert tuple(image_token_ids(load_tokenizer("tekken"))) == (10, 12, 13)
  assert tuple(image_token_ids(load_tokenizer("spm_v7"))) == (10, 14, 15)
  with pytest.raises(UserError, match=r"\[IMG_BREAK\].*spm_v7"):
    image_token_ids(load_tokenizer("spm_v3"))  # has [IMG] only; the message names files that define it


def test_expand_image_placeholders_accepts_grids_and_keeps_text():
  out = expand_image_placeholders([1, 3, 10, 500, 10, 4], [(1, 2), preprocess_hf(noise(20, 60))])
  assert out == [1, 3, 10, 10, 13, 500, 10, 10, 10, 13, 4]


@pytest.mark.parametrize("n_placeholders,n_images", [(2, 1), (1, 2), (0, 1)])
def test_placeholder_count_mismatch_raises_user_error_naming_both_counts(n_placeholders, n_images):
  tokens = [1, 3] + [10, 99] * n_placeholders + [4]
  with pytest.raises(UserError, match=rf"^{n_placeholders} \[IMG\] placeholder.*but {n_images} image"):
    expand_image_placeholders(tokens, [(1, 1)] * n_images)


def test_already_expanded_tokens_get_a_hint():
  with pytest.raises(UserError, match="look expanded already"):
    expand_image_placeholders(image_tokens(2, 2), [(2, 2)])


def test_load_image_accepts_every_source_kind(tmp_path):
  array = noise(9, 13)
  data = png_bytes(array)
  path = tmp_path / "pic.png"
  path.write_bytes(data)
  b64 = base64.b64encode(data).decode()
  sources = [array, Image.fromarray(array), data, bytearray(data), str(path), path, f"file://{path}", b64,
             f"data:image/png;base64,{b64}"]
  for source in sources:
    image = load_image(source)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), array, err_msg=type(source).__name__)
  assert np.asarray(load_image(array[..., 0])).shape == (9, 13, 3)  # grayscale HxW


def test_undecodable_bytes_raise_user_error_naming_the_item():
  with pytest.raises(UserError, match=r"^base64 image #3: cannot decode.*accepted: a path"):
    preprocess_mistral(base64.b64encode(b"not an image at all").decode(), name="base64 image #3")
  with pytest.raises(UserError, match=r"^image bytes \(5 bytes\): cannot decode"):
    load_image(b"\x89PNGx")
  truncated = png_bytes(noise(40, 40))[:120]  # header fine, pixel data cut: fails at decode, not later
  with pytest.raises(UserError, match="cannot decode"):
    preprocess_hf(truncated, name="truncated.png")


def test_bad_path_and_other_bad_inputs_raise_user_error_naming_the_item(tmp_path):
  junk = tmp_path / "junk.jpg"
  junk.write_bytes(b"definitely not a jpeg")
  with pytest.raises(UserError, match=rf"^image file {junk}: cannot decode"):
    load_image(junk)
  missing = tmp_path / "missing.png"
  with pytest.raises(UserError, match=r"missing\.png.*no such file"):
    load_image(str(missing))
  with pytest.raises(UserError, match="is a directory"):
    load_image(tmp_path)
  with pytest.raises(UserError, match="never downloaded"):
    load_image("https://example.com/cat.png")
  with pytest.raises(UserError, match="data URL"):
    load_image("data:image/png;base64,@@@not-base64@@@")
  with pytest.raises(UserError, match=r"uint8 HxWx3.*float32"):
    load_image(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(UserError, match="unsupported image input type int"):
    load_image(42)
  with pytest.raises(UserError, match="max_image_size must be a positive integer"):
    preprocess_hf(noise(4, 4), max_image_size=0)


def test_module_constants_are_the_clip_statistics_mistral_common_uses():
  assert images.IMAGE_MEAN == mc_image.DATASET_MEAN and images.IMAGE_STD == mc_image.DATASET_STD
