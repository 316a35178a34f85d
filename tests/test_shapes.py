"""The shapes task: scenes drawn where they say, exact unambiguous answers, disjoint splits, files, scores."""

import base64
import collections
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from ministral_jax.data import shapes
from ministral_jax.errors import EXIT_USER_ERROR, UserError

CANVASES = (28, 56, 84, 112, (56, 84), (112, 28))


@pytest.fixture(scope="module")
def train():
  return shapes.build_split(0, 200, "train")


@pytest.fixture(scope="module")
def heldout():
  return shapes.build_split(1, 100, "heldout")


def _scenes(n: int = 40):
  """(image, scene) pairs over every canvas size, from a fixed seed."""
  rng = np.random.default_rng(123)
  return [shapes.render_scene(rng, size) for size in CANVASES for _ in range(n)]


def test_render_scene_is_deterministic_for_a_seed():
  a = shapes.render_scene(np.random.default_rng(7), 56)
  b = shapes.render_scene(np.random.default_rng(7), 56)
  assert np.array_equal(a[0], b[0]) and a[1] == b[1]
  assert shapes.build_split(5, 12) == shapes.build_split(5, 12)
  assert shapes.build_split(5, 12) != shapes.build_split(6, 12)


@pytest.mark.parametrize("size", CANVASES)
def test_scenes_have_one_to_four_shapes_in_distinct_quadrants(size):
  height, width = shapes.canvas_size(size)
  seen_counts = set()
  for image, scene in (shapes.render_scene(np.random.default_rng(i), size) for i in range(60)):
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert (scene.height, scene.width) == (height, width)
    assert 1 <= len(scene.shapes) <= 4
    assert len({s.cell for s in scene.shapes}) == len(scene.shapes)
    seen_counts.add(len(scene.shapes))
    for s in scene.shapes:
      row, col = s.cell
      top, left = row * height // 2, col * width // 2
      # The bounding box and a pixel of margin lie inside the shape's own quadrant: no overlap, one position.
      assert top < s.centre[0] - s.radius and s.centre[0] + s.radius < top + height // 2 - 1
      assert left < s.centre[1] - s.radius and s.centre[1] + s.radius < left + width // 2 - 1
  assert seen_counts == {1, 2, 3, 4}


def test_shapes_are_drawn_where_the_scene_says_and_background_elsewhere():
  for image, scene in _scenes():
    background = np.array(shapes.BACKGROUNDS[scene.background], np.uint8)
    covered = np.zeros(image.shape[:2], bool)
    for s in scene.shapes:
      colour = np.array(shapes.PALETTE[s.colour], np.uint8)
      cy, cx, r = *s.centre, s.radius
      assert np.array_equal(image[cy, cx], colour), (scene, s)
      box = image[cy - r:cy + r + 1, cx - r:cx + r + 1]
      corners = [tuple(box[i, j]) == tuple(colour) for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1))]
      # Each kind has its own corner signature, so the pixels tell the kinds apart.
      expected = {"square": [True] * 4, "circle": [False] * 4, "triangle": [False, False, True, True]}[s.kind]
      assert corners == expected, (s, corners)
      assert np.all((box == colour).all(-1) | (box == background).all(-1))
      covered[cy - r:cy + r + 1, cx - r:cx + r + 1] = True
    assert (image[~covered] == background).all()


def test_palette_and_backgrounds_are_clearly_distinct():
  palette = list(shapes.PALETTE.values())
  for i, colour in enumerate(palette):
    for other in palette[i + 1:] + list(shapes.BACKGROUNDS.values()):
      assert np.linalg.norm(np.subtract(colour, other)) > 100, (colour, other)


def _referents(scene: shapes.Scene, question: shapes.Question) -> list[shapes.Shape]:
  """The shapes a question's text picks out, read from the text alone."""
  text = question.text
  if m := re.fullmatch(r"What colour is the (\w+)\?", text):
    return [s for s in scene.shapes if s.kind == m[1]]
  if m := re.fullmatch(r"What shape is the (\w+) object\?", text):
    return [s for s in scene.shapes if s.colour == m[1]]
  if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", text):
    return [s for s in scene.shapes if (s.colour, s.kind) == (m[1], m[2])]
  raise AssertionError(f"unexpected question {text!r}")


def _expected_answer(scene: shapes.Scene, question: shapes.Question) -> str:
  if m := re.fullmatch(r"How many (\w+) are there\?", question.text):
    if m[1] == "objects":
      return str(len(scene.shapes))
    kind = {v: k for k, v in shapes.PLURALS.items()}[m[1]]
    return str(sum(s.kind == kind for s in scene.shapes))
  (shape,) = _referents(scene, question)  # exactly one: the question is unambiguous
  height, width = scene.height, scene.width
  vertical = "top" if shape.centre[0] < height / 2 else "bottom"
  horizontal = "left" if shape.centre[1] < width / 2 else "right"
  return {"colour": shape.colour, "shape": shape.kind, "position": f"{vertical}-{horizontal}"}[question.kind]


def test_every_question_is_unambiguous_and_its_answer_correct():
  kinds = collections.Counter()
  for _, scene in _scenes():
    asked = shapes.questions(scene)
    assert len({q.text for q in asked}) == len(asked)
    for question in asked:
      kinds[question.kind] += 1
      assert question.answer == _expected_answer(scene, question), (scene, question)
  assert set(kinds) == set(shapes.KINDS)


def test_ambiguous_question_kinds_are_skipped():
  two_red_squares = shapes.Scene(56, 56, "white", (
      shapes.Shape("square", "red", (0, 0), (10, 10), 7), shapes.Shape("square", "red", (1, 1), (40, 40), 7)))
  asked = {q.kind: q for q in shapes.questions(two_red_squares)}
  assert set(asked) == {"count"}
  with_circle = shapes.Scene(56, 56, "white",
                             two_red_squares.shapes + (shapes.Shape("circle", "red", (0, 1), (12, 40), 8),))
  texts = {q.text: q.answer for q in shapes.questions(with_circle)}
  assert texts["What colour is the circle?"] == "red"
  assert texts["Where is the red circle?"] == "top-right"
  assert texts["How many squares are there?"] == "2" and texts["How many triangles are there?"] == "0"
  assert not any(t.startswith("What shape") or t == "What colour is the square?" for t in texts)


def _pairs(examples):
  return {(e["messages"][0]["content"][0]["image"], e["question"]) for e in examples}


def test_splits_are_disjoint_and_have_no_duplicates(train, heldout):
  assert len(_pairs(train)) == len(train) and len(_pairs(heldout)) == len(heldout)
  assert not _pairs(train) & _pairs(heldout)
  same_seed = shapes.build_split(0, 100, "heldout")
  assert not _pairs(train) & _pairs(same_seed)
  for e in train[:50]:
    assert shapes.split_of(shapes.example_image(e), e["question"]) == "train"
  for e in heldout[:50]:
    assert shapes.split_of(shapes.example_image(e), e["question"]) == "heldout"


def test_question_kinds_are_balanced(train, heldout):
  for examples in (train, heldout):
    counts = shapes.kind_counts(examples)
    assert max(counts.values()) - min(counts.values()) <= 1, counts
  answers = collections.Counter(e["answer"] for e in train if e["kind"] == "colour")
  assert set(answers) == set(shapes.PALETTE)


def test_example_is_a_chat_conversation_whose_answer_matches_its_scene(train):
  for e in train[:40]:
    user, assistant = e["messages"]
    assert user["role"] == "user" and assistant == {"role": "assistant", "content": e["answer"]}
    image_chunk, text_chunk = user["content"]
    assert image_chunk["type"] == "image" and text_chunk == {"type": "text", "text": e["question"]}
    scene = shapes.Scene.from_dict(e["scene"])
    question = shapes.Question(e["kind"], e["question"], e["answer"])
    assert question in shapes.questions(scene)
    assert np.array_equal(shapes.example_image(e), shapes.draw(scene))


def test_png_chunk_decodes_back_to_the_exact_array():
  for image, _ in _scenes(3):
    assert np.array_equal(shapes.decode_png(shapes.encode_png(image)), image)
    with Image.open(io.BytesIO(base64.b64decode(shapes.encode_png(image)))) as png:
      assert png.format == "PNG" and np.array_equal(np.asarray(png), image)


def test_mistral_common_accepts_the_conversation(train):
  from mistral_common.protocol.instruct.request import ChatCompletionRequest

  request = ChatCompletionRequest(messages=train[0]["messages"])
  chunk = request.messages[0].content[0]
  assert np.array_equal(np.asarray(chunk.image.convert("RGB")), shapes.example_image(train[0]))


def test_jsonl_round_trip_is_exact_and_atomic(tmp_path, train):
  path = tmp_path / "sub" / "train.jsonl"
  shapes.write_split(path, train)
  assert shapes.read_split(path) == json.loads(json.dumps(train))
  assert os.listdir(path.parent) == ["train.jsonl"]  # no temporary file left behind
  shapes.write_split(path, train[:3])  # replaced whole
  assert shapes.read_split(str(path)) == json.loads(json.dumps(train[:3]))


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_reading_a_missing_or_empty_file_names_the_path_and_the_fix(tmp_path, content):
  path = tmp_path / "heldout.jsonl"
  if content is not None:
    path.write_text(content)
  with pytest.raises(UserError, match=re.escape(str(path))) as info:
    shapes.read_split(path)
  assert "python -m ministral_jax.data.shapes" in str(info.value)


def test_reading_a_malformed_line_names_the_line(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text('{"messages": [], "kind": "count", "answer": "1"}\nnot json\n')
  with pytest.raises(UserError, match=re.escape(f"{path}:2")):
    shapes.read_split(path)


@pytest.mark.parametrize("prediction, answer, expected", [
    ("red", "red", True), (" Red. ", "red", True), ("TOP-LEFT!", "top-left", True), ("3\n", "3", True),
    ("  blue  ?", "blue", True), ("top  left", "top left", True), ("reddish", "red", False),
    ("top-left", "top-right", False), ("", "red", False), ("3 4", "3", False)])
def test_score_is_exact_match_after_normalising_case_whitespace_and_trailing_punctuation(
    prediction, answer, expected):
  assert shapes.score(prediction, answer) is expected


@pytest.mark.parametrize("size", [0, 27, 30, 57, (56, 50), (-28, 28), (56, 56, 56)])
def test_canvas_sides_must_be_multiples_of_28(size):
  with pytest.raises(UserError, match="multiple of 28|height, width"):
    shapes.render_scene(np.random.default_rng(0), size)


def test_cli_writes_both_splits_and_a_one_line_summary(tmp_path, capsys):
  shapes.main(["--out", str(tmp_path), "--train", "8", "--heldout", "4", "--seed", "3", "--size", "56x84"])
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and "train 8 (colour 2, shape 2, count 2, position 2)" in out[0], out
  assert "heldout 4 (colour 1, shape 1, count 1, position 1)" in out[0]
  train, heldout = (shapes.read_split(tmp_path / f"{s}.jsonl") for s in shapes.SPLITS)
  assert len(train) == 8 and len(heldout) == 4
  assert shapes.example_image(train[0]).shape == (56, 84, 3)


@pytest.mark.parametrize("args", [["--size", "50"], ["--size", "56x"], ["--heldout", "0"], ["--seed", "-1"]])
def test_cli_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, args):
  with pytest.raises(SystemExit) as info:
    shapes.main(["--out", str(tmp_path), "--train", "4", *args])
  assert info.value.code == EXIT_USER_ERROR
  assert capsys.readouterr().err.startswith("error: ")
  assert not os.listdir(tmp_path)
