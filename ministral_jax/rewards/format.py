"""The shape of a reasoning response, read from decoded text, and a detector for responses stuck in a loop.

A reasoning model answers `[THINK] chain of thought [/THINK] answer` (DESIGN
§2.5). Rewards need three things from that text: whether it has that shape
(a format reward, and a gate before any correctness reward), the final
\\boxed{} answer (what the verifier grades), and the answer with the thinking
removed (what ODPO's reward model scores, so that it judges the answer and
not the scratch work).

The text is a response decoded with its control tokens rendered by name
(`tokenizer.decode(ids, keep_special=True)`); decoding without them would
erase the very markers this module checks. A trailing end-of-sequence or pad
token is ignored.

`is_looping` works on token ids instead, because a loop is a property of
the sampled sequence and must be caught while or right after sampling,
before anything is decoded.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ministral_jax.errors import UserError

THINK, END_THINK = "[THINK]", "[/THINK]"
_TRAILING = ("</s>", "<pad>")  # end of sequence / padding, as `decode(keep_special=True)` renders them
# A response never holds these: the model began another turn. ("<s>" is left out: it is also an HTML tag.)
_FOREIGN = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")


@dataclasses.dataclass(frozen=True)
class FormatResult:
  ok: bool
  reason: str  # "ok", or what is wrong, for logs and per-reason counts


def extract_boxed(text: str) -> str | None:
  """The content of the last \\boxed{...} (nested and escaped braces handled), or None when there is none or
  it is never closed (a truncated answer is no answer)."""
  start = text.rfind("\\boxed")
  if start < 0:
    return None
  i = start + len("\\boxed")
  while i < len(text) and text[i] == " ":
    i += 1
  if i >= len(text) or text[i] != "{":
    return None
  depth, j = 0, i
  while j < len(text):
    ch = text[j]
    if ch == "\\":
      j += 2  # \{ and \} are literal braces, not grouping
      continue
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
      if depth == 0:
        return text[i + 1:j]
    j += 1
  return None


def _drop_trailing(text: str) -> str:
  text = text.rstrip()
  while True:
    for name in _TRAILING:
      if text.endswith(name):
        text = text[:-len(name)].rstrip()
        break
    else:
      return text


def check_reasoning(text: str) -> FormatResult:
  """Exactly one [THINK]...[/THINK] block, at the start and non-empty, then a non-empty answer holding a
  complete, non-empty \\boxed{}."""
  body = _drop_trailing(text).lstrip()
  for name in _FOREIGN:
    if name in body:
      return FormatResult(False, f"control token {name} inside the response")
  if not body.startswith(THINK):
    return FormatResult(False, f"does not start with {THINK}")
  if body.count(THINK) > 1:
    return FormatResult(False, f"more than one {THINK}")
  ends = body.count(END_THINK)
  if ends == 0:
    return FormatResult(False, f"no {END_THINK}: the thinking never ended")
  if ends > 1:
    return FormatResult(False, f"more than one {END_THINK}")
  thinking, answer = body[len(THINK):].split(END_THINK)
  if not thinking.strip():
    return FormatResult(False, "empty thinking")
  if not answer.strip():
    return FormatResult(False, f"empty answer after {END_THINK}")
  boxed = extract_boxed(answer)
  if boxed is None:
    return FormatResult(False, "no complete \\boxed{} in the answer")
  if not boxed.strip():
    return FormatResult(False, "empty \\boxed{} in the answer")
  return FormatResult(True, "ok")


def strip_thinking(text: str) -> str:
  """The answer alone: what follows the last [/THINK]; "" when thinking began and never ended (there is no
  answer yet); the whole text when there is no thinking at all (an instruct response)."""
  if END_THINK in text:
    return _drop_trailing(text.rsplit(END_THINK, 1)[1]).strip()
  if THINK in text:
    return ""
  return _drop_trailing(text).strip()


def extract_answer(text: str) -> str | None:
  """The last \\boxed{} of the answer part (never of the thinking), or None."""
  return extract_boxed(strip_thinking(text))


def is_looping(token_ids: Sequence[int], max_period: int = 64, min_repeats: int = 4,
               min_tokens: int = 32) -> bool:
  """Whether the sequence ends in a loop.

  The rule: for some period p in 1..max_period, the last L = max(min_repeats * p, min_tokens) tokens are
  p-periodic (each equals the one p positions later), i.e. the tail is one block of p tokens repeated at
  least min_repeats times and covering at least min_tokens tokens. With the defaults a single token
  repeated 32 times, a 3-token phrase repeated 11 times, or a 50-token sentence repeated 4 times (200
  tokens) is a loop; prose that returns to a phrase now and then, or repeats a short one two or three
  times, is not. A long run of one digit or of a separator ("0000...", "-----") counts as a loop too:
  raise `min_tokens` if such output is legitimate for a task.

  Pass the sampled ids without padding. Cost: O(max_period * (min_repeats * max_period + min_tokens))
  comparisons at worst, on the tail only, whatever the sequence length.
  """
  if max_period < 1 or min_repeats < 2 or min_tokens < 2:
    raise UserError("is_looping needs max_period >= 1, min_repeats >= 2 and min_tokens >= 2")
  need = max(min_repeats * max_period, min_tokens)
  tail = [int(t) for t in token_ids[-need:]]
  for p in range(1, max_period + 1):
    span = max(min_repeats * p, min_tokens)
    if span > len(tail):
      break
    window = tail[len(tail) - span:]
    if window[p:] == window[:-p]:
      return True
  return False
