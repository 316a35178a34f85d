"""Chat data for SFT: conversations, Mistral's instruct format with a loss mask, packed row-slot batches.

Input is JSON Lines in the common `messages` schema, one conversation a line:

  {"messages": [{"role": "system", "content": "..."},            (optional, first)
                {"role": "user", "content": "..."},
                {"role": "assistant", "content": "...", "thinking": "..."},   (thinking optional)
                ...]}                                              (alternating, ending with assistant)

A user message's content may also be a list of chunks (OpenAI / mistral-common
style), text and images, in order:

  {"role": "user", "content": [{"type": "image", "image": "<path, base64 or data URL>"},
                               {"type": "text", "text": "What colour is the circle?"}]}

(an image may also be given as {"type": "image_url", "image_url": {"url": ...}}
with a path, base64 or data URL; images are never downloaded). Images appear
only in user messages. They are decoded when the conversation is rendered, not
when it is read; one that cannot be decoded stops the job naming its record,
message and chunk.

Every record is checked when the data is built; a bad one is never skipped,
it stops the job with its file and line (other top-level keys, e.g. an "id",
are ignored; message fields are strict, so a typo like "reasoning" is caught).

Rendering must give the model exactly the ids it sees at inference, so with a
Mistral tokenizer file (Tekken `*.json`, or SentencePiece `*.model.vN`) the ids
come from mistral-common itself: the request is validated and normalised by
mistral-common and each message is encoded by its version's own per-message
encoder, which is also how the loss mask is known (mistral-common has no mask
API). Those ids equal `encode_chat_completion` in finetuning mode, for every
instruct version (v3 puts the system prompt into the last user message, v7+
between [SYSTEM_PROMPT] tokens, v13+ can think). The project's own
SentencePiece models (`spm_train`, which adds the six control tokens) use the
v7+/v13 layout, rebuilt here with the same text splitting and stripping:

  <s>[SYSTEM_PROMPT]sys[/SYSTEM_PROMPT][INST]user[/INST][THINK]thinking[/THINK]answer</s>[INST]...

The mask is 1 on what the model must produce (an assistant turn: its
[THINK]...[/THINK] block, answer and closing </s>) and 0 on what it is given
(<s>, the system prompt, user turns with their [INST]/[/INST]), and always 0 on
image tokens.

Images. A user turn's chunks are normalised as mistral-common does (adjacent
texts joined by a blank line, empty texts dropped, and a lone image after the
text moved in front of it: `force_img_first`), and each image becomes rows of
[IMG] tokens closed by [IMG_BREAK], the last by [IMG_END] (`images.image_tokens`).
With a Mistral tokenizer file mistral-common renders the images too, with the
file's image config (patch, merge, longest side) and its own resizing; the
project's own tokenizers (`spm_train` with image tokens) get the same layout
from `ImageSettings` (the data config's `image_*` fields), resized by
`images.preprocess_mistral` or `preprocess_hf`. `Rendered.images` holds the
pixels ([3, H, W] float32) in token order.

Length: a conversation longer than `seq_len` (+1, since inputs and targets are
shifted) keeps its leading exchanges and loses whole trailing (user,
assistant) exchanges until it fits; one whose first exchange does not fit is
dropped. Nothing is cut mid-turn. The counts are logged when the data is
built and kept in the iterator's `stats`.

Packing: conversations are packed whole, first-fit, into rows with segment
ids and per-conversation positions (`packing.pack_whole`), inside the same
row slots as pretraining (`pipeline.slot_iterator`): batches do not depend on
the process count, and a checkpointed state resumes the exact stream.

With `data.image_slots` > 0 each row also holds a buffer of that many image
patches (`vision.patchify` order, the images in the order of their [IMG] runs),
budgeted per row like the tokens: a conversation whose images need more patches
is cut to the exchanges that fit, or dropped, and counted, exactly like one
longer than `seq_len`. `vision.from_batch(batch)` turns them into the model's
`vision.Images`. With 0 (the default) batches are exactly the text-only ones.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from typing import Any, Callable, Iterator, Sequence

import grain
import ml_collections
import numpy as np

from ministral_jax.data import images as image_io
from ministral_jax.data import packing, pipeline, sources
from ministral_jax.data.tokenizers import Tokenizer
from ministral_jax.errors import UserError

ROLES = ("system", "user", "assistant")
FEATURES = packing.WHOLE_FEATURES
_MESSAGE_FIELDS = ("role", "content", "thinking")
IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
IMAGE_FEATURES = packing.IMAGE_FEATURES
_CHUNK_FIELDS = {"text": ("type", "text"), "image": ("type", "image"), "image_url": ("type", "image_url")}
_PREPROCESS = ("mistral", "hf")
# mistral-common's normaliser joins a user message's adjacent text chunks with this (v7-v13).
_CHUNK_JOIN = "\n\n"
# Mistral's own SentencePiece files carry their instruct version in the name; mistral-common renders them.
_VERSIONED_SPM = re.compile(r"\.model\.v\d+(m\d+)?$")
_DEFAULT_PACK_BINS = 8
_LAYOUT_FIX = ("use a tokenizer that defines it: data.tokenizer='spm_train' trains one with all six chat "
               "control tokens (and [IMG], [IMG_BREAK], [IMG_END] when data.image_slots > 0), or a Mistral "
               "tokenizer file of the model being fine-tuned")


# ----------------------------------------------------------------------------- conversations


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """An image chunk as the data gives it (a path, a base64 string or a data URL); decoded only to render."""

  source: str
  message: int  # 1-based message and chunk numbers, for errors
  chunk: int

  def name(self, where: str) -> str:
    return f"{where}: message {self.message}, chunk {self.chunk} (image)"


@dataclasses.dataclass(frozen=True)
class Message:
  """One turn as the data gives it; `thinking` exists only on assistant turns (v13+ renders it).

  `content` is always the message's text (a user message given as chunks: its text chunks, joined by a
  blank line); `chunks` is the content as given when it was a list (text strings and `ImageRef`s, in order).
  """

  role: str
  content: str
  thinking: str | None = None
  chunks: tuple[str | ImageRef, ...] | None = None

  @property
  def images(self) -> tuple[ImageRef, ...]:
    return tuple(c for c in self.chunks or () if isinstance(c, ImageRef))


@dataclasses.dataclass(frozen=True)
class Conversation:
  """A validated conversation: optional system message, then (user, assistant) exchanges.

  `where` ("file:line") lets a later failure (rendering, a missing control
  token) name the record that caused it.
  """

  messages: tuple[Message, ...]
  where: str = ""

  @property
  def exchanges(self) -> int:
    return sum(m.role == "assistant" for m in self.messages)

  @property
  def images(self) -> tuple[ImageRef, ...]:
    return tuple(image for m in self.messages for image in m.images)

  def head(self, exchanges: int) -> Conversation:
    """The system message (if any) and the first `exchanges` (user, assistant) pairs."""
    system = 1 if self.messages[0].role == "system" else 0
    return dataclasses.replace(self, messages=self.messages[: system + 2 * exchanges])


def _message_problem(number: int, message: Any) -> str | None:
  if not isinstance(message, dict):
    return f"message {number} is not a JSON object"
  unknown = sorted(set(message) - set(_MESSAGE_FIELDS))
  if unknown:
    return (f"message {number} has unknown field(s) {unknown}; a message has only 'role', 'content' and "
            "(assistant only) 'thinking'")
  role = message.get("role")
  if role not in ROLES:
    return f"message {number} has role {role!r}; roles are {', '.join(map(repr, ROLES))}"
  content = message.get("content")
  if isinstance(content, list):
    _, problem = _chunks(number, role, content)
    if problem:
      return problem
  elif not isinstance(content, str):
    return (f"message {number} ({role}) needs a string 'content' (or, for a user message, a list of text and "
            f"image chunks), got {type(content).__name__}")
  elif not content.strip():
    return f"message {number} ({role}) is empty"
  thinking = message.get("thinking")
  if thinking is not None and role != "assistant":
    return f"message {number} ({role}) has 'thinking'; only assistant messages may think"
  if thinking is not None and (not isinstance(thinking, str) or not thinking.strip()):
    return f"message {number} (assistant) has an empty or non-string 'thinking'; give text or omit the field"
  return None


def _image_source(number: int, k: int, chunk: dict) -> tuple[str | None, str | None]:
  """(source, problem) of an image chunk: a path, base64 or data URL string (never an http(s) URL)."""
  where = f"message {number} chunk {k}"
  if chunk["type"] == "image":
    source = chunk.get("image")
  else:
    url = chunk.get("image_url")
    if isinstance(url, dict):
      extra = sorted(set(url) - {"url", "detail"})
      if extra:
        return None, f"{where} (image_url) has unknown field(s) {extra}; give {{\"url\": ...}}"
      url = url.get("url")
    source = url
  if not isinstance(source, str) or not source.strip():
    return None, (f"{where} ({chunk['type']}) needs a non-empty string: an image file path, base64 data or a "
                  f"'data:image/...;base64,' URL, got {type(source).__name__}")
  if source.startswith(("http://", "https://")):
    return None, (f"{where} ({chunk['type']}) is a web URL; images are never downloaded: download it and give "
                  "its path, base64 data or a data URL")
  return source, None


def _chunks(number: int, role: str, content: list) -> tuple[tuple[str | ImageRef, ...], str | None]:
  """A content list's chunks (text strings and ImageRefs) and the first problem with them, if any."""
  if not content:
    return (), f"message {number} ({role}) has an empty content list"
  chunks: list[str | ImageRef] = []
  for k, chunk in enumerate(content, 1):
    kind = chunk.get("type") if isinstance(chunk, dict) else None
    if not isinstance(kind, str) or kind not in _CHUNK_FIELDS:
      what = f"has type {kind!r}" if isinstance(chunk, dict) else "is not a JSON object"
      return (), (f"message {number} chunk {k} {what}; a chunk is {{\"type\": \"text\", \"text\": ...}} or "
                  "{\"type\": \"image\", \"image\": <path, base64 or data URL>} (or OpenAI's \"image_url\")")
    unknown = sorted(set(chunk) - set(_CHUNK_FIELDS[kind]))
    if unknown:
      return (), f"message {number} chunk {k} ({kind}) has unknown field(s) {unknown}"
    if kind == "text":
      if not isinstance(chunk.get("text"), str):
        return (), f"message {number} chunk {k} (text) needs a string 'text', got {type(chunk.get('text')).__name__}"
      chunks.append(chunk["text"])
      continue
    if role != "user":
      return (), (f"message {number} ({role}) has an image (chunk {k}); images are only allowed in user "
                  "messages")
    source, problem = _image_source(number, k, chunk)
    if problem:
      return (), problem
    chunks.append(ImageRef(source, number, k))
  if role != "user":
    return (), (f"message {number} ({role}) needs a string 'content'; chunk lists (text and images) are for "
                "user messages")
  if not any(isinstance(c, ImageRef) or c.strip() for c in chunks):
    return (), f"message {number} ({role}) is empty"
  return tuple(chunks), None


def _text_of(chunks: Sequence[str | ImageRef]) -> str:
  return _CHUNK_JOIN.join(c for c in chunks if isinstance(c, str) and c)


def _order_problem(roles: list[str]) -> str | None:
  """Optional system first, then user/assistant alternating, ending with assistant."""
  if "assistant" not in roles:
    return "has no assistant turn, so nothing to train on"
  start = 1 if roles[0] == "system" else 0
  for i, role in enumerate(roles[start:], start):
    expected = "user" if (i - start) % 2 == 0 else "assistant"
    if role != expected:
      where = "only the first message may be a system message" if role == "system" else (
          "after the optional system message, turns alternate user, assistant, user, ...")
      return f"message {i + 1} is {role!r} where {expected!r} was expected: {where}"
  if roles[-1] != "assistant":
    return "ends with a user message; a conversation ends with the assistant's answer"
  return None


def _record_problem(record: Any) -> str | None:
  if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
    return 'is not a JSON object with a "messages" list'
  messages = record["messages"]
  if not messages:
    return "has an empty messages list"
  for number, message in enumerate(messages, 1):
    problem = _message_problem(number, message)
    if problem:
      return problem
  return _order_problem([m["role"] for m in messages])


def parse_conversation(record: Any, where: str) -> Conversation:
  """One decoded JSON record to a Conversation; a bad record raises a UserError naming `where`."""
  problem = _record_problem(record)
  if problem:
    raise UserError(f"{where}: the conversation {problem}")

  def message(number: int, m: dict) -> Message:
    if isinstance(m["content"], str):
      return Message(m["role"], m["content"], m.get("thinking"))
    chunks, _ = _chunks(number, m["role"], m["content"])
    return Message(m["role"], _text_of(chunks), m.get("thinking"), chunks)

  return Conversation(tuple(message(n, m) for n, m in enumerate(record["messages"], 1)), where)


def _keyed_conversations(paths: str) -> list[tuple[str, Conversation]]:
  """(hold-out key, conversation) over the files; keys follow `sources` (relative path and record index)."""
  return sources.keyed_jsonl(paths, parse_conversation, "conversation")


def read_conversations(paths: str) -> list[Conversation]:
  """Every conversation in the comma-separated files/globs, in file and line order, all validated.

  Any bad record (malformed JSON, no assistant turn, roles out of order, an
  empty message, an unknown role or message field) fails the whole read with
  one UserError listing file:line and the problem of each.
  """
  return [conversation for _, conversation in _keyed_conversations(paths)]


def split_conversations(data_cfg: ml_collections.ConfigDict, split: str) -> list[Conversation]:
  """The split's conversations: `eval_paths` if given, else the hash hold-out of `paths` (as `sources`)."""
  return sources.split_records(data_cfg, split, _keyed_conversations, "conversations")


def plain_text(conversation: Conversation) -> str:
  """The conversation's text, a paragraph per message (images left out): what a tokenizer is trained on."""
  parts = [p for m in conversation.messages for p in (m.thinking, m.content) if p]
  return "\n".join(parts)


# ----------------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class ImageSettings:
  """How conversations' images become pixels and patches: the data config's `image_*` fields.

  `slots` is the patch budget of a packed row (0 = text only). The geometry is
  the vision tower's; the project's own renderer resizes to it, and a Mistral
  tokenizer file's image config must agree with it.
  """

  slots: int = 0
  patch_size: int = image_io.PATCH_SIZE
  merge: int = image_io.SPATIAL_MERGE_SIZE
  max_size: int = image_io.MAX_IMAGE_SIZE
  preprocess: str = "mistral"

  def patches(self, pixels: np.ndarray) -> int:
    """Patches (buffer slots) one image's `[3, H, W]` pixels take."""
    return (pixels.shape[1] // self.patch_size) * (pixels.shape[2] // self.patch_size)


def image_settings(data_cfg: ml_collections.ConfigDict) -> ImageSettings:
  """The data config's image fields, checked (configs made before images existed read as text only)."""
  get = data_cfg.get
  settings = ImageSettings(get("image_slots", 0), get("image_patch_size", image_io.PATCH_SIZE),
                           get("image_merge", image_io.SPATIAL_MERGE_SIZE),
                           get("image_max_size", image_io.MAX_IMAGE_SIZE), get("image_preprocess", "mistral"))
  problems = []
  for field, value in (("image_patch_size", settings.patch_size), ("image_merge", settings.merge),
                       ("image_max_size", settings.max_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      problems.append(f"data.{field}={value!r}: a positive integer (the vision tower's; the trainer sets it "
                      "from the model config)")
  if isinstance(settings.slots, bool) or not isinstance(settings.slots, int) or settings.slots < 0:
    problems.append(f"data.image_slots={settings.slots!r}: 0 (text only) or the image patches a row may hold")
  elif not problems and settings.slots % settings.merge ** 2:
    problems.append(f"data.image_slots={settings.slots}: a multiple of image_merge**2={settings.merge ** 2} "
                    "(the projector merges that many patches into one [IMG] token)")
  if settings.preprocess not in _PREPROCESS:
    problems.append(f"data.image_preprocess={settings.preprocess!r}: one of {_PREPROCESS}")
  if problems:
    raise UserError("the data config's image settings have problems:\n  " + "\n  ".join(problems))
  return settings


@dataclasses.dataclass(frozen=True)
class Rendered:
  """A conversation's ids in the instruct format, with the loss mask and the end of each exchange.

  `turn_ends[k]` is the number of tokens through the end of exchange k (its
  assistant's closing </s>). In the v7+ layouts `tokens[:turn_ends[k]]` is
  exactly the rendering of the first k+1 exchanges; v1-v3 move the system
  prompt into the last user turn, so `truncate` re-renders instead of cutting.
  `images` are the pixels of the conversation's images in the order of their
  [IMG] runs, `turn_images[k]` how many of them lie within exchange k's end.
  """

  tokens: np.ndarray  # int32 [L]
  mask: np.ndarray  # int32 [L], 1 where the token is the model's to predict
  turn_ends: tuple[int, ...]
  images: tuple[np.ndarray, ...] = ()  # float32 [3, H, W] each, normalised
  turn_images: tuple[int, ...] = ()


class _Builder:
  """Accumulates (ids, mask value) runs and images; the one place the arrays are kept in step."""

  def __init__(self, start: Sequence[int]):
    self.tokens, self.mask, self.turn_ends = list(start), [0] * len(start), []
    self.images: list[np.ndarray] = []
    self.turn_images: list[int] = []

  def add(self, ids: Sequence[int], predicted: bool, images: Sequence[np.ndarray] = ()) -> None:
    self.tokens.extend(ids)
    self.mask.extend([int(predicted)] * len(ids))
    self.images.extend(np.asarray(image, np.float32) for image in images)
    if predicted:
      self.turn_ends.append(len(self.tokens))
      self.turn_images.append(len(self.images))

  def build(self, tokenizer: Tokenizer) -> Rendered:
    tokens, mask = np.asarray(self.tokens, np.int32), np.asarray(self.mask, np.int32)
    image_ids = [i for i in (tokenizer.special_tokens.get(name) for name in IMAGE_TOKENS) if i is not None]
    if image_ids:  # image tokens are given, never predicted, whoever marks the turn
      mask[np.isin(tokens, image_ids)] = 0
    return Rendered(tokens, mask, tuple(self.turn_ends), tuple(self.images), tuple(self.turn_images))


def uses_mistral_common(tokenizer: Tokenizer) -> bool:
  """Mistral's own files (Tekken, versioned SentencePiece) carry an instruct version mistral-common knows."""
  return tokenizer.kind == "tekken" or bool(_VERSIONED_SPM.search(tokenizer.path.name))


@functools.lru_cache(maxsize=8)
def _mistral_common(path: str):
  """mistral-common's tokenizer, validator and normaliser for a file, as `MistralTokenizer.from_file` pairs them."""
  from mistral_common.protocol.instruct.normalize import get_normalizer
  from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
  from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

  instruct = MistralTokenizer.from_file(path, mode=ValidationMode.finetuning).instruct_tokenizer
  version = instruct.tokenizer.version
  return (instruct, get_validator(version, mode=ValidationMode.finetuning),
          get_normalizer(version, instruct.tokenizer.model_settings_builder))


def _request(conversation: Conversation):
  """mistral-common's request; images decoded here (as RGB PIL images: `images.load_image` names a bad one)."""
  from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk, ThinkChunk
  from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
  from mistral_common.protocol.instruct.request import ChatCompletionRequest

  def chunk(c: str | ImageRef):
    if isinstance(c, str):
      return TextChunk(text=c)
    return ImageChunk(image=image_io.load_image(c.source, name=c.name(conversation.where)))

  def message(m: Message):
    if m.role == "system":
      return SystemMessage(content=m.content)
    if m.role == "user":
      return UserMessage(content=m.content if m.chunks is None else [chunk(c) for c in m.chunks])
    if m.thinking is None:
      return AssistantMessage(content=m.content)
    return AssistantMessage(content=[ThinkChunk(thinking=m.thinking, closed=True), TextChunk(text=m.content)])

  return ChatCompletionRequest(messages=[message(m) for m in conversation.messages])


def _check_thinking_supported(conversation: Conversation, tokenizer: Tokenizer, version) -> None:
  from mistral_common.tokens.tokenizers.base import TokenizerVersion

  if not any(m.thinking for m in conversation.messages):
    return
  if version < TokenizerVersion.v13:
    raise UserError(f"{conversation.where}: assistant 'thinking' needs a v13+ instruct tokenizer ([THINK] and "
                    f"[/THINK]), but {tokenizer.path} is {version.value}. Fix: point data.tokenizer at a v13+ "
                    "Tekken file (Ministral 3's tekken.json) or remove 'thinking' from the data.")
  for name in ("[THINK]", "[/THINK]"):
    _control_id(tokenizer, name, "assistant thinking", conversation.where)


def _check_image_config(conversation: Conversation, tokenizer: Tokenizer, instruct,
                        settings: ImageSettings | None) -> None:
  """The file must have an image config, and (when the pipeline gives the model's geometry) agree with it."""
  if not conversation.images:
    return
  encoder = instruct.image_encoder
  if encoder is None:
    raise UserError(
        f"{conversation.where}: the conversation has images but tokenizer file {tokenizer.path} has no image "
        "config (a Tekken file's \"image\" section: image_patch_size, max_image_size, spatial_merge_size; a "
        "SentencePiece file's mM suffix, e.g. .model.v7m1), so mistral-common cannot render them. Fix: use the "
        "tokenizer file that ships with the vision checkpoint being fine-tuned (Ministral 3's tekken.json), or "
        "data.tokenizer='spm_train' with data.image_slots > 0.")
  config = encoder.image_config
  if settings is not None and (config.image_patch_size, config.spatial_merge_size) != (settings.patch_size,
                                                                                          settings.merge):
    raise UserError(
        f"{conversation.where}: tokenizer file {tokenizer.path} cuts images into {config.image_patch_size}-pixel "
        f"patches merged {config.spatial_merge_size}x{config.spatial_merge_size}, but the vision tower takes "
        f"{settings.patch_size}-pixel patches merged {settings.merge}x{settings.merge} (data.image_patch_size, "
        "data.image_merge). Fix: use the tokenizer file of the checkpoint being fine-tuned.")


def _render_mistral_common(conversation: Conversation, tokenizer: Tokenizer,
                           settings: ImageSettings | None = None) -> Rendered:
  """mistral-common's `encode_instruct`, message by message, so each message's ids (and images) are known."""
  from mistral_common.exceptions import MistralCommonException
  from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage

  instruct, validator, normalizer = _mistral_common(str(tokenizer.path))
  version = instruct.tokenizer.version
  _check_thinking_supported(conversation, tokenizer, version)
  _check_image_config(conversation, tokenizer, instruct, settings)
  try:
    request = normalizer.from_chat_completion_request(validator.validate_request(_request(conversation)))
    first_user, last_user = instruct.find_first_last_user(request)
    out = _Builder(instruct.start())
    for i, msg in enumerate(request.messages):
      if isinstance(msg, UserMessage):
        ids, pixels, _ = instruct.encode_user_message(
            msg, request.available_tools, i == last_user, i == first_user, system_prompt=request.system_prompt,
            force_img_first=True, settings=request.settings)
        out.add(ids, predicted=False, images=pixels)
      elif isinstance(msg, SystemMessage):
        out.add(instruct.encode_system_message(msg)[0], predicted=False)
      elif isinstance(msg, AssistantMessage):
        out.add(instruct.encode_assistant_message(msg, is_before_last_user_message=i < last_user), predicted=True)
      else:
        raise UserError(f"{conversation.where}: mistral-common produced an unexpected {type(msg).__name__}")
  except (MistralCommonException, AssertionError, NotImplementedError, ValueError) as exc:
    if isinstance(exc, UserError):
      raise
    raise UserError(f"{conversation.where}: mistral-common cannot render this conversation with {tokenizer.path} "
                    f"(instruct {version.value}): {type(exc).__name__}: {exc}") from exc
  return out.build(tokenizer)


def _control_id(tokenizer: Tokenizer, name: str, why: str, where: str) -> int:
  try:
    return tokenizer.special_id(name)
  except UserError as exc:
    raise UserError(f"{where}: Mistral's instruct format needs the control token {name!r} for {why}, but {exc}. "
                    f"Fix: {_LAYOUT_FIX}.") from None


def _user_chunks(m: Message) -> list[str | ImageRef]:
  """A user message's content as mistral-common encodes it: its normaliser joins adjacent text chunks with a
  blank line and drops empty ones, then `force_img_first` moves a lone image that follows only text in front."""
  if m.chunks is None:
    return [m.content]
  out: list[str | ImageRef] = []
  for c in m.chunks:
    if isinstance(c, str):
      if not c:
        continue
      if out and isinstance(out[-1], str):
        out[-1] += _CHUNK_JOIN + c
        continue
    out.append(c)
  if len(out) >= 2 and isinstance(out[-1], ImageRef) and all(isinstance(c, str) for c in out[:-1]):
    out = [out[-1], *out[:-1]]
  return out


def _image(ref: ImageRef, where: str, settings: ImageSettings) -> image_io.ProcessedImage:
  preprocess = image_io.preprocess_hf if settings.preprocess == "hf" else image_io.preprocess_mistral
  return preprocess(ref.source, settings.max_size, settings.patch_size, settings.merge, name=ref.name(where))


def _render_own(conversation: Conversation, tokenizer: Tokenizer, settings: ImageSettings | None = None) -> Rendered:
  """The v7+/v13 layout from the tokenizer's control tokens, splitting and stripping text as mistral-common does:
  each text is encoded on its own, and an answer without thinking loses its trailing spaces. Images are
  resized to `settings`' geometry (default: Ministral 3's)."""
  where = conversation.where
  control = lambda name, why: _control_id(tokenizer, name, why, where)
  text = tokenizer.encode
  settings = settings or ImageSettings()
  out = _Builder([tokenizer.bos_id])
  for m in conversation.messages:
    if m.role == "system":
      out.add([control("[SYSTEM_PROMPT]", "a system prompt"), *text(m.content),
               control("[/SYSTEM_PROMPT]", "a system prompt")], predicted=False)
    elif m.role == "user":
      ids, pixels = [control("[INST]", "user turns")], []
      for c in _user_chunks(m):
        if isinstance(c, str):
          ids.extend(text(c))
          continue
        image_ids = [control(name, "images") for name in IMAGE_TOKENS]
        processed = _image(c, where, settings)
        ids.extend(image_io.image_tokens(*processed.grid, *image_ids))
        pixels.append(processed.pixels)
      out.add([*ids, control("[/INST]", "user turns")], predicted=False, images=pixels)
    elif m.thinking is None:
      out.add([*text(m.content.rstrip(" ")), tokenizer.eos_id], predicted=True)
    else:
      think = [control("[THINK]", "assistant thinking"), *text(m.thinking), control("[/THINK]", "assistant thinking")]
      out.add([*think, *text(m.content), tokenizer.eos_id], predicted=True)
  return out.build(tokenizer)


def render(conversation: Conversation, tokenizer: Tokenizer, settings: ImageSettings | None = None) -> Rendered:
  """The conversation in Mistral's instruct format (see the module docstring), with its loss mask and images.

  `settings` is the vision tower's image geometry (the pipeline passes the data config's): the own renderer
  resizes to it, and a Mistral tokenizer file's image config is checked against it. Without it, the own
  renderer uses Ministral 3's geometry and a Mistral file renders with its own config unchecked.
  """
  if uses_mistral_common(tokenizer):
    return _render_mistral_common(conversation, tokenizer, settings)
  return _render_own(conversation, tokenizer, settings)


def prompt_before_answer(messages: Sequence[dict], tokenizer: Tokenizer, settings: ImageSettings | None = None,
                         where: str = "prompt") -> tuple[list[int], list[np.ndarray]]:
  """The tokens a model sees before it answers `messages` (ending with a user turn), rendered exactly as
  training renders them, and the images among them (evals and samplers ask with this)."""
  conversation = parse_conversation({"messages": [*messages, {"role": "assistant", "content": "."}]}, where)
  rendered = render(conversation, tokenizer, settings)
  mask = np.asarray(rendered.mask, np.int8)
  first = int(np.flatnonzero(np.diff(mask, prepend=0) == 1)[-1])  # the first token of the last answer
  return rendered.tokens[:first].tolist(), list(rendered.images)


def _patches_through(rendered: Rendered, settings: ImageSettings) -> list[int]:
  """Image patches within the end of each exchange."""
  total = np.cumsum([0, *(settings.patches(p) for p in rendered.images)])
  return [int(total[n]) for n in rendered.turn_images]


def _fits(rendered: Rendered, max_tokens: int, max_patches: int | None, settings: ImageSettings) -> bool:
  return len(rendered.tokens) <= max_tokens and (
      max_patches is None or sum(settings.patches(p) for p in rendered.images) <= max_patches)


def truncate(conversation: Conversation, tokenizer: Tokenizer, max_tokens: int, max_patches: int | None = None,
             settings: ImageSettings | None = None) -> tuple[Rendered | None, int]:
  """The rendering of the longest leading run of exchanges that fits in `max_tokens` tokens and (if given)
  `max_patches` image patches (None if not even the first exchange fits), and how many trailing exchanges
  were dropped; the images of dropped exchanges go with them."""
  rendered, lost, _ = _truncate(conversation, tokenizer, max_tokens, max_patches, settings or ImageSettings())
  return rendered, lost


def _truncate(conversation: Conversation, tokenizer: Tokenizer, max_tokens: int, max_patches: int | None,
              settings: ImageSettings) -> tuple[Rendered | None, int, int]:
  """`truncate`, and the patches of the whole conversation's images."""
  full = render(conversation, tokenizer, settings)
  patches = _patches_through(full, settings)
  all_patches = sum(settings.patches(p) for p in full.images)
  if _fits(full, max_tokens, max_patches, settings):
    return full, 0, all_patches
  fitting = [end <= max_tokens and (max_patches is None or n <= max_patches)
             for end, n in zip(full.turn_ends, patches)]
  keep = min(sum(fitting), conversation.exchanges - 1)
  while keep > 0:  # v7+ fits at once; v1-v3 move the system prompt, so their length is re-measured
    rendered = render(conversation.head(keep), tokenizer, settings)
    if _fits(rendered, max_tokens, max_patches, settings):
      return rendered, conversation.exchanges - keep, all_patches
    keep -= 1
  return None, conversation.exchanges, all_patches


# ----------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class _Prepared:
  conversations: tuple[Conversation, ...]  # each already cut to the exchanges (and image patches) that fit
  stats: dict[str, int]
  images: ImageSettings = ImageSettings()


_PREPARED: dict[tuple, _Prepared] = {}
_PREPARED_KEEP = 4


def _file_stamps(patterns: str) -> tuple:
  return tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in sources.expand_paths(patterns))


def _prepare(data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str) -> _Prepared:
  """Read, validate and fit a split (train: its first max_documents); counted and logged once per content.

  Cached by file contents and settings: the trainer asks for the eval split
  at every eval, and without eval_paths that split means reading all of paths.
  """
  if data_cfg.source != "chat":
    raise UserError(f"chat data needs data.source='chat' (got {data_cfg.source!r}) and data.paths naming JSONL "
                    "files of {\"messages\": [...]}")
  limit = data_cfg.max_documents if split == "train" else 0
  read = data_cfg.eval_paths if split == "eval" and data_cfg.eval_paths else data_cfg.paths
  settings = image_settings(data_cfg)
  key = (split, data_cfg.paths, data_cfg.eval_paths, _file_stamps(read), data_cfg.seq_len, limit,
         str(tokenizer.path), tokenizer.vocab_size, settings)
  if key not in _PREPARED:
    conversations = split_conversations(data_cfg, split)
    if limit > 0:
      conversations = conversations[:limit]
    while len(_PREPARED) >= _PREPARED_KEEP:
      _PREPARED.pop(next(iter(_PREPARED)))
    _PREPARED[key] = _fit_all(conversations, tokenizer, data_cfg.seq_len, split, settings)
  return _PREPARED[key]


def _fit_all(conversations: list[Conversation], tokenizer: Tokenizer, seq_len: int, split: str,
             settings: ImageSettings = ImageSettings()) -> _Prepared:
  if not settings.slots:
    with_images = next((c for c in conversations if c.images), None)
    if with_images is not None:
      raise UserError(f"{with_images.where}: the conversation has images, but data.image_slots=0 (text only). Fix: "
                      "set data.image_slots to the image patches a packed row may hold (a multiple of "
                      f"image_merge**2={settings.merge ** 2}) and train a vision model, or remove the images")
  max_patches = settings.slots or None
  kept: list[Conversation] = []
  truncated = dropped = dropped_exchanges = over_budget = 0
  for conversation in conversations:
    # inputs and targets are shifted by one
    rendered, lost, patches = _truncate(conversation, tokenizer, seq_len + 1, max_patches, settings)
    dropped_exchanges += lost
    over_budget += bool(max_patches) and patches > max_patches
    if rendered is None:
      dropped += 1
    else:
      truncated += lost > 0
      kept.append(conversation.head(conversation.exchanges - lost) if lost else conversation)
  stats = {"conversations": len(conversations), "kept": len(kept), "truncated": truncated,
           "dropped": dropped, "dropped_exchanges": dropped_exchanges}
  budget = ""
  if settings.slots:
    stats.update(images=sum(len(c.images) for c in kept), over_image_budget=over_budget)
    budget = f" and data.image_slots={settings.slots} image patches ({over_budget} for their images)"
  log = logging.warning if truncated or dropped else logging.info
  log("Chat %s split: %d conversations; %d truncated to the exchanges that fit in seq_len=%d%s, %d dropped (not "
      "even the first exchange fits), %d exchanges dropped in all.", split, len(conversations), truncated,
      seq_len, budget, dropped, dropped_exchanges)
  if not kept:
    raise UserError(f"no conversation of the chat {split} split fits in data.seq_len={seq_len} tokens"
                    f"{' and data.image_slots=%d image patches' % settings.slots if settings.slots else ''}, not "
                    f"even its first exchange; raise data.seq_len{' or data.image_slots' if settings.slots else ''}")
  return _Prepared(tuple(kept), stats, settings)


def _patch_features(pixels: Sequence[np.ndarray], settings: ImageSettings) -> packing.Batch:
  """An example's images as `packing.PATCH_FEATURES`: patches in merge order, image after image."""
  from ministral_jax.model import vision  # jax: imported only for image data

  p = settings.patch_size
  parts = [vision.patchify(np.asarray(x, np.float32), p, settings.merge) for x in pixels]
  if not parts:
    return {"patches": np.zeros((0, p, p, 3), np.float32), "patch_rows": np.zeros((0,), np.int32),
            "patch_cols": np.zeros((0,), np.int32), "patch_image": np.zeros((0,), np.int32)}
  return {"patches": np.concatenate([x[0] for x in parts]).astype(np.float32, copy=False),
          "patch_rows": np.concatenate([x[1] for x in parts]).astype(np.int32, copy=False),
          "patch_cols": np.concatenate([x[2] for x in parts]).astype(np.int32, copy=False),
          "patch_image": np.concatenate([np.full(len(x[0]), k, np.int32) for k, x in enumerate(parts)])}


def _example_fn(tokenizer: Tokenizer, settings: ImageSettings = ImageSettings()
                ) -> Callable[[Conversation], packing.Batch]:
  def example(conversation: Conversation) -> packing.Batch:
    rendered = render(conversation, tokenizer, settings)
    out = {"inputs": rendered.tokens[:-1], "targets": rendered.tokens[1:], "loss_mask": rendered.mask[1:]}
    if settings.slots:
      out.update(_patch_features(rendered.images, settings))
    return out

  return example


def _pack_bins(data_cfg: ml_collections.ConfigDict) -> int:
  return int(data_cfg.get("chat_pack_bins", _DEFAULT_PACK_BINS))


def chat_iterator(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    global_batch: int,
    seed: int,
    rows: tuple[int, int] | None = None,
) -> pipeline.DataIterator:
  """This process's rows `[start, stop)` of each packed global batch of conversations.

  Each batch is a dict of int32 [stop - start, seq_len] arrays, `FEATURES`:
  inputs, targets, segment_ids (1, 2, ... per conversation in a row, 0 on
  padding), positions (restarting per conversation) and loss_mask (the
  render mask on the targets; 0 on padding). With data.image_slots > 0 also
  `IMAGE_FEATURES`: patches float32 [rows, image_slots, p, p, 3], patch_rows,
  patch_cols and patch_images (image id in the row, -1 on padding) int32
  [rows, image_slots]; `vision.from_batch(batch)` gives them as `vision.Images`.
  Same row slots, shuffling, epochs, handoff and checkpoint state as
  `pipeline.train_iterator`; `.stats` holds the truncation counts of the
  training split.
  """
  prepared = _prepare(data_cfg, tokenizer, "train")
  settings = prepared.images
  example, bins = _example_fn(tokenizer, settings), _pack_bins(data_cfg)

  def pack_slot(share: grain.MapDataset) -> grain.IterDataset:
    return packing.pack_whole(share, example, data_cfg.seq_len, bins, pipeline.SLOT_READ_OPTIONS, settings.slots)

  identity = {"packing": f"whole_first_fit:{bins}"}
  if settings.slots:  # text-only states stay what they were
    identity["images"] = (f"slots={settings.slots},patch={settings.patch_size},merge={settings.merge},"
                          f"max={settings.max_size},preprocess={settings.preprocess}")
  docs = grain.MapDataset.source(list(prepared.conversations))
  return pipeline.slot_iterator(data_cfg, docs, tokenizer, global_batch, seed, rows, pack_slot=pack_slot,
                                identity=identity, stats=prepared.stats)


def chat_eval_batches(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    batch_size: int,
    max_batches: int = 0,
    rows: tuple[int, int] | None = None,
) -> Iterator[packing.Batch]:
  """One deterministic, unshuffled pass over the chat eval split in global batches of `batch_size` rows (this
  process's `rows` of each), with the features of `chat_iterator`; the last batch is padded with empty rows
  (image id -1 in their patch buffers)."""
  if batch_size < 1:
    raise UserError(f"batch_size must be positive, got {batch_size}")
  prepared = _prepare(data_cfg, tokenizer, "eval")
  settings = prepared.images
  packed = packing.pack_whole(grain.MapDataset.source(list(prepared.conversations)),
                              _example_fn(tokenizer, settings), data_cfg.seq_len, _pack_bins(data_cfg),
                              pipeline.READ_OPTIONS, settings.slots)
  return pipeline.eval_stream(packed.batch(batch_size), batch_size, max_batches, rows)
