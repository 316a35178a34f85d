"""The pairwise reward model (PWRM): P(A > B) for two responses to one prompt, read from a decoder.

The judgment is asked in the instruct format. The user turn shows the prompt and both responses and asks
which is better; the score s(x, A, B) is the decoder's logit for answering "A" minus its logit for "B" at
the assistant's first position. That scalar head is the difference of two columns of the LM head, so a PWRM
is an ordinary checkpoint (every format, the same sharding rules) that starts from what its decoder knows.

Symmetric by construction: each pair is read in both orders and

    d = (s(x, A, B) - s(x, B, A)) / 2,        P(A > B) = sigmoid(d / T).

Swapping A and B negates d, so P(A > B) + P(B > A) = 1 exactly, and a judge's bias for the first position
cancels. T is the temperature fitted on held-out pairs once training ends (`fit_temperature`, written to
`calibration.json` beside the params). Rows 2i and 2i + 1 of a batch are pair i read as (A, B) and (B, A).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ministral_jax.data import chat
from ministral_jax.errors import UserError
from ministral_jax.model.config import ModelConfig
from ministral_jax.rewards import format as answer_format

CALIBRATION_FILE = "calibration.json"
FEATURES = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
QUESTION = "Which response is better, A or B?"


@dataclasses.dataclass(frozen=True)
class Judgment:
  prompt: tuple[chat.Message, ...]  # the conversation the responses answer (ends with a user turn)
  first: str  # response texts as the PWRM reads them (`response_text`)
  second: str
  p: float = 1.0  # P(first > second), the training label
  where: str = ""  # the pair's file:line, for errors


def response_text(message: chat.Message | str, strip_thinking: bool) -> str:
  """What the PWRM reads of a response: its answer alone when `strip_thinking` (as the paper does for reasoning
  models), else the thinking (in [THINK]...[/THINK]) followed by the answer."""
  if isinstance(message, str):
    return answer_format.strip_thinking(message) if strip_thinking else message.replace("</s>", "").strip()
  if strip_thinking or not message.thinking:
    return message.content.strip()
  return f"{answer_format.THINK}{message.thinking}{answer_format.END_THINK}{message.content}".strip()


def _question(prompt: Sequence[chat.Message], a: str, b: str) -> str:
  asked = prompt[-1].content if len(prompt) == 1 else "\n".join(f"{m.role}: {m.content}" for m in prompt)
  return f"{asked}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n{QUESTION}"


def _render(prompt: Sequence[chat.Message], a: str, b: str, tokenizer, answer: str = "A") -> chat.Rendered:
  conversation = chat.Conversation((chat.Message("user", _question(prompt, a, b)), chat.Message("assistant", answer)))
  return chat.render(conversation, tokenizer)


@dataclasses.dataclass(frozen=True)
class Choice:
  """How the answer starts: the tokens every answer shares (`prefix`, e.g. a SentencePiece word boundary),
  then the first token that tells "A" from "B"; the score is read where that token is predicted."""
  prefix: tuple[int, ...]
  a: int
  b: int


def choice(tokenizer) -> Choice:
  answers = []
  for answer in ("A", "B"):
    rendered = _render((chat.Message("user", "?"),), "a", "b", tokenizer, answer)
    answers.append(rendered.tokens[int(np.argmax(rendered.mask)):].tolist())
  k = next((i for i, (x, y) in enumerate(zip(*answers)) if x != y), None)
  if k is None:
    raise UserError("The tokenizer renders the answers 'A' and 'B' alike; the PWRM cannot read them")
  return Choice(tuple(answers[0][:k]), answers[0][k], answers[1][k])


def judgment_ids(j: Judgment, tokenizer, width: int, truncate: bool, prefix: Sequence[int] = ()) -> list[int]:
  """The tokens up to the answer's deciding one (the scoring position is the last): the judgment, then the
  answer's shared `prefix`. Too long for `width`: `truncate` cuts both responses to an equal share of what
  fits; otherwise a UserError."""
  def ids(a: str, b: str) -> list[int]:
    rendered = _render(j.prompt, a, b, tokenizer)
    return rendered.tokens[:int(np.argmax(rendered.mask))].tolist() + list(prefix)
  out = ids(j.first, j.second)
  if len(out) <= width:
    return out
  if not truncate:
    raise UserError(f"{j.where or 'A preference pair'}: {len(out)} tokens as a judgment, more than the PWRM's "
                    f"data.seq_len={width}; raise it or shorten the pair")
  share = (width - len(ids("", "")) - 8) // 2  # 8: tokens a cut may add at its boundaries
  if share < 1:
    raise UserError(f"odpo.pwrm_seq_len={width} does not fit the judgment's prompt alone; raise it")
  cut = lambda text: tokenizer.decode(tokenizer.encode(text)[:share])
  out = ids(cut(j.first), cut(j.second))
  return out[:width - 1] + out[-1:] if len(out) > width else out


def rows(judgments: Sequence[Judgment], tokenizer, width: int, truncate: bool = False) -> dict[str, np.ndarray]:
  """`[2 * pairs, width]` rows (pair i read as (A, B) in row 2i, as (B, A) in row 2i + 1), right-padded, with a
  one-hot `loss_mask` on the scoring position and the pair's label `[2 * pairs, 1]`."""
  n, prefix = 2 * len(judgments), choice(tokenizer).prefix
  out = {k: np.zeros((n, width), np.int32) for k in FEATURES}
  for i, j in enumerate(judgments):
    for r, (a, b) in enumerate(((j.first, j.second), (j.second, j.first))):
      ids = judgment_ids(Judgment(j.prompt, a, b, where=j.where), tokenizer, width, truncate, prefix)
      row = 2 * i + r
      out["inputs"][row, :len(ids)] = ids
      out["targets"][row, :len(ids) - 1] = ids[1:]
      out["positions"][row, :len(ids)] = np.arange(len(ids))
      out["segment_ids"][row, :len(ids)] = 1
      out["loss_mask"][row, len(ids) - 1] = 1
  out["label"] = np.repeat(np.asarray([j.p for j in judgments], np.float32), 2)[:, None]
  return out


def pair_logits(model_cfg: ModelConfig, params: Any, batch: dict, choices: Choice) -> jax.Array:
  """`[pairs]` d = (s(A, B) - s(B, A)) / 2 of the rows' pairs; P(first > second) = sigmoid(d / T)."""
  from ministral_jax.train import pretrain
  hidden, head = pretrain.hidden_and_head(model_cfg, params, batch)  # [rows, T, d_model], [d_model, vocab]
  at = jnp.einsum("rtd,rt->rd", hidden, batch["loss_mask"].astype(hidden.dtype))  # the scoring position
  score = (at @ (head[:, choices.a] - head[:, choices.b])).astype(jnp.float32)  # [rows]: s(x, row's A, B)
  score = score.reshape(-1, 2)
  return (score[:, 0] - score[:, 1]) / 2


# ----------------------------------------------------------------------------- calibration


def nll(d: np.ndarray, labels: np.ndarray, temperature: float) -> float:
  """Mean binary cross-entropy of sigmoid(d / T) against the labels."""
  z = np.asarray(d, np.float64) / temperature
  return float(np.mean(labels * np.logaddexp(0, -z) + (1 - labels) * np.logaddexp(0, z)))


TEMPERATURE_BOUNDS = (0.05, 20.0)  # a fit outside means a PWRM that barely separates (or over-separates) pairs


def fit_temperature(d: np.ndarray, labels: np.ndarray) -> float:
  """The T in `TEMPERATURE_BOUNDS` minimising `nll` on held-out pairs (a bounded 1-D search over log T). The
  bounds keep a PWRM whose margins are all near 0 from a T that would blow its noise up into confident labels."""
  from scipy import optimize
  lo, hi = np.log(TEMPERATURE_BOUNDS)
  result = optimize.minimize_scalar(lambda log_t: nll(d, labels, float(np.exp(log_t))), bounds=(lo, hi),
                                    method="bounded", options={"xatol": 1e-6})
  return float(np.exp(result.x))


def expected_calibration_error(prob: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
  """ECE over both orders of every pair (P and 1 - P, labels p and 1 - p, so the set is not one-sided):
  the count-weighted mean over `bins` equal-width bins of |mean predicted - mean label|."""
  prob = np.concatenate([prob, 1 - prob])
  labels = np.concatenate([labels, 1 - labels])
  which = np.minimum((prob * bins).astype(int), bins - 1)
  total = 0.0
  for b in range(bins):
    inside = which == b
    if inside.any():
      total += inside.sum() * abs(prob[inside].mean() - labels[inside].mean())
  return float(total / len(prob))


def read_temperature(pwrm_path: str) -> float:
  """The fitted temperature of a PWRM checkpoint (`<its workdir>/calibration.json`, beside `params`)."""
  path = epath.Path(pwrm_path)
  for candidate in (path / CALIBRATION_FILE, path.parent / CALIBRATION_FILE):
    if candidate.exists():
      return float(json.loads(candidate.read_text())["temperature"])
  raise UserError(f"{pwrm_path} has no {CALIBRATION_FILE} beside it: run its train_pwrm job to the end (it fits "
                  "the temperature), or set odpo.pwrm_temperature")


class Judge:
  """A trained PWRM on the job's mesh: `probabilities(judgments)` -> P(first > second) per judgment, calibrated.

  On a pod every process passes its own judgments (the same number on each) and gets its own back."""

  def __init__(self, path: str, tokenizer, partitioner, width: int, temperature: float = 0.0):
    from ministral_jax.checkpoint import convert
    from ministral_jax.data import tokenizers
    if not epath.Path(path).exists():
      raise UserError(f"odpo.pwrm={path!r} does not exist; point it at a train_pwrm job's <workdir>/params")
    model_cfg = convert.load_config_any(path)
    tokenizers.check_same(convert.recorded_tokenizer(path), tokenizer.identity(), f"the PWRM {path}",
                          "the policy's data")
    tokenizers.check_vocab_fits(tokenizer, model_cfg.vocab_size)
    if width > model_cfg.max_seq_len:
      raise UserError(f"odpo.pwrm_seq_len={width} exceeds the PWRM's max_seq_len={model_cfg.max_seq_len}")
    self.temperature = temperature or read_temperature(path)
    self.tokenizer, self.partitioner, self.width = tokenizer, partitioner, width
    self.choices = choice(tokenizer)
    self.params, self.model_cfg = convert.load_any(path, partitioner)
    shardings = partitioner.param_shardings(self.model_cfg)
    self._logits = jax.jit(lambda p, b: pair_logits(self.model_cfg, p, b, self.choices),
                           in_shardings=(shardings, partitioner.batch_sharding(2)))

  def probabilities(self, judgments: Sequence[Judgment]) -> np.ndarray:
    from ministral_jax import multihost
    batch = rows(judgments, self.tokenizer, self.width, truncate=True)
    batch.pop("label")
    d = multihost.local_rows(self._logits(self.params, self.partitioner.shard_batch(batch)))
    return 1.0 / (1.0 + np.exp(-np.asarray(d, np.float64) / self.temperature))
