"""The lm-evaluation-harness backend: `--model ministral_jax`, or an instance given to `simple_evaluate`.

EleutherAI's harness asks a model three things, and this backend answers them
as the harness's own Hugging Face backend (`--model hf`) does, so a checkpoint
scores the same here as its HF export scores there:

  loglikelihood          sum of log p(continuation | context) and whether every continuation token is the
                         argmax. Context + continuation is tokenised whole and split (the harness's
                         `TemplateLM`); a pair longer than `max_length` + 1 loses tokens from the left.
  loglikelihood_rolling  a document's log-likelihood over disjoint windows of `max_length` predictions,
                         each with the longest context that fits (the harness's window helpers).
  generate_until         the project's KV-cache sampler (`sample/sampler.py`), greedy or sampled, cut at
                         the first stop string.

Speed comes from doing fewer, larger forward passes than there are requests:
  - requests whose inputs are the same token sequence share one row (multiple choice with one-token
    answers: the four choices of an MMLU question are one row);
  - rows are sorted by length and batched `batch_size` at a time, padded to a power-of-two length, so a
    whole run compiles a handful of programs, one per length bucket;
  - only the scored positions' logits are computed: the model returns hidden states and the LM head runs
    on the gathered `[scored tokens, d_model]` rows, never on `[batch, seq, vocab]`, and tile by tile over
    the vocab with a running log-sum-exp, so no `[positions, vocab]` block is written and read back;
  - the batch is split over the mesh's data axes by the `Partitioner`, the params keep their shardings.
Generation stops a row at EOS or at any token whose text contains a stop string; a stop string that spans
tokens is still cut from the text, it only costs the tokens generated past it.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as model_utils
from tqdm import tqdm

from ministral_jax import multihost, sharding
from ministral_jax.data import chat, tokenizers
from ministral_jax.errors import UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ModelConfig
from ministral_jax.sample import sampler

log = logging.getLogger(__name__)

LOGIT_CHUNK = 256  # scored positions per step of the head
LOGIT_TILE = 4096  # vocab columns per tile: a `[chunk, tile]` block of logits stays in cache
MIN_WIDTH = 64  # the shortest padded row: short requests share one compiled program
Request = tuple[tuple[str, str] | None, list[int], list[int]]  # ((context, continuation), ctx ids, cont ids)


def vocab_tile(vocab: int) -> int:
  """The largest divisor of `vocab` up to LOGIT_TILE (the whole vocab when that is too small to help)."""
  tile = max(d for d in range(1, min(vocab, LOGIT_TILE) + 1) if vocab % d == 0)
  return tile if tile >= 512 else vocab


def _head_scores(h: jax.Array, y: jax.Array, head: jax.Array, cfg: ModelConfig, greedy: bool
                 ) -> tuple[jax.Array, jax.Array]:
  """h `[chunk, d_model]`, targets y `[chunk]`, head `[d_model, vocab]` -> log p(y), y is the first argmax.

  The head runs tile by tile over the vocab with a running max and sum (the log-sum-exp of flash attention),
  so `[chunk, vocab]` logits never exist: written whole and read back by the softmax they made this step
  memory-bound, 3.8x slower on CPU for a 131K vocab (`benchmarks/lm_eval_speed.py`).
  """
  dt = jnp.dtype(cfg.dtype)
  prec = None if cfg.matmul_precision == "default" else cfg.matmul_precision
  d_model, vocab = head.shape
  tile = vocab_tile(vocab)
  tiles = jnp.moveaxis(head.reshape(d_model, vocab // tile, tile), 1, 0)  # [tiles, d_model, tile]

  def step(carry, xs):
    top, total, picked, best, arg = carry  # each [chunk]
    w, k = xs
    logits = jnp.einsum("cd,dv->cv", h, w.astype(dt), precision=prec).astype(jnp.float32)  # [chunk, tile]
    tile_top = jnp.max(logits, axis=-1)
    new_top = jnp.maximum(top, tile_top)
    total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits - new_top[:, None]), axis=-1)
    local = y - k * tile
    inside = (local >= 0) & (local < tile)
    picked = jnp.where(inside, jnp.take_along_axis(logits, jnp.clip(local, 0, tile - 1)[:, None], -1)[:, 0],
                       picked)
    if greedy:  # the first maximum: a later tile wins only when strictly larger
      better = tile_top > best
      arg = jnp.where(better, k * tile + jnp.argmax(logits, axis=-1), arg)
      best = jnp.where(better, tile_top, best)
    return (new_top, total, picked, best, arg), None

  n = h.shape[0]
  init = (jnp.full((n,), -jnp.inf), jnp.zeros((n,)), jnp.zeros((n,)), jnp.full((n,), -jnp.inf),
          jnp.zeros((n,), jnp.int32))
  (top, total, picked, _, arg), _ = jax.lax.scan(step, init, (tiles, jnp.arange(vocab // tile)))
  return picked - (top + jnp.log(total)), (arg == y) if greedy else jnp.zeros((n,), bool)


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"))
def score_positions(params: Any, cfg: ModelConfig, tokens: jax.Array, rows: jax.Array, cols: jax.Array,
                    targets: jax.Array, greedy: bool = True) -> tuple[jax.Array, jax.Array]:
  """tokens `[batch, seq]`; rows, cols, targets `[n]` -> (log p(targets[i] | tokens[rows[i], :cols[i] + 1]),
  whether targets[i] is that position's argmax (the first maximum, as torch's argmax; all False without
  `greedy`)), both `[n]`. n is a multiple of `LOGIT_CHUNK` or smaller. The head runs on the scored
  positions only."""
  hidden, _ = transformer.Transformer(cfg).apply({"params": params}, tokens, return_hidden=True)  # [b, s, d]
  picked = hidden[rows, cols]  # [n, d_model]
  head = transformer.output_matrix(params, cfg)  # [d_model, vocab]
  chunk = min(LOGIT_CHUNK, picked.shape[0])  # both powers of two
  split = lambda x: x.reshape(-1, chunk, *x.shape[1:])
  logp, is_max = jax.lax.map(lambda a: _head_scores(*a, head, cfg, greedy), (split(picked), split(targets)))
  return logp.reshape(-1), is_max.reshape(-1)


@register_model("ministral_jax")
class MinistralLM(TemplateLM):
  """A checkpoint of ours (orbax, HF or Mistral-native; any size, any mesh) as an lm-eval model.

  From the harness's command line: `--model ministral_jax --model_args checkpoint=DIR,mesh=fsdp=-1`
  (`python -m ministral_jax.eval.harness_cli`). From Python: `MinistralLM(checkpoint=DIR)`, or
  `MinistralLM(params=..., model_cfg=..., tokenizer=...)` for params already on a mesh.
  """

  def __init__(self, checkpoint: str = "", tokenizer: str | tokenizers.Tokenizer = "", batch_size: int | str = 16,
               max_length: int = 0, max_gen_toks: int = 256, mesh: str = "", add_bos_token: bool = True,
               seed: int = 0, *, params: Any = None, model_cfg: ModelConfig | None = None,
               partitioner: Any = None, show_progress: bool = True, **unused: Any) -> None:
    super().__init__()
    from ministral_jax.checkpoint import convert
    if unused.pop("device", None) not in (None, "", "cpu", "cuda", "tpu"):
      log.warning("ministral_jax ignores --device: the devices are JAX's (the mesh decides)")
    unused.pop("max_batch_size", None)
    if unused:
      raise UserError(f"Unknown model_args for ministral_jax: {sorted(unused)}. Known: checkpoint, tokenizer, "
                      "batch_size, max_length, max_gen_toks, mesh, add_bos_token, seed. (The chat template is "
                      "lm-eval's --apply_chat_template.)")
    self.partitioner = partitioner or sharding.Partitioner.from_config(
        convert.parse_mesh(mesh.replace("+", ",")) if mesh else sharding.mesh_config())
    if params is None:
      if not checkpoint:
        raise UserError("ministral_jax needs checkpoint=<dir> (orbax, HF or Mistral-native).")
      model_cfg = convert.load_config_any(checkpoint, text_only=True)
      self.tok = _tokenizer(tokenizer, checkpoint)
      tokenizers.check_vocab_fits(self.tok, model_cfg.vocab_size)
      params, model_cfg = convert.load_any(checkpoint, self.partitioner, text_only=True)
    elif model_cfg is None or not tokenizer:
      raise UserError("MinistralLM(params=...) also needs model_cfg= and tokenizer=.")
    else:
      self.tok = tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else tokenizers.load_tokenizer(tokenizer)
    self.params, self.cfg = params, model_cfg
    self.batch = _batch_size(batch_size)
    self._max_length = int(max_length) or model_cfg.max_seq_len
    if not 1 < self._max_length <= model_cfg.max_seq_len:
      raise UserError(f"max_length={max_length}: the model reads at most {model_cfg.max_seq_len} tokens "
                      "(model.max_seq_len); give a length up to that, or 0 for it.")
    self._max_gen_toks = int(max_gen_toks)
    self.add_bos_token = _flag(add_bos_token)
    self.seed = int(seed)
    self.show_progress = show_progress
    self.truncated = 0  # requests whose context lost tokens on the left (counted, as the harness warns)
    self._rendered: dict[str, list[int]] = {}  # chat-rendered prompt text -> its exact token ids
    self._stop_tokens: dict[tuple[str, ...], list[int]] = {}

  # --- what the harness reads -------------------------------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tok.bos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return str(self.tok.identity().get("source", "")).replace("/", "__")

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    """The name lm-eval records for `--apply_chat_template`: ours is Mistral's instruct format."""
    return "mistral_instruct" if chat_template else None

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
    """Text -> ids with the checkpoint's tokenizer; BOS first as the HF backend's tokenizer adds it (a
    text already starting with BOS gets none). A prompt rendered by `apply_chat_template` keeps the exact
    ids of its rendering; text after it is encoded plainly."""
    head, rest = self._chat_prefix(string)
    if head is not None:
      return head + self.tok.encode(rest)
    bos_text = self.tok.decode([self.tok.bos_id], keep_special=True)
    bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
    if add_special_tokens is None and string.startswith(bos_text):
      return self.tok.encode(string, parse_special=True)
    return self.tok.encode(string, bos=bool(bos))

  def tok_decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(ids)

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The Mistral instruct rendering SFT trains on (`data/chat.py`), as text; its token ids are kept, so
    `tok_encode` gets them back exactly (a SentencePiece round trip through text would not)."""
    history = [dict(m) for m in chat_history]
    prefill = history.pop()["content"] if history and history[-1]["role"] == "assistant" else ""
    ids, _ = chat.prompt_before_answer(history, self.tok, where="lm_eval chat history")
    text = self.tok.decode(ids, keep_special=True)
    self._rendered[text] = ids
    return text + prefill

  def _chat_prefix(self, string: str) -> tuple[list[int] | None, str]:
    if not self._rendered:
      return None, string
    end = string.rfind("[/INST]")
    head = string[:end + len("[/INST]")] if end >= 0 else None
    if head in self._rendered:
      return list(self._rendered[head]), string[len(head):]
    return None, string

  # --- loglikelihood ----------------------------------------------------------------------------------
  def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, greedy: bool = True,
                            **kwargs: Any) -> list[tuple[float, bool]]:
    """Each request's (sum of continuation log-probs, all greedy); inputs shared between requests run once.
    `greedy=False` leaves the flags False (rolling log-likelihoods never read them)."""
    if not requests:
      return []
    wanted: list[tuple[tuple[int, ...], list[int]]] = []  # per request: its input row, its continuation
    for _, context, continuation in requests:
      if not continuation:
        raise UserError("A loglikelihood request has an empty continuation (nothing to score); check the "
                        "task's doc_to_choice / doc_to_target.")
      if len(continuation) > self.max_length:
        raise UserError(f"A continuation of {len(continuation)} tokens is longer than max_length="
                        f"{self.max_length}; it cannot be scored. Raise max_length (up to model.max_seq_len).")
      whole = list(context) + list(continuation)
      if len(whole) > self.max_length + 1:
        self.truncated += 1
      wanted.append((tuple(whole[-(self.max_length + 1):][:-1]), list(continuation)))
    rows = sorted({row for row, _ in wanted}, key=lambda r: (-len(r), r))
    by_row: dict[tuple[int, ...], list[int]] = {}
    for i, (row, _) in enumerate(wanted):
      by_row.setdefault(row, []).append(i)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    bar = tqdm(total=len(requests), desc="loglikelihood requests", disable=disable_tqdm or not self.show_progress)
    for start in range(0, len(rows), self.batch):
      chunk = rows[start:start + self.batch]
      picks = [(r, i) for r, row in enumerate(chunk) for i in by_row[row]]
      logp, is_max = self._score(chunk, [(r, wanted[i][1]) for r, i in picks], greedy)
      offset = 0
      for r, i in picks:
        n = len(wanted[i][1])
        out[i] = (float(np.sum(logp[offset:offset + n], dtype=np.float64)), bool(np.all(is_max[offset:offset + n])))
        offset += n
      bar.update(len(picks))
    bar.close()
    return out

  def _score(self, rows: list[tuple[int, ...]], picks: list[tuple[int, list[int]]], greedy: bool
             ) -> tuple[np.ndarray, np.ndarray]:
    """Runs `rows` (padded into one bucketed batch) and returns, for every (row, continuation) in `picks`
    in order, each continuation token's log-prob and whether it was the argmax."""
    shards = self.partitioner.axis_size(self.partitioner.spec(("activation_batch",))[0])
    batch = _round_up(self.batch, shards)
    width = min(sampler.bucket(len(rows[0]), MIN_WIDTH), self.cfg.max_seq_len)
    tokens = np.full((batch, width), self.cfg.pad_id, np.int32)
    for r, row in enumerate(rows):
      tokens[r, :len(row)] = row
    index = [(r, len(rows[r]) - len(cont) + k, t) for r, cont in picks for k, t in enumerate(cont)]
    n = len(index)
    size = sampler.bucket(n, 32)  # a few programs per width: the scored count varies by batch
    gather = np.zeros((3, size), np.int32)
    gather[:, :n] = np.array(index, np.int32).T
    start, stop = self.partitioner.process_rows(batch)
    with self.partitioner.activate():
      sharded = self.partitioner.shard_batch(tokens[start:stop])
      logp, is_max = score_positions(self.params, self.cfg, sharded, *(jnp.asarray(g) for g in gather), greedy)
    return multihost.host_value(logp)[:n], multihost.host_value(is_max)[:n]

  def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
    """Whole-document log-likelihoods: disjoint windows of up to `max_length` predicted tokens, each with
    the longest context that fits, all documents' windows batched together."""
    windows: list[Request] = []
    owner: list[int] = []
    for d, (text,) in enumerate(req.args for req in requests):
      for context, predicted in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)):
        windows.append((None, context, predicted))
        owner.append(d)
    totals = [0.0] * len(requests)
    for d, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm, greedy=False)):
      totals[d] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # --- generation -------------------------------------------------------------------------------------
  def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
    """Continuations cut at the first stop string; requests with the same generation settings are batched
    longest first, each batch padded to a bucketed width."""
    out: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    bar = tqdm(total=len(requests), desc="generate_until requests", disable=disable_tqdm or not self.show_progress)
    eos_text = self.tok.decode([self.eot_token_id], keep_special=True)
    for members in groups.values():
      kwargs = model_utils.normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
      until = model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
      max_new = int(kwargs.pop("max_gen_toks"))
      if max_new >= self.max_length:
        raise UserError(f"A task asks for {max_new} generated tokens, not fewer than max_length="
                        f"{self.max_length}; lower its max_gen_toks or raise max_length.")
      sampling = sampler.Sampling(float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                                  float(kwargs.get("top_p", 1.0) or 1.0), int(kwargs.get("top_k", 0) or 0), max_new)
      prompts = {}
      for i in members:
        ids = self.tok_encode(requests[i].args[0])
        if len(ids) > self.max_length - max_new:
          self.truncated += 1
        prompts[i] = ids[-(self.max_length - max_new):]
      order = sorted(members, key=lambda i: (-len(prompts[i]), i))
      stops = [self.eot_token_id] + self._tokens_containing(tuple(s for s in until if s and s != eos_text))
      for start in range(0, len(order), self.batch):
        chunk = order[start:start + self.batch]
        completions = self._generate([prompts[i] for i in chunk], sampling, stops, len(prompts[chunk[0]]),
                                     start)
        for i, ids in zip(chunk, completions):
          text = model_utils.postprocess_generated_text(self.tok.decode(ids), until, None)
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.update(len(chunk))
    bar.close()
    return out  # type: ignore[return-value]

  def _generate(self, prompts: list[list[int]], sampling: sampler.Sampling, stops: list[int], longest: int,
                salt: int) -> list[list[int]]:
    """One batch through the rollout engine. On a pod each process generates an equal slice of the rows
    and the slices are exchanged (every process returns every row)."""
    procs, me = jax.process_count(), jax.process_index()
    per = -(-len(prompts) // procs)
    mine = prompts[me * per:(me + 1) * per] or prompts[-1:]
    mine = mine + [mine[-1]] * (per - len(mine))
    rng = jax.random.fold_in(jax.random.key(self.seed), salt)
    with self.partitioner.activate():
      rollout = sampler.rollout(self.params, self.cfg, mine, sampling, rng, stop_ids=stops,
                                partitioner=self.partitioner, width=sampler.bucket(longest, MIN_WIDTH))
    rows = rollout.completions()
    if procs > 1:
      rows = [r for part in multihost.gather_json(rows) for r in part]
    return rows[:len(prompts)]

  def _tokens_containing(self, stops: tuple[str, ...]) -> list[int]:
    """The ids whose text contains a stop string: generating one ends the row (cached per stop set)."""
    if stops not in self._stop_tokens:
      hits = [i for i in range(self.tok.vocab_size) if not self.tok.is_special(i)
              and any(s in self.tok.decode([i]) for s in stops)] if stops else []
      self._stop_tokens[stops] = hits
    return self._stop_tokens[stops]


def _tokenizer(spec: str | tokenizers.Tokenizer, checkpoint: str) -> tokenizers.Tokenizer:
  """The tokenizer named, else the one the checkpoint records or ships; either way checked against the
  checkpoint's record."""
  from ministral_jax.checkpoint import convert
  recorded = convert.recorded_tokenizer(checkpoint)
  if isinstance(spec, tokenizers.Tokenizer):
    tok = spec
  elif spec:
    tok = tokenizers.load_tokenizer(spec)
  elif recorded:
    tok = tokenizers.load_tokenizer(str(recorded["source"]))
  else:
    raise UserError(f"{checkpoint} records no tokenizer and ships no tokenizer file; name one with "
                    "tokenizer=<tekken.json | tokenizer.model | bundled name>.")
  tokenizers.check_same(recorded, tok.identity(), f"checkpoint {checkpoint}", "the lm_eval tokenizer")
  return tok


def _batch_size(value: int | str | None) -> int:
  if value in (None, "", "auto"):
    return 16
  text = str(value).split(":")[0]
  if not text.isdigit() or int(text) < 1:
    raise UserError(f"batch_size={value!r}: a positive number of rows per forward pass.")
  return int(text)


def _flag(value: bool | str) -> bool:
  return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def compile_abstract(cfg: ModelConfig, partitioner: Any, batch: int, width: int, scored: int,
                     greedy: bool = True) -> Any:
  """The scoring program for `batch` rows of `width` tokens and `scored` positions, compiled without weights
  (real sizes on paper: `tests/test_real_sizes.py`)."""
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        transformer.abstract_params(cfg), partitioner.param_shardings(cfg))
  tokens = jax.ShapeDtypeStruct((batch, width), jnp.int32, sharding=partitioner.batch_sharding(2))
  index = jax.ShapeDtypeStruct((scored,), jnp.int32)
  with partitioner.activate():
    return score_positions.lower(params, cfg, tokens, index, index, index, greedy).compile()
