"""A synthetic image-and-question task: coloured shapes on a canvas, generated offline from a seed.

A vision-language model in miniature (a tiny ViT, the projector, a small
decoder) must be shown to learn something in seconds on CPU. Downloaded
benchmarks are far too hard for it and cannot be regenerated at will; this
task can: every image comes from a seed, and every answer is computed from
the scene that drew it, so it is exact.

Scenes: a light canvas holds 1-4 shapes (square, circle, triangle) in four
clearly distinct colours. The canvas is cut into a 2x2 grid of quadrants and
each shape lies wholly inside its own quadrant, so shapes never overlap and
"where is it?" always has one answer. Canvas sides are multiples of 28: with
14-pixel patches merged 2x2, the default 56x56 canvas is 2x2 image tokens, one
per quadrant. Drawing is plain numpy, without anti-aliasing, so every pixel
is exactly a palette colour or the background (tests read colours back).

Questions (one short canonical answer each; a kind is skipped for a scene
where its answer would be ambiguous):

  colour    What colour is the circle?          red     (only if exactly one circle)
  shape     What shape is the red object?       circle  (only if exactly one red object)
  count     How many circles are there?         2       (also "How many objects are there?"; may be 0)
  position  Where is the red circle?            top-left (only if exactly one red circle)

Examples are chat conversations in the `messages` schema of `chat.py`, except
that the user's content is a list of chunks in the OpenAI / mistral-common
style, the image first (as mistral-common places it):

  {"messages": [{"role": "user", "content": [{"type": "image", "image": "<base64 PNG>"},
                                              {"type": "text", "text": "What colour is the circle?"}]},
                {"role": "assistant", "content": "red"}],
   "kind": "colour", "question": "What colour is the circle?", "answer": "red", "scene": {...}}

Splits are disjoint by construction (as in `rewards/tasks.py`): an (image,
question) pair belongs to `heldout` if and only if the SHA-256 of its pixels
and question falls in the lowest HELDOUT_PERCENT of the hash space, so no
seed or size can put a held-out example into train. Within a split no
(image, question) pair repeats.

Generate files with:
  python -m ministral_jax.data.shapes --out DIR --train N --heldout M --seed S
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import uuid
from typing import Any, Sequence

import numpy as np

from ministral_jax.errors import EXIT_USER_ERROR, UserError

CELL = 28  # canvas sides are multiples of this: two 14-pixel patches, one merged image token
SIZES = (28, 56, 84, 112)  # the sides the task is meant for; any positive multiple of CELL is accepted
KINDS = ("colour", "shape", "count", "position")
SHAPES = ("square", "circle", "triangle")
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles"}
# Far apart in RGB and from every background, so a tiny encoder separates them after a few steps.
PALETTE = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (230, 190, 0)}
BACKGROUNDS = {"white": (255, 255, 255), "light grey": (232, 232, 232), "cream": (250, 244, 225)}
POSITIONS = (("top-left", "top-right"), ("bottom-left", "bottom-right"))  # [row][col] of the 2x2 grid
MAX_SHAPES = len(POSITIONS) * len(POSITIONS[0])
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 20
_GENERATE_HINT = "python -m ministral_jax.data.shapes --out DIR --train N --heldout M --seed S"
_TRAILING_PUNCTUATION = ".,;:!?\"'`)]}"


# ----------------------------------------------------------------------------- scenes


@dataclasses.dataclass(frozen=True)
class Shape:
  """One shape: its grid cell (row, col of the 2x2 quadrants), centre pixel (y, x) and half-extent in pixels.

  The shape covers at most rows cy-radius..cy+radius and columns cx-radius..cx+radius, all inside its cell.
  """

  kind: str
  colour: str
  cell: tuple[int, int]
  centre: tuple[int, int]
  radius: int

  @property
  def position(self) -> str:
    return POSITIONS[self.cell[0]][self.cell[1]]


@dataclasses.dataclass(frozen=True)
class Scene:
  """What an image shows: canvas size, background and shapes; enough to redraw it and answer any question."""

  height: int
  width: int
  background: str
  shapes: tuple[Shape, ...]

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Scene:
    shapes = tuple(Shape(s["kind"], s["colour"], tuple(s["cell"]), tuple(s["centre"]), s["radius"])
                   for s in d["shapes"])
    return cls(d["height"], d["width"], d["background"], shapes)


def canvas_size(size: int | Sequence[int]) -> tuple[int, int]:
  """(height, width) from a side or a pair; each must be a positive multiple of CELL so patches tile it."""
  sides = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  if len(sides) != 2:
    raise UserError(f"canvas size {size!r}: give one side or (height, width)")
  height, width = sides
  for side in (height, width):
    if not isinstance(side, (int, np.integer)) or side < CELL or side % CELL:
      raise UserError(f"canvas size {size!r}: each side must be a positive multiple of {CELL} "
                      f"(e.g. {', '.join(map(str, SIZES))}), so 14-pixel patches merged 2x2 tile it")
  return int(height), int(width)


def _radius_range(cell_h: int, cell_w: int) -> tuple[int, int]:
  """Smallest and largest half-extent: big enough to tell the kinds apart, small enough to leave a margin."""
  side = min(cell_h, cell_w)
  largest = min(round(0.38 * side), (side - 3) // 2)  # >= 1 pixel of background all round within the cell
  return max(2, min(largest, round(0.25 * side))), largest


def sample_scene(rng: np.random.Generator, size: int | Sequence[int] = 56,
                 n_shapes: int | None = None) -> Scene:
  """A random scene: 1-4 shapes (or `n_shapes`), kinds and colours drawn with replacement, in distinct cells.

  Repeats are allowed on purpose: they are what makes some questions ambiguous (and skipped) and counting
  questions worth asking.
  """
  height, width = canvas_size(size)
  if n_shapes is None:
    n_shapes = int(rng.integers(1, MAX_SHAPES + 1))
  if not 1 <= n_shapes <= MAX_SHAPES:
    raise UserError(f"n_shapes={n_shapes}: a scene holds 1 to {MAX_SHAPES} shapes, one per quadrant")
  cell_h, cell_w = height // 2, width // 2
  low, high = _radius_range(cell_h, cell_w)
  background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
  cells = rng.permutation(MAX_SHAPES)[:n_shapes]
  shapes = []
  for index in sorted(int(c) for c in cells):
    row, col = divmod(index, 2)
    radius = int(rng.integers(low, high + 1))
    # The centre may move anywhere that keeps the shape and a 1-pixel margin inside the cell.
    cy = row * cell_h + int(rng.integers(radius + 1, cell_h - radius - 1))
    cx = col * cell_w + int(rng.integers(radius + 1, cell_w - radius - 1))
    kind, colour = SHAPES[int(rng.integers(len(SHAPES)))], list(PALETTE)[int(rng.integers(len(PALETTE)))]
    shapes.append(Shape(kind, colour, (row, col), (cy, cx), radius))
  return Scene(height, width, background, tuple(shapes))


def shape_mask(shape: Shape, height: int, width: int) -> np.ndarray:
  """bool [height, width], True on the shape's pixels: an axis-aligned square, a disc, or an upright triangle
  (apex at the top, base along the bottom of the bounding box)."""
  ys, xs = np.ogrid[:height, :width]
  dy, dx = ys - shape.centre[0], xs - shape.centre[1]
  inside_box = (np.abs(dy) <= shape.radius) & (np.abs(dx) <= shape.radius)
  if shape.kind == "square":
    return inside_box
  if shape.kind == "circle":
    return dy * dy + dx * dx <= shape.radius * (shape.radius + 1)  # ~(r + 1/2)^2: round, not the box corners
  if shape.kind == "triangle":
    return inside_box & (2 * np.abs(dx) <= dy + shape.radius)
  raise UserError(f"unknown shape kind {shape.kind!r}; kinds are {SHAPES}")


def draw(scene: Scene) -> np.ndarray:
  """The scene's pixels, uint8 [height, width, 3]; no anti-aliasing, so every pixel is a listed colour."""
  image = np.empty((scene.height, scene.width, 3), np.uint8)
  image[:] = BACKGROUNDS[scene.background]
  for shape in scene.shapes:
    image[shape_mask(shape, scene.height, scene.width)] = PALETTE[shape.colour]
  return image


def render_scene(rng: np.random.Generator, size: int | Sequence[int] = 56, n_shapes: int | None = None
                 ) -> tuple[np.ndarray, Scene]:
  """A random scene and its image (uint8 [H, W, 3]); the same rng state always gives the same pair."""
  scene = sample_scene(rng, size, n_shapes)
  return draw(scene), scene


# ----------------------------------------------------------------------------- questions


@dataclasses.dataclass(frozen=True)
class Question:
  """A question about a scene with its one canonical answer (a colour, a shape, a number or a position)."""

  kind: str
  text: str
  answer: str


def questions(scene: Scene) -> list[Question]:
  """Every question of the four kinds whose answer the scene fixes unambiguously, in a stable order."""
  kinds = collections.Counter(s.kind for s in scene.shapes)
  colours = collections.Counter(s.colour for s in scene.shapes)
  pairs = collections.Counter((s.colour, s.kind) for s in scene.shapes)
  out = []
  for s in scene.shapes:
    if kinds[s.kind] == 1:
      out.append(Question("colour", f"What colour is the {s.kind}?", s.colour))
  for s in scene.shapes:
    if colours[s.colour] == 1:
      out.append(Question("shape", f"What shape is the {s.colour} object?", s.kind))
  out.append(Question("count", "How many objects are there?", str(len(scene.shapes))))
  out.extend(Question("count", f"How many {PLURALS[k]} are there?", str(kinds[k])) for k in SHAPES)
  for s in scene.shapes:
    if pairs[(s.colour, s.kind)] == 1:
      out.append(Question("position", f"Where is the {s.colour} {s.kind}?", s.position))
  return out


# ----------------------------------------------------------------------------- examples


def encode_png(image: np.ndarray) -> str:
  """The image as a base64 PNG string (lossless, so the pixels the answers describe are the ones decoded)."""
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image, np.uint8), "RGB").save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
  """uint8 [H, W, 3] from a base64 PNG string (a `data:image/png;base64,` prefix is allowed)."""
  from PIL import Image

  if data.startswith("data:"):
    data = data.split(",", 1)[1]
  with Image.open(io.BytesIO(base64.b64decode(data))) as image:
    return np.asarray(image.convert("RGB"))


def example_image(example: dict[str, Any]) -> np.ndarray:
  """The pixels of an example's (first) image chunk."""
  for message in example["messages"]:
    if isinstance(message["content"], list):
      for chunk in message["content"]:
        if chunk.get("type") == "image":
          return decode_png(chunk["image"])
  raise UserError(f"example has no image chunk: {json.dumps(example)[:200]}")


def make_example(image: np.ndarray, scene: Scene, question: Question) -> dict[str, Any]:
  """One conversation (user: image then question; assistant: the answer) with the fields scoring needs."""
  user = [{"type": "image", "image": encode_png(image)}, {"type": "text", "text": question.text}]
  return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": question.answer}],
          "kind": question.kind, "question": question.text, "answer": question.answer,
          "scene": scene.to_dict()}


def _pair_digest(image: np.ndarray, text: str) -> bytes:
  header = f"{image.shape[0]}x{image.shape[1]}\n{text}\n".encode()
  return hashlib.sha256(header + np.ascontiguousarray(image).tobytes()).digest()


def split_of(image: np.ndarray, text: str) -> str:
  """The split an (image, question) pair belongs to, fixed by its content alone (see module docstring)."""
  fraction = int.from_bytes(_pair_digest(image, text)[:8], "big") / 2**64
  return "heldout" if fraction < HELDOUT_PERCENT / 100 else "train"


def build_split(seed: int, n: int, split: str = "train", size: int | Sequence[int] = 56
                ) -> list[dict[str, Any]]:
  """n distinct examples of the split, question kinds balanced (each kind n/4, +-1), deterministic in
  (seed, n, split, size).

  Kinds are fixed first and scenes drawn until one answers the kind, so an ambiguous kind never skews the
  mix. A pair whose hash puts it in the other split, or that was already drawn, is passed over.
  """
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; expected one of {SPLITS}")
  if n < 1:
    raise UserError(f"a split needs at least one example, got n={n}")
  if seed < 0:
    raise UserError(f"seed must be a non-negative integer, got {seed}")
  canvas_size(size)
  rng = np.random.default_rng([seed, SPLITS.index(split)])  # a separate stream per split, even for one seed
  wanted = [KINDS[i % len(KINDS)] for i in rng.permutation(n)]
  seen: set[bytes] = set()
  examples, attempts = [], 0
  for kind in wanted:
    while True:
      attempts += 1
      if attempts > 200 * n + 10_000:
        raise UserError(f"could not draw {n} distinct {split} examples of size {size!r} (only "
                        f"{len(examples)} after many tries); ask for fewer or use a larger canvas")
      image, scene = render_scene(rng, size)
      candidates = [q for q in questions(scene) if q.kind == kind]
      if not candidates:
        continue
      question = candidates[int(rng.integers(len(candidates)))]
      digest = _pair_digest(image, question.text)
      if digest in seen or split_of(image, question.text) != split:
        continue
      seen.add(digest)
      examples.append(make_example(image, scene, question))
      break
  return examples


def normalise(text: str) -> str:
  """Lower case, single spaces, no outer whitespace or trailing punctuation: what answers are judged on."""
  text = " ".join(text.lower().split())
  return text.rstrip(_TRAILING_PUNCTUATION + " ").strip()


def score(prediction: str, answer: str) -> bool:
  """Exact match after `normalise`: a tiny model is not penalised for "Red." against "red"."""
  return normalise(prediction) == normalise(answer)


def kind_counts(examples: Sequence[dict[str, Any]]) -> dict[str, int]:
  counts = collections.Counter(e["kind"] for e in examples)
  return {k: counts[k] for k in KINDS}


# ----------------------------------------------------------------------------- files


def write_split(path: str | os.PathLike, examples: Sequence[dict[str, Any]]) -> None:
  """JSON Lines, one example a line, written to a temporary sibling and renamed over `path`, so a reader (or
  a killed generator) never sees half a file."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")  # open(): umask applies
  try:
    with open(tmp, "x", encoding="utf-8") as f:
      for example in examples:
        f.write(json.dumps(example, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_split(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The examples of a file written by `write_split`; a missing, empty or malformed file is a UserError that
  names the path and how to generate it."""
  path = os.fspath(path)
  fix = f"generate it with: {_GENERATE_HINT}"
  if not os.path.isfile(path):
    raise UserError(f"shapes data file {path} does not exist; {fix}")
  examples = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{number}: not valid JSON ({exc}); {fix}") from None
      if not isinstance(record, dict) or not all(k in record for k in ("messages", "kind", "answer")):
        raise UserError(f"{path}:{number}: not a shapes example (needs 'messages', 'kind' and 'answer'); "
                        f"{fix}")
      examples.append(record)
  if not examples:
    raise UserError(f"shapes data file {path} is empty; {fix}")
  return examples


# ----------------------------------------------------------------------------- command line


def _parse_size(text: str) -> tuple[int, int]:
  match = re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+)\s*)?", text)
  if not match:
    raise UserError(f"--size={text!r}: give a side (56) or HEIGHTxWIDTH (56x84)")
  height = int(match.group(1))
  return canvas_size((height, int(match.group(2) or height)))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="folder for train.jsonl and heldout.jsonl")
  parser.add_argument("--train", type=int, default=1000, help="train examples")
  parser.add_argument("--heldout", type=int, default=200, help="held-out examples")
  parser.add_argument("--seed", type=int, default=0, help="seed of both splits (each draws its own stream)")
  parser.add_argument("--size", default="56",
                      help="canvas side or HEIGHTxWIDTH, multiples of 28 (default 56)")
  args = parser.parse_args(argv)
  try:
    size = _parse_size(args.size)
    # Both splits are built before either is written, so a bad count leaves no half-made folder.
    splits = {split: build_split(args.seed, n, split, size)
              for split, n in (("train", args.train), ("heldout", args.heldout))}
    for split, examples in splits.items():
      write_split(os.path.join(args.out, f"{split}.jsonl"), examples)
  except UserError as e:  # bad input: a message, not a traceback
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR) from None
  parts = []
  for split, examples in splits.items():
    counts = ", ".join(f"{k} {v}" for k, v in kind_counts(examples).items())
    parts.append(f"{split} {len(examples)} ({counts})")
  print(f"Wrote shapes {size[0]}x{size[1]} to {args.out}: {'; '.join(parts)}")


if __name__ == "__main__":
  main()
