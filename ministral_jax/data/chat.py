"""Chat data for SFT: conversations, Mistral's instruct format with a loss mask, packed row-slot batches.

Input is JSON Lines in the common `messages` schema, one conversation a line:

  {"messages": [{"role": "system", "content": "..."},            (optional, first)
                {"role": "user", "content": "..."},
                {"role": "assistant", "content": "...", "thinking": "..."},   (thinking optional)
                ...]}                                              (alternating, ending with assistant)

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
(<s>, the system prompt, user turns with their [INST]/[/INST]).

Length: a conversation longer than `seq_len` (+1, since inputs and targets are
shifted) keeps its leading exchanges and loses whole trailing (user,
assistant) exchanges until it fits; one whose first exchange does not fit is
dropped. Nothing is cut mid-turn. The counts are logged when the data is
built and kept in the iterator's `stats`.

Packing: conversations are packed whole, first-fit, into rows with segment
ids and per-conversation positions (`packing.pack_whole`), inside the same
row slots as pretraining (`pipeline.slot_iterator`): batches do not depend on
the process count, and a checkpointed state resumes the exact stream.
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

from ministral_jax.data import packing, pipeline, sources
from ministral_jax.data.tokenizers import Tokenizer
from ministral_jax.errors import UserError

ROLES = ("system", "user", "assistant")
FEATURES = packing.WHOLE_FEATURES
_MESSAGE_FIELDS = ("role", "content", "thinking")
# Mistral's own SentencePiece files carry their instruct version in the name; mistral-common renders them.
_VERSIONED_SPM = re.compile(r"\.model\.v\d+(m\d+)?$")
_DEFAULT_PACK_BINS = 8
_LAYOUT_FIX = ("use a tokenizer that defines it: data.tokenizer='spm_train' trains one with all six chat "
               "control tokens, or a Mistral tokenizer file of the model being fine-tuned")


# ----------------------------------------------------------------------------- conversations


@dataclasses.dataclass(frozen=True)
class Message:
  """One turn as the data gives it; `thinking` exists only on assistant turns (v13+ renders it)."""

  role: str
  content: str
  thinking: str | None = None


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
  if not isinstance(content, str):
    return f"message {number} ({role}) needs a string 'content', got {type(content).__name__}"
  if not content.strip():
    return f"message {number} ({role}) is empty"
  thinking = message.get("thinking")
  if thinking is not None and role != "assistant":
    return f"message {number} ({role}) has 'thinking'; only assistant messages may think"
  if thinking is not None and (not isinstance(thinking, str) or not thinking.strip()):
    return f"message {number} (assistant) has an empty or non-string 'thinking'; give text or omit the field"
  return None


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
  return Conversation(tuple(Message(m["role"], m["content"], m.get("thinking")) for m in record["messages"]),
                      where)


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
  """The conversation's text, a paragraph per message: what a tokenizer is trained on."""
  parts = [p for m in conversation.messages for p in (m.thinking, m.content) if p]
  return "\n".join(parts)


# ----------------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class Rendered:
  """A conversation's ids in the instruct format, with the loss mask and the end of each exchange.

  `turn_ends[k]` is the number of tokens through the end of exchange k (its
  assistant's closing </s>). In the v7+ layouts `tokens[:turn_ends[k]]` is
  exactly the rendering of the first k+1 exchanges; v1-v3 move the system
  prompt into the last user turn, so `truncate` re-renders instead of cutting.
  """

  tokens: np.ndarray  # int32 [L]
  mask: np.ndarray  # int32 [L], 1 where the token is the model's to predict
  turn_ends: tuple[int, ...]


class _Builder:
  """Accumulates (ids, mask value) runs; the one place the three arrays are kept in step."""

  def __init__(self, start: Sequence[int]):
    self.tokens, self.mask, self.turn_ends = list(start), [0] * len(start), []

  def add(self, ids: Sequence[int], predicted: bool) -> None:
    self.tokens.extend(ids)
    self.mask.extend([int(predicted)] * len(ids))
    if predicted:
      self.turn_ends.append(len(self.tokens))

  def build(self) -> Rendered:
    return Rendered(np.asarray(self.tokens, np.int32), np.asarray(self.mask, np.int32), tuple(self.turn_ends))


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
  from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
  from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
  from mistral_common.protocol.instruct.request import ChatCompletionRequest

  def message(m: Message):
    if m.role == "system":
      return SystemMessage(content=m.content)
    if m.role == "user":
      return UserMessage(content=m.content)
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


def _render_mistral_common(conversation: Conversation, tokenizer: Tokenizer) -> Rendered:
  """mistral-common's `encode_instruct`, message by message, so each message's ids are known."""
  from mistral_common.exceptions import MistralCommonException
  from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage

  instruct, validator, normalizer = _mistral_common(str(tokenizer.path))
  version = instruct.tokenizer.version
  _check_thinking_supported(conversation, tokenizer, version)
  try:
    request = normalizer.from_chat_completion_request(validator.validate_request(_request(conversation)))
    first_user, last_user = instruct.find_first_last_user(request)
    out = _Builder(instruct.start())
    for i, msg in enumerate(request.messages):
      if isinstance(msg, UserMessage):
        ids, _, _ = instruct.encode_user_message(msg, request.available_tools, i == last_user, i == first_user,
                                                 system_prompt=request.system_prompt, force_img_first=True,
                                                 settings=request.settings)
        out.add(ids, predicted=False)
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
  return out.build()


def _control_id(tokenizer: Tokenizer, name: str, why: str, where: str) -> int:
  try:
    return tokenizer.special_id(name)
  except UserError as exc:
    raise UserError(f"{where}: Mistral's instruct format needs the control token {name!r} for {why}, but {exc}. "
                    f"Fix: {_LAYOUT_FIX}.") from None


def _render_own(conversation: Conversation, tokenizer: Tokenizer) -> Rendered:
  """The v7+/v13 layout from the tokenizer's control tokens, splitting and stripping text as mistral-common does:
  each text is encoded on its own, and an answer without thinking loses its trailing spaces."""
  where = conversation.where
  control = lambda name, why: _control_id(tokenizer, name, why, where)
  text = tokenizer.encode
  out = _Builder([tokenizer.bos_id])
  for m in conversation.messages:
    if m.role == "system":
      out.add([control("[SYSTEM_PROMPT]", "a system prompt"), *text(m.content),
               control("[/SYSTEM_PROMPT]", "a system prompt")], predicted=False)
    elif m.role == "user":
      out.add([control("[INST]", "user turns"), *text(m.content), control("[/INST]", "user turns")],
              predicted=False)
    elif m.thinking is None:
      out.add([*text(m.content.rstrip(" ")), tokenizer.eos_id], predicted=True)
    else:
      think = [control("[THINK]", "assistant thinking"), *text(m.thinking), control("[/THINK]", "assistant thinking")]
      out.add([*think, *text(m.content), tokenizer.eos_id], predicted=True)
  return out.build()


def render(conversation: Conversation, tokenizer: Tokenizer) -> Rendered:
  """The conversation in Mistral's instruct format (see the module docstring), with its loss mask."""
  if uses_mistral_common(tokenizer):
    return _render_mistral_common(conversation, tokenizer)
  return _render_own(conversation, tokenizer)


def truncate(conversation: Conversation, tokenizer: Tokenizer, max_tokens: int
             ) -> tuple[Rendered | None, int]:
  """The rendering of the longest leading run of exchanges that fits in `max_tokens` tokens (None if not even
  the first exchange fits), and how many trailing exchanges were dropped."""
  full = render(conversation, tokenizer)
  if len(full.tokens) <= max_tokens:
    return full, 0
  keep = min(sum(end <= max_tokens for end in full.turn_ends), conversation.exchanges - 1)
  while keep > 0:  # v7+ fits at once; v1-v3 move the system prompt, so their length is re-measured
    rendered = render(conversation.head(keep), tokenizer)
    if len(rendered.tokens) <= max_tokens:
      return rendered, conversation.exchanges - keep
    keep -= 1
  return None, conversation.exchanges


# ----------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class _Prepared:
  conversations: tuple[Conversation, ...]  # each already cut to the exchanges that fit
  stats: dict[str, int]


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
  key = (split, data_cfg.paths, data_cfg.eval_paths, _file_stamps(read), data_cfg.seq_len, limit,
         str(tokenizer.path), tokenizer.vocab_size)
  if key not in _PREPARED:
    conversations = split_conversations(data_cfg, split)
    if limit > 0:
      conversations = conversations[:limit]
    while len(_PREPARED) >= _PREPARED_KEEP:
      _PREPARED.pop(next(iter(_PREPARED)))
    _PREPARED[key] = _fit_all(conversations, tokenizer, data_cfg.seq_len, split)
  return _PREPARED[key]


def _fit_all(conversations: list[Conversation], tokenizer: Tokenizer, seq_len: int, split: str) -> _Prepared:
  kept: list[Conversation] = []
  truncated = dropped = dropped_exchanges = 0
  for conversation in conversations:
    rendered, lost = truncate(conversation, tokenizer, seq_len + 1)  # inputs and targets are shifted by one
    dropped_exchanges += lost
    if rendered is None:
      dropped += 1
    else:
      truncated += lost > 0
      kept.append(conversation.head(conversation.exchanges - lost) if lost else conversation)
  stats = {"conversations": len(conversations), "kept": len(kept), "truncated": truncated,
           "dropped": dropped, "dropped_exchanges": dropped_exchanges}
  log = logging.warning if truncated or dropped else logging.info
  log("Chat %s split: %d conversations; %d truncated to the exchanges that fit in seq_len=%d, %d dropped (not "
      "even the first exchange fits), %d exchanges dropped in all.", split, len(conversations), truncated,
      seq_len, dropped, dropped_exchanges)
  if not kept:
    raise UserError(f"no conversation of the chat {split} split fits in data.seq_len={seq_len} tokens, not even "
                    "its first exchange; raise data.seq_len")
  return _Prepared(tuple(kept), stats)


def _example_fn(tokenizer: Tokenizer) -> Callable[[Conversation], packing.Batch]:
  def example(conversation: Conversation) -> packing.Batch:
    rendered = render(conversation, tokenizer)
    return {"inputs": rendered.tokens[:-1], "targets": rendered.tokens[1:], "loss_mask": rendered.mask[1:]}

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
  render mask on the targets; 0 on padding). Same row slots, shuffling,
  epochs, handoff and checkpoint state as `pipeline.train_iterator`; `.stats`
  holds the truncation counts of the training split.
  """
  prepared = _prepare(data_cfg, tokenizer, "train")
  example, bins = _example_fn(tokenizer), _pack_bins(data_cfg)

  def pack_slot(share: grain.MapDataset) -> grain.IterDataset:
    return packing.pack_whole(share, example, data_cfg.seq_len, bins, pipeline.SLOT_READ_OPTIONS)

  docs = grain.MapDataset.source(list(prepared.conversations))
  return pipeline.slot_iterator(data_cfg, docs, tokenizer, global_batch, seed, rows, pack_slot=pack_slot,
                                identity={"packing": f"whole_first_fit:{bins}"}, stats=prepared.stats)


def chat_eval_batches(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    batch_size: int,
    max_batches: int = 0,
    rows: tuple[int, int] | None = None,
) -> Iterator[packing.Batch]:
  """One deterministic, unshuffled pass over the chat eval split in global batches of `batch_size` rows (this
  process's `rows` of each), with the features of `chat_iterator`; the last batch is padded with empty rows."""
  if batch_size < 1:
    raise UserError(f"batch_size must be positive, got {batch_size}")
  prepared = _prepare(data_cfg, tokenizer, "eval")
  packed = packing.pack_whole(grain.MapDataset.source(list(prepared.conversations)), _example_fn(tokenizer),
                              data_cfg.seq_len, _pack_bins(data_cfg), pipeline.READ_OPTIONS)
  return pipeline.eval_stream(packed.batch(batch_size), batch_size, max_batches, rows)
