"""Held-out answer accuracy: conversations that carry a reference `answer` (the shapes image-QA task,
`data/shapes.py`, or any JSONL of {"messages": [...], "answer": "..."}), answered greedily and scored by
normalised exact match.

Each record is cut after its last user turn and rendered exactly as SFT renders it (`data/chat.py`, images
included), so the model answers in the format it was fine-tuned on; the answers are sampled with their
images by the rollout engine (`sample/sampler.py`) in batches of one shape. SFT reports it at every eval
(`sft.answers`), next to the loss on the assistant tokens.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from ministral_jax.data import chat, shapes, sources
from ministral_jax.data.tokenizers import Tokenizer
from ministral_jax.errors import UserError
from ministral_jax.model.config import ModelConfig
from ministral_jax.sample import sampler


def answers_config(paths: str = "", n: int = 0) -> ml_collections.ConfigDict:
  """paths: JSONL with `answer` fields ("" = none: no accuracy); n: the first n records (0 = all)."""
  return ml_collections.ConfigDict(dict(paths=paths, n=n, max_new_tokens=8, batch_size=32))


def read_records(paths: str, n: int = 0) -> list[dict]:
  """The records of comma-separated JSONL files/globs, each with its "file:line" as `where`."""
  records = []
  for path in sources.expand_paths(paths):
    for line_no, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
      if line.strip():
        record = json.loads(line)
        if not isinstance(record, dict) or "answer" not in record or "messages" not in record:
          raise UserError(f"{path}:{line_no}: an answer record is a JSON object with 'messages' and 'answer'.")
        records.append({**record, "where": f"{path}:{line_no}"})
  if not records:
    raise UserError(f"{paths!r} holds no answer records; write them first (the shapes task: "
                    "python -m ministral_jax.data.shapes --out DIR).")
  return records[:n] if n else records


def prompt(record: dict, tokenizer: Tokenizer, settings: chat.ImageSettings) -> tuple[list[int], list[np.ndarray]]:
  """The tokens the model sees before it answers (through the last user turn) and that turn's images."""
  messages = list(record["messages"])
  last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
  return chat.prompt_before_answer(messages[:last_user + 1], tokenizer, settings, record["where"])


def accuracy(params: Any, model_cfg: ModelConfig, records: Sequence[dict], tokenizer: Tokenizer,
             settings: chat.ImageSettings, batch_size: int = 32, max_new_tokens: int = 8) -> dict[str, float]:
  """Greedy answers to every record, scored against its `answer`; per question `kind` too when records have one."""
  prompts = [prompt(r, tokenizer, settings) for r in records]
  width = sampler.bucket(max(len(t) for t, _ in prompts))
  right: list[bool] = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one batch shape: one compiled program
    images = [imgs for _, imgs in chunk] if model_cfg.vision_layers else None
    out = sampler.generate(params, model_cfg, [t for t, _ in chunk], max_new_tokens, rng=jax.random.key(0),
                           eos_id=tokenizer.eos_id, prompt_width=width, images=images)
    for tokens, record in zip(out, records[start:start + batch_size]):
      text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_id])
      right.append(shapes.score(text, str(record["answer"])))
  result = {"answer_accuracy": float(np.mean(right))}
  kinds = sorted({r["kind"] for r in records if "kind" in r})
  for kind in kinds:
    hits = [ok for ok, r in zip(right, records) if r.get("kind") == kind]
    result[f"answer_accuracy_{kind}"] = float(np.mean(hits))
  return result
