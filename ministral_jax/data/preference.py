"""Preference pairs: a prompt, two responses, and the probability that the first is the better one.

One JSON object per line:

    {"prompt": "What is 2 + 2?" | [messages ending with a user turn],
     "chosen": "text" | {"content": ..., "thinking": ...},
     "rejected": "text" | {"content": ..., "thinking": ...},
     "p": 0.8}                      # optional: P(chosen > rejected); 1 when absent (a hard label)

Offline DPO reads these files; Online DPO makes the same `Pair`s from its rollouts and its reward model. A
pair becomes two training rows, adjacent (rows 2i and 2i + 1, so a batch shard always holds whole pairs):
the prompt and one response rendered in the instruct format, with the loss mask on that final response
only, and the pair's probability as `label` on both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from ministral_jax.data import chat, sources
from ministral_jax.errors import UserError

FEATURES = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "label")


@dataclasses.dataclass(frozen=True)
class Pair:
  prompt: tuple[chat.Message, ...]  # ends with a user turn
  first: chat.Message  # the assistant's response the label is about ("chosen" in a file)
  second: chat.Message
  p: float = 1.0  # P(first > second)
  where: str = ""

  def conversation(self, which: int) -> chat.Conversation:
    return chat.Conversation(self.prompt + ((self.first, self.second)[which],), self.where)


def _response(value: Any, side: str) -> tuple[dict | None, str | None]:
  if isinstance(value, str):
    value = {"content": value}
  if not isinstance(value, dict) or not isinstance(value.get("content"), str):
    return None, f'"{side}" is neither a string nor an object with a "content" string'
  if not value["content"].strip() and not (value.get("thinking") or "").strip():
    return None, f'"{side}" is empty'
  return {"role": "assistant", **value}, None


def parse_pair(record: Any, where: str) -> Pair:
  """One decoded JSON record to a Pair; a bad record raises one UserError naming `where` and the fix."""
  if not isinstance(record, dict):
    raise UserError(f"{where}: not a JSON object with prompt, chosen and rejected")
  missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
  if missing:
    raise UserError(f"{where}: the pair has no {', '.join(missing)}")
  prompt = record["prompt"]
  messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
  first, problem = _response(record["chosen"], "chosen")
  second, problem2 = _response(record["rejected"], "rejected")
  if problem or problem2:
    raise UserError(f"{where}: {problem or problem2}; both responses need text")
  if first == second:
    raise UserError(f"{where}: chosen and rejected are the same response; a pair must differ to teach anything")
  p = record.get("p", 1.0)
  if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
    raise UserError(f"{where}: p={p!r} is not a probability in [0, 1]")
  if not isinstance(messages, list):
    raise UserError(f'{where}: "prompt" is neither a string nor a list of messages')
  conversation = chat.parse_conversation({"messages": messages + [first]}, where)
  if conversation.images:
    raise UserError(f"{where}: preference pairs with images are not supported (DPO, Online DPO and the PWRM "
                    "train text only); drop the image chunks, or fine-tune on images with SFT.")
  second_message = chat.parse_conversation({"messages": messages + [second]}, where).messages[-1]
  return Pair(conversation.messages[:-1], conversation.messages[-1], second_message, float(p), where)


def _keyed_pairs(paths: str) -> list[tuple[str, Pair]]:
  return sources.keyed_jsonl(paths, parse_pair, "preference")


def read_pairs(paths: str) -> list[Pair]:
  """Every pair in the comma-separated files/globs, all validated (one error lists every bad line)."""
  return [pair for _, pair in _keyed_pairs(paths)]


def split_pairs(data_cfg: ml_collections.ConfigDict, split: str) -> list[Pair]:
  """The split's pairs: `eval_paths` if given, else the hash hold-out of `paths`."""
  return sources.split_records(data_cfg, split, _keyed_pairs, "preference pairs")


def plain_text(pair: Pair) -> str:
  """The pair's text, a paragraph per message: what a tokenizer is trained on."""
  return "\n\n".join(t for m in (*pair.prompt, pair.first, pair.second) for t in (m.thinking, m.content) if t)


def render_pair(pair: Pair, tokenizer, width: int) -> dict[str, np.ndarray]:
  """The pair's two rows `[2, width]`, right-padded; a pair that does not fit is a UserError naming it."""
  out = {k: np.zeros((2, width), np.int32) for k in FEATURES[:5]}
  for row in range(2):
    rendered = chat.render(pair.conversation(row), tokenizer)
    n = len(rendered.tokens)
    if n > width + 1:
      raise UserError(f"{pair.where}: prompt + response is {n} tokens, more than data.seq_len={width} + 1; "
                      "raise data.seq_len or drop the pair")
    mask = rendered.mask.copy()
    if len(rendered.turn_ends) > 1:
      mask[:rendered.turn_ends[-2]] = 0  # earlier assistant turns are prompt here, not the response
    out["inputs"][row, :n - 1] = rendered.tokens[:-1]
    out["targets"][row, :n - 1] = rendered.tokens[1:]
    out["loss_mask"][row, :n - 1] = mask[1:]
    out["positions"][row, :n - 1] = np.arange(n - 1)
    out["segment_ids"][row, :n - 1] = 1
  return out


def batch_rows(pairs: Sequence[Pair], tokenizer, width: int) -> dict[str, np.ndarray]:
  """`[2 * len(pairs), width]` rows (pair i in rows 2i, 2i + 1) and `label` `[2 * len(pairs), 1]` float32."""
  parts = [render_pair(p, tokenizer, width) for p in pairs]
  out = {k: np.concatenate([part[k] for part in parts]) for k in FEATURES[:5]}
  out["label"] = np.repeat(np.array([p.p for p in pairs], np.float32), 2)[:, None]
  return out


class PairIterator:
  """This process's pairs of each step, in a seeded order reshuffled every epoch; its state (steps taken) goes
  into every checkpoint. `rows` counts pairs: the process's share of `global_batch` pairs. `batch_fn` makes
  the rows of a list of pairs (default: the DPO rows of `batch_rows`)."""

  def __init__(self, pairs: Sequence[Pair], batch_fn: Callable[[Sequence[Pair]], dict], global_batch: int,
               rows: tuple[int, int], seed: int):
    self.pairs, self.batch_fn = pairs, batch_fn
    self.global_batch, self.rows, self.seed, self.taken = global_batch, rows, seed, 0
    for pair in pairs:  # a pair that cannot fit fails now, before any step
      batch_fn([pair])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    first = self.taken * self.global_batch
    order = lambda epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
    picked = [self.pairs[order(i // len(self.pairs))[i % len(self.pairs)]]
              for i in range(first + self.rows[0], first + self.rows[1])]
    self.taken += 1
    return self.batch_fn(picked)

  def get_state(self) -> dict:
    return {"taken": self.taken}

  def set_state(self, state: dict) -> None:
    self.taken = int(state["taken"])


def dpo_rows(tokenizer, width: int) -> Callable[[Sequence[Pair]], dict]:
  return lambda pairs: batch_rows(pairs, tokenizer, width)


def train_iterator(data_cfg: ml_collections.ConfigDict, tokenizer, global_batch: int, seed: int,
                   rows: tuple[int, int], batch_fn: Callable | None = None) -> PairIterator:
  return PairIterator(split_pairs(data_cfg, "train"), batch_fn or dpo_rows(tokenizer, data_cfg.seq_len),
                      global_batch, rows, seed)


def eval_batches(data_cfg: ml_collections.ConfigDict, tokenizer, batch_size: int, max_batches: int = 0,
                 rows: tuple[int, int] | None = None, batch_fn: Callable | None = None):
  """One unshuffled pass over the eval pairs in global batches of `batch_size` pairs (this process's `rows`);
  the last batch is completed with rows whose loss mask is 0 (they count nothing)."""
  batch_fn = batch_fn or dpo_rows(tokenizer, data_cfg.seq_len)
  pairs = split_pairs(data_cfg, "eval")
  start, stop = rows or (0, batch_size)
  n_batches = -(-len(pairs) // batch_size)
  for b in range(min(n_batches, max_batches) if max_batches else n_batches):
    chunk = pairs[b * batch_size:(b + 1) * batch_size]
    real = chunk[start:stop]
    fill = (stop - start) - len(real)
    out = batch_fn(real + chunk[:1] * fill)
    out["loss_mask"][2 * len(real):] = 0
    yield out
