"""Chat data with images: chunk parsing, rendering (own and mistral-common), image-aware packing and resume."""

import base64
import json
import pathlib
import re
import typing

import numpy as np
import pytest

from ministral_jax.data import chat, images, packing, pipeline, shapes, spm_train, tokenizers
from ministral_jax.model import vision

SIZES = ((28, 28), (56, 56), (40, 70), (30, 90))  # (H, W); 40x70 and 30x90 are resized up to multiples of 28
WORDS = "red green blue square circle triangle left right top bottom".split()


def _png(rng, height: int, width: int) -> str:
  return shapes.encode_png(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _image_chunk(rng) -> dict:
  return {"type": "image", "image": _png(rng, *SIZES[int(rng.integers(len(SIZES)))])}


def _text(rng, low=1, high=5) -> dict:
  return {"type": "text", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))}


def _record(i: int) -> dict:
  """Conversation i: text only, one image, two images in one turn, or one image in each of two exchanges."""
  rng = np.random.default_rng(100 + i)
  answer = lambda: {"role": "assistant", "content": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))}
  kind = i % 4
  if kind == 0:
    messages = [{"role": "user", "content": f"question {i}"}, answer()]
  elif kind == 1:
    messages = [{"role": "user", "content": [_image_chunk(rng), _text(rng)]}, answer()]
  elif kind == 2:
    messages = [{"role": "user", "content": [_text(rng), _image_chunk(rng), _text(rng), _image_chunk(rng)]},
                answer()]
  else:
    messages = [{"role": "user", "content": [_text(rng), _image_chunk(rng)]}, answer(),
                {"role": "user", "content": [_image_chunk(rng), _text(rng)]}, answer()]
  return {"messages": messages, "id": i}


def _write(path: pathlib.Path, records) -> pathlib.Path:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("chat_images")
  _write(root / "train.jsonl", [_record(i) for i in range(24)])
  _write(root / "eval.jsonl", [_record(i) for i in range(24, 31)])
  return root


def _cfg(corpus: pathlib.Path, **overrides):
  cfg = pipeline.data_config()
  cfg.update({**dict(source="chat", paths=str(corpus / "train.jsonl"), eval_paths=str(corpus / "eval.jsonl"),
                     seq_len=96, spm_vocab_size=400, chat_pack_bins=3, image_slots=64), **overrides})
  return cfg


@pytest.fixture(scope="module")
def spm(corpus, tmp_path_factory) -> tokenizers.Tokenizer:
  """The project's own SentencePiece, trained with image tokens because image_slots > 0."""
  return pipeline.build_tokenizer(_cfg(corpus), str(tmp_path_factory.mktemp("workdir")))


def _tekken_v13(tmp_path: pathlib.Path, image: dict | None) -> tokenizers.Tokenizer:
  """The bundled Tekken vocabulary as a v13 file with every special token, with or without an image config."""
  from mistral_common.tokens.tokenizers.base import SpecialTokens

  data = json.loads(tokenizers.bundled_tokenizer_path("tekken").read_text())
  count = data["config"]["default_num_special_tokens"]
  names = [t.value for t in SpecialTokens] + [f"<SPECIAL_{i}>" for i in range(len(SpecialTokens), count)]
  data["special_tokens"] = [{"rank": i, "token_str": name, "is_control": True} for i, name in enumerate(names)]
  data["config"]["version"] = "v13"
  data.pop("image", None)
  if image is not None:
    data["image"] = image
  path = tmp_path / ("tekken_v13_image.json" if image else "tekken_v13.json")
  path.write_text(json.dumps(data))
  return tokenizers.load_tokenizer(path)


def _conversation(record: dict, where: str = "test.jsonl:1") -> chat.Conversation:
  return chat.parse_conversation(record, where)


def _ids(tok) -> tuple[int, int, int]:
  return tuple(tok.special_id(name) for name in chat.IMAGE_TOKENS)


# ----------------------------------------------------------------------------- parsing


def test_chunked_user_content_parses_into_text_and_lazy_image_references(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "cat.png"
  path.write_bytes(base64.b64decode(_png(rng, 28, 28)))
  data_url = "data:image/png;base64," + _png(rng, 28, 56)
  record = {"messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": str(path)},
                                   {"type": "text", "text": ""}, {"type": "text", "text": "with"},
                                   {"type": "image_url", "image_url": {"url": data_url}}]},
      {"role": "assistant", "content": "Same."},
      {"role": "user", "content": [{"type": "image_url", "image_url": "not decoded until rendered"}]},
      {"role": "assistant", "content": "?"}]}
  conversation = _conversation(record)
  first = conversation.messages[1]
  assert first.content == "Compare\n\nwith"  # the text, for consumers that want text (a tokenizer's corpus)
  assert first.chunks == ("Compare", chat.ImageRef(str(path), 2, 2), "", "with", chat.ImageRef(data_url, 2, 5))
  assert conversation.messages[0].chunks is None and conversation.messages[2].content == "Same."
  assert [(i.message, i.chunk) for i in conversation.images] == [(2, 2), (2, 5), (4, 1)]
  assert "Compare" in chat.plain_text(conversation) and data_url not in chat.plain_text(conversation)
  # The third image is no image at all: found when rendered, naming the record, message and chunk.
  with pytest.raises(ValueError, match=r"test.jsonl:1: message 4, chunk 1 \(image\): no such file, and not valid "
                                       "base64"):
    chat.render(conversation, tokenizers.load_tokenizer("tekken_240911"))


BAD_CHUNKS = {
    "image in assistant": ([{"role": "user", "content": "q"},
                            {"role": "assistant", "content": [{"type": "image", "image": "x.png"}]}],
                           r"message 2 \(assistant\) has an image \(chunk 1\); images are only allowed in user"),
    "image in system": ([{"role": "system", "content": [{"type": "text", "text": "s"},
                                                        {"type": "image", "image": "x.png"}]},
                         {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                        r"message 1 \(system\) has an image \(chunk 2\)"),
    "text list in assistant": ([{"role": "user", "content": "q"},
                                {"role": "assistant", "content": [{"type": "text", "text": "a"}]}],
                               r"message 2 \(assistant\) needs a string 'content'; chunk lists"),
    "unknown chunk type": ([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]},
                            {"role": "assistant", "content": "a"}], "message 1 chunk 1 has type 'audio'"),
    "chunk not an object": ([{"role": "user", "content": ["just text"]}, {"role": "assistant", "content": "a"}],
                            "message 1 chunk 1 is not a JSON object"),
    "unknown chunk field": ([{"role": "user", "content": [{"type": "image", "image": "x.png", "alt": "cat"}]},
                             {"role": "assistant", "content": "a"}],
                            r"message 1 chunk 1 \(image\) has unknown field\(s\) \['alt'\]"),
    "web url": ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]},
                 {"role": "assistant", "content": "a"}], "web URL; images are never downloaded"),
    "empty image": ([{"role": "user", "content": [{"type": "image", "image": " "}]},
                     {"role": "assistant", "content": "a"}], r"chunk 1 \(image\) needs a non-empty string"),
    "empty list": ([{"role": "user", "content": []}, {"role": "assistant", "content": "a"}],
                   r"message 1 \(user\) has an empty content list"),
    "only empty text": ([{"role": "user", "content": [{"type": "text", "text": " "}]},
                         {"role": "assistant", "content": "a"}], r"message 1 \(user\) is empty"),
    "non-string text": ([{"role": "user", "content": [{"type": "text", "text": 3}]},
                         {"role": "assistant", "content": "a"}], r"chunk 1 \(text\) needs a string 'text'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNKS))
def test_each_bad_chunk_is_an_error_naming_file_and_line(tmp_path, case):
  messages, message = BAD_CHUNKS[case]
  good = {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                       {"role": "assistant", "content": "a"}]}
  path = _write(tmp_path / "data.jsonl", [good, {"messages": messages}])
  with pytest.raises(ValueError, match=f"{re.escape(str(path))}:2: .*{message}"):
    chat.read_conversations(str(path))


def test_undecodable_image_stops_the_pipeline_naming_record_message_and_chunk(tmp_path, spm):
  bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                      {"role": "user", "content": [{"type": "text", "text": "see"},
                                                   {"type": "image", "image": "aGVsbG8gd29ybGQ="}]},
                      {"role": "assistant", "content": "ok"}]}
  path = _write(tmp_path / "bad.jsonl", [_record(1), bad])
  cfg = _cfg(tmp_path, paths=str(path), eval_paths=str(path))
  with pytest.raises(ValueError, match=r"bad.jsonl:2: message 3, chunk 2 \(image\): cannot decode as an image"):
    chat.chat_iterator(cfg, spm, 2, 0)


# ----------------------------------------------------------------------------- rendering


def test_own_rendering_is_inst_then_image_layout_then_text_then_answer(spm):
  rng = np.random.default_rng(2)
  png = _png(rng, 40, 70)
  for content in ([{"type": "image", "image": png}, {"type": "text", "text": "What is it?"}],
                  [{"type": "text", "text": "What is it?"}, {"type": "image", "image": png}]):  # image goes first
    rendered = chat.render(_conversation({"messages": [{"role": "user", "content": content},
                                                       {"role": "assistant", "content": "noise"}]}), spm)
    expected = images.preprocess_mistral(png)
    assert expected.grid == (2, 3)  # 40x70 -> 56x84
    inst, end_inst = spm.special_id("[INST]"), spm.special_id("[/INST]")
    assert rendered.tokens.tolist() == [spm.bos_id, inst, *images.image_tokens(2, 3, *_ids(spm)),
                                        *spm.encode("What is it?"), end_inst, *spm.encode("noise"), spm.eos_id]
    assert spm.decode(rendered.tokens, keep_special=True) == (
        "<s>[INST][IMG][IMG][IMG][IMG_BREAK][IMG][IMG][IMG][IMG_END]What is it?[/INST]noise</s>")
    assert len(rendered.images) == 1 and np.array_equal(rendered.images[0], expected.pixels)
    assert rendered.images[0].dtype == np.float32 and rendered.turn_images == (1,)


def test_hf_preprocessing_is_a_data_config_switch(spm):
  png = _png(np.random.default_rng(3), 30, 90)
  conversation = _conversation({"messages": [{"role": "user", "content": [{"type": "image", "image": png}]},
                                             {"role": "assistant", "content": "a"}]})
  hf = chat.render(conversation, spm, chat.ImageSettings(preprocess="hf"))
  mistral = chat.render(conversation, spm)
  np.testing.assert_array_equal(hf.images[0], images.preprocess_hf(png).pixels)
  np.testing.assert_array_equal(mistral.images[0], images.preprocess_mistral(png).pixels)
  small = chat.render(conversation, spm, chat.ImageSettings(max_size=28))  # the geometry is the data config's
  assert small.images[0].shape == (3, 28, 28)


def test_image_tokens_are_never_in_the_loss_mask(spm):
  rendered = chat.render(_conversation(_record(3)), spm)
  is_image = np.isin(rendered.tokens, _ids(spm))
  assert is_image.sum() > 0 and not rendered.mask[is_image].any() and rendered.mask.any()
  builder = chat._Builder([spm.bos_id])  # even a turn a caller marks predicted
  builder.add([*images.image_tokens(1, 2, *_ids(spm)), *spm.encode("x"), spm.eos_id], predicted=True)
  built = builder.build(spm)
  assert built.mask.tolist() == [0, 0, 0, 0] + [1] * (len(built.tokens) - 4)


def _reference_request(record: dict):
  """mistral-common's public request for a record, images as PIL images."""
  from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
  from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
  from mistral_common.protocol.instruct.request import ChatCompletionRequest

  def chunk(c):
    if c["type"] == "text":
      return TextChunk(text=c["text"])
    return ImageChunk(image=images.load_image(c.get("image") or c["image_url"]["url"]))

  def message(m):
    cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}[m["role"]]
    return cls(content=m["content"] if isinstance(m["content"], str) else [chunk(c) for c in m["content"]])

  return ChatCompletionRequest(messages=[message(m) for m in record["messages"]])


def _mixed_record() -> dict:
  rng = np.random.default_rng(4)
  return {"messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                   {"type": "image", "image": _png(rng, 40, 70)}]},
      {"role": "assistant", "content": "Noise."},
      {"role": "user", "content": [{"type": "text", "text": "And"},
                                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                       + _png(rng, 90, 30)}},
                                   {"type": "text", "text": "this?"}, {"type": "image", "image": _png(rng, 28, 28)}]},
      {"role": "assistant", "content": "More noise."}]}


def test_mistral_common_rendering_with_images_equals_encode_chat_completion():
  from mistral_common.protocol.instruct.validator import ValidationMode
  from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

  tok = tokenizers.load_tokenizer("tekken_240911")  # Pixtral-12B's image config: 16-pixel patches, no merge
  record = _mixed_record()
  rendered = chat.render(_conversation(record), tok)
  reference = MistralTokenizer.from_file(str(tok.path), mode=ValidationMode.finetuning).encode_chat_completion(
      _reference_request(record))
  assert rendered.tokens.tolist() == reference.tokens
  assert len(rendered.images) == len(reference.images) == 3
  for ours, theirs in zip(rendered.images, reference.images):
    np.testing.assert_array_equal(ours, theirs)
  assert rendered.turn_images == (1, 3)
  assert not rendered.mask[np.isin(rendered.tokens, _ids(tok))].any()


def test_own_image_layout_is_mistral_commons_v13_layout(tmp_path):
  """The own renderer (spm_train models) gives mistral-common's ids and pixels, chunk order and joins included."""
  tok = _tekken_v13(tmp_path, {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2})
  conversation = _conversation(_mixed_record())
  own, reference = chat._render_own(conversation, tok), chat.render(conversation, tok)
  assert chat.uses_mistral_common(tok)
  assert own.tokens.tolist() == reference.tokens.tolist()
  assert own.mask.tolist() == reference.mask.tolist() and own.turn_ends == reference.turn_ends
  assert own.turn_images == reference.turn_images == (1, 3)
  for ours, theirs in zip(own.images, reference.images, strict=True):
    np.testing.assert_array_equal(ours, theirs)
  assert tok.decode(own.tokens, keep_special=True).startswith(
      "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST][IMG][IMG][IMG][IMG_BREAK]")


def test_mistral_tokenizer_without_image_config_is_an_error_naming_the_fix(tmp_path):
  tok = _tekken_v13(tmp_path, None)
  conversation = _conversation(_record(1), "shapes.jsonl:2")
  with pytest.raises(ValueError, match=r"shapes.jsonl:2: .*has no image config.*Fix: use the tokenizer file that "
                                       "ships with the vision checkpoint"):
    chat.render(conversation, tok)
  assert chat.render(_conversation(_record(0)), tok).images == ()  # text-only conversations still render


def test_mistral_tokenizer_geometry_must_match_the_vision_tower():
  tok = tokenizers.load_tokenizer("tekken_240911")
  with pytest.raises(ValueError, match=r"16-pixel patches merged 1x1, but the vision tower takes 14-pixel patches "
                                       r"merged 2x2"):
    chat.render(_conversation(_record(1)), tok, chat.ImageSettings(slots=64))


def test_spm_gets_image_tokens_only_when_asked(corpus, spm, tmp_path):
  assert _ids(spm) == (9, 10, 11)  # right after the six chat control tokens
  assert all(spm.is_special(i) for i in _ids(spm)) and not set(_ids(spm)) & set(spm.encode("[IMG] [IMG_END]"))
  docs = ["alpha beta gamma delta 123 " * (i % 7 + 1) + f"line {i}" for i in range(300)]
  text_only = spm_train.train_or_load(docs, 400, tmp_path / "a")
  # Text-only models keep their options, so their cache name (a hash of corpus and options) and file.
  assert text_only.name == "spm_400_daa55c419689ed6a.model"
  assert "[IMG]" not in tokenizers.load_tokenizer(text_only).special_tokens
  with_images = spm_train.train_or_load(docs, 400, tmp_path / "b", image_tokens=True)
  assert with_images.name != text_only.name
  assert _ids(tokenizers.load_tokenizer(with_images)) == (9, 10, 11)
  text_cfg = _cfg(corpus, image_slots=0)
  assert "[IMG]" not in pipeline.build_tokenizer(text_cfg, str(tmp_path / "w")).special_tokens


def test_truncation_drops_the_images_of_dropped_exchanges(spm):
  rng = np.random.default_rng(5)
  record = {"messages": [
      {"role": "user", "content": [{"type": "image", "image": _png(rng, 56, 56)}, {"type": "text", "text": "one"}]},
      {"role": "assistant", "content": "a"},
      {"role": "user", "content": [{"type": "image", "image": _png(rng, 84, 84)}, {"type": "text", "text": "two"}]},
      {"role": "assistant", "content": "b"}]}
  conversation = _conversation(record)
  full = chat.render(conversation, spm)
  assert [p.shape for p in full.images] == [(3, 56, 56), (3, 84, 84)] and full.turn_images == (1, 2)
  rendered, dropped = chat.truncate(conversation, spm, 1000, max_patches=32)  # 16 + 36 patches
  assert dropped == 1 and len(rendered.images) == 1
  assert rendered.tokens.tolist() == chat.render(conversation.head(1), spm).tokens.tolist()
  rendered, dropped = chat.truncate(conversation, spm, full.turn_ends[0] + 2)  # the token budget cuts it too
  assert dropped == 1 and len(rendered.images) == 1
  assert chat.truncate(conversation, spm, 1000, max_patches=12) == (None, 2)
  assert chat.truncate(conversation, spm, 1000, max_patches=52)[1] == 0


# ----------------------------------------------------------------------------- packing


def _take(it, n: int) -> list[dict]:
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class _Packed(typing.NamedTuple):
  images: tuple[np.ndarray, ...]  # as rendered
  source: chat.Conversation


def _by_tokens(cfg, tok, split="train") -> dict[tuple[int, ...], _Packed]:
  """Each conversation the split packs, by its rendered tokens."""
  settings = chat.image_settings(cfg)
  out = {}
  for conversation in chat._prepare(cfg, tok, split).conversations:
    rendered = chat.render(conversation, tok, settings)
    out[tuple(rendered.tokens.tolist())] = _Packed(rendered.images, conversation)
  return out


def _check_rows(batches, rendered: dict, tok, slots: int) -> int:
  """Every row's patch buffer is its conversations' source images, each decoded, preprocessed and patchified
  here, in row order (`vision.pack_images` of them, and slice by slice); returns the number of images checked."""
  img_id = tok.special_id("[IMG]")
  checked = 0
  for b in batches:
    for r in range(len(b["inputs"])):
      seg, ids = b["segment_ids"][r], b["patch_images"][r]
      row_images = []
      for s in range(1, seg.max() + 1):
        at = np.flatnonzero(seg == s)
        conv = rendered[(*b["inputs"][r, at].tolist(), int(b["targets"][r, at[-1]]))]
        # The corpus never has an image that force_img_first moves past another, so data order is token order.
        sources = [images.preprocess_mistral(ref.source).pixels for ref in conv.source.images]
        assert len(sources) == len(conv.images)
        assert (b["inputs"][r, at] == img_id).sum() == sum(p.shape[1] * p.shape[2] for p in sources) // 28**2
        row_images.extend(sources)
      assert (b["inputs"][r] == img_id).sum() == (ids >= 0).sum() // 4
      expected = vision.pack_images([row_images], slots, 14, 2)
      np.testing.assert_array_equal(b["patches"][r], expected.patches[0])
      np.testing.assert_array_equal(b["patch_rows"][r], expected.rows[0])
      np.testing.assert_array_equal(b["patch_cols"][r], expected.cols[0])
      np.testing.assert_array_equal(ids, expected.image_ids[0])  # 0, 1, ... in [IMG] order, -1 on padding
      start = 0
      for k, pixels in enumerate(row_images):  # and by hand: each image patchified, at its place
        patches, rows, cols = vision.patchify(pixels, 14, 2)
        np.testing.assert_array_equal(b["patches"][r, start:start + len(patches)], patches)
        np.testing.assert_array_equal(b["patch_rows"][r, start:start + len(patches)], rows)
        assert (ids[start:start + len(patches)] == k).all()
        start += len(patches)
      assert (ids[start:] == packing.PAD_IMAGE).all() and not b["patches"][r, start:].any()
      checked += len(row_images)
  return checked


def test_packed_rows_hold_each_conversations_patches_in_img_order(corpus, spm):
  cfg = _cfg(corpus)
  it = chat.chat_iterator(cfg, spm, global_batch=3, seed=0)
  assert it.stats == {"conversations": 24, "kept": 24, "truncated": 0, "dropped": 0, "dropped_exchanges": 0,
                      "images": 30, "over_image_budget": 0}
  batches = _take(it, 6)
  for b in batches:
    assert set(b) == {*chat.FEATURES, *chat.IMAGE_FEATURES}
    assert b["patches"].shape == (3, 64, 14, 14, 3) and b["patches"].dtype == np.float32
    for k in ("patch_rows", "patch_cols", "patch_images"):
      assert b[k].shape == (3, 64) and b[k].dtype == np.int32
  assert _check_rows(batches, _by_tokens(cfg, spm), spm, 64) >= 10


def _row_conversations(batch, r: int, rendered: dict):
  """(rendering, first patch slot, patches) of each conversation of row r, in row order."""
  seg, offset = batch["segment_ids"][r], 0
  for s in range(1, seg.max() + 1):
    at = np.flatnonzero(seg == s)
    conv = rendered[(*batch["inputs"][r, at].tolist(), int(batch["targets"][r, at[-1]]))]
    patches = sum(p.shape[1] * p.shape[2] for p in conv.images) // 14**2
    yield conv, offset, patches
    offset += patches


def test_two_images_of_one_conversation_get_distinct_ids(corpus, spm):
  cfg = _cfg(corpus)
  batches = _take(chat.chat_iterator(cfg, spm, global_batch=2, seed=0), 6)
  rendered, found = _by_tokens(cfg, spm), 0
  for b in batches:
    for r in range(2):
      row_ids = []
      for conv, offset, patches in _row_conversations(b, r, rendered):
        ids = b["patch_images"][r, offset:offset + patches].tolist()
        assert len(set(ids)) == len(conv.images) and -1 not in ids
        found += len(conv.images) == 2
        row_ids.extend(dict.fromkeys(ids))
      assert row_ids == list(range(len(row_ids)))  # distinct across the row's conversations too
  assert found >= 2


def test_text_only_config_makes_todays_batches_and_state(corpus, spm, tmp_path):
  text = _write(tmp_path / "text.jsonl", [_record(i) for i in range(0, 40, 4)])  # kind 0: no images
  base = dict(paths=str(text), eval_paths=str(text))
  plain = chat.chat_iterator(_cfg(corpus, image_slots=0, **base), spm, 2, seed=0)
  assert plain.stats == {"conversations": 10, "kept": 10, "truncated": 0, "dropped": 0, "dropped_exchanges": 0}
  assert "images" not in plain.get_state()["pipeline"]
  with_slots = chat.chat_iterator(_cfg(corpus, image_slots=8, **base), spm, 2, seed=0)
  a, b = _take(plain, 3), _take(with_slots, 3)
  for x, y in zip(a, b):
    assert set(x) == set(chat.FEATURES) and vision.from_batch(x) is None  # no new keys at all
    for k in chat.FEATURES:  # image slots on text-only data change nothing but add empty buffers
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert (y["patch_images"] == -1).all() and not y["patches"].any()
  evals = list(chat.chat_eval_batches(_cfg(corpus, image_slots=0, **base), spm, 4))
  assert all(set(e) == set(chat.FEATURES) and e["inputs"].ndim == 2 for e in evals)


def test_images_in_a_text_only_config_are_an_error_naming_the_fix(corpus, spm):
  with pytest.raises(ValueError, match=r"train.jsonl:2: the conversation has images, but data.image_slots=0 .*Fix: "
                                       "set data.image_slots"):
    chat.chat_iterator(_cfg(corpus, image_slots=0), spm, 2, 0)


def test_image_config_problems_are_reported_together(corpus, spm):
  with pytest.raises(ValueError, match=r"(?s)image_slots=30: a multiple of image_merge\*\*2=4.*"
                                       r"image_preprocess='pil': one of \('mistral', 'hf'\)"):
    chat.chat_iterator(_cfg(corpus, image_slots=30, image_preprocess="pil"), spm, 2, 0)


def test_over_budget_conversation_is_dropped_and_counted(corpus, spm, tmp_path):
  rng = np.random.default_rng(6)
  big = {"messages": [{"role": "user", "content": [{"type": "image", "image": _png(rng, 84, 112)},
                                                   {"type": "text", "text": "big"}]},
                      {"role": "assistant", "content": "too big"}]}  # 6 x 8 = 48 patches
  records = [_record(1), big, _record(2)]
  path = _write(tmp_path / "budget.jsonl", records)
  cfg = _cfg(corpus, paths=str(path), eval_paths=str(path), image_slots=32)
  it = chat.chat_iterator(cfg, spm, 1, seed=0)
  assert it.stats["dropped"] == 1 and it.stats["over_image_budget"] == 1 and it.stats["kept"] == 2
  kept = chat._prepare(cfg, spm, "train").conversations
  assert [c.where.rsplit(":", 1)[1] for c in kept] == ["1", "3"]
  batches = list(chat.chat_eval_batches(cfg, spm, 2))
  assert _check_rows(batches, _by_tokens(cfg, spm, "eval"), spm, 32) == 3  # 1 + 2 images, the big one not packed
  with pytest.raises(ValueError, match=r"fits in data.seq_len=96 tokens and data.image_slots=4 image patches.*"
                                       "raise data.seq_len or data.image_slots"):
    chat.chat_iterator(_cfg(corpus, paths=str(path), eval_paths=str(path), image_slots=4), spm, 1, 0)


def test_eval_batches_pad_the_patch_buffers_of_empty_rows(corpus, spm):
  cfg = _cfg(corpus)
  batches = list(chat.chat_eval_batches(cfg, spm, batch_size=4))
  last = batches[-1]
  empty = last["segment_ids"].max(axis=1) == 0
  assert empty.any() and last["patches"].shape == (4, 64, 14, 14, 3)
  assert (last["patch_images"][empty] == -1).all() and not last["patches"][empty].any()
  every_image = sum(len(c.images) for c in chat.read_conversations(str(corpus / "eval.jsonl")))
  assert _check_rows(batches, _by_tokens(cfg, spm, "eval"), spm, 64) == every_image == 8
  again = list(chat.chat_eval_batches(cfg, spm, batch_size=4, max_batches=1, rows=(1, 3)))
  _assert_same(again, [{k: v[1:3] for k, v in batches[0].items()}])


def test_from_batch_gives_the_fields_of_vision_images(corpus, spm):
  batch = next(chat.chat_iterator(_cfg(corpus), spm, 2, 0))
  image_batch = vision.from_batch(batch)
  assert image_batch.patches is batch["patches"] and image_batch.image_ids is batch["patch_images"]
  assert image_batch.rows is batch["patch_rows"] and image_batch.cols is batch["patch_cols"]


def _next_row(state) -> int:
  return max(int(s["packer"]["next_row"]) for s in state["slots"].values())


@pytest.mark.parametrize("epochs", [0, 1])
def test_restored_image_iterator_continues_the_exact_stream(corpus, spm, epochs):
  cfg = _cfg(corpus, max_documents=10, epochs=epochs, image_slots=32)
  make = lambda: chat.chat_iterator(cfg, spm, global_batch=2, seed=1)
  it, batches, states = make(), [], []
  for batch in it:
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(batch)
    if len(batches) == 10:
      break
  assert len(batches) < 10 if epochs else len(batches) == 10
  assert any(_next_row(s) for s in states) and states[0]["pipeline"]["images"].startswith("slots=32,")
  assert any((b["patch_images"] >= 0).any() for b in batches)
  for start in range(len(states)):
    resumed = make()
    resumed.set_state(states[start])
    rest = list(resumed) if epochs else _take(resumed, len(batches) - start - 1)
    _assert_same(rest, batches[start + 1:])
  other = chat.chat_iterator(_cfg(corpus, max_documents=10, epochs=epochs, image_slots=64), spm, 2, seed=1)
  with pytest.raises(ValueError, match="different pipeline.*images"):
    other.set_state(states[0])
