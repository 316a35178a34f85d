"""Trainer `grpo`: reinforcement learning on verifiable rewards, with Magistral's changes to GRPO.

Each step: B prompts from the train split (the conversations' user turns; the reference answer is the
final assistant message's \\boxed{} content, or the test program for code), G samples of each from the
live params (`sample/sampler.rollout`: one prefill per prompt, the rows split over the mesh's data axes),
the configured rewards on the decoded responses (`rewards/registry.py`), then `grpo.epochs` passes over the
rollout in `grpo.minibatches` minibatches, one optimizer update each, on the clipped surrogate of
`grpo_loss.py` (ratios against the log-probabilities the sampler returned). The advantages, the dropped
groups and every metric are computed on the devices in the jitted step, so they are the same on one
process or many.

Everything else is the shared loop's: the prompt iterator's position and the optimizer state are in
each checkpoint, and the rollout RNG is a function of the seed and the step, so a run killed at any
point and started again with the same command ends bitwise equal to one that was never stopped. The
periodic eval is held-out accuracy (greedy, and pass@k with `grpo.eval_samples` = k > 1).

The job can make its own starting point: with `init_from` empty and an `sft_stage` config, it first runs
that SFT job in <workdir>/sft (resumable), then starts from its params and tokenizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ministral_jax.data import chat
from ministral_jax.errors import UserError
from ministral_jax.model import transformer
from ministral_jax.model.config import ModelConfig
from ministral_jax.rewards import format as answer_format
from ministral_jax.rewards import math_verifier, registry
from ministral_jax.sample import sampler
from ministral_jax.train import grpo_loss, loop, pretrain, sft
from ministral_jax.train.losses import token_log_probs

ROW_FEATURES = ("reward", "correct", "length", "truncated", "format_ok")  # per sequence, [rows, 1] float32


def grpo_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      samples=8,  # G, per prompt
      epochs=1,  # mu: optimisation passes over each rollout
      minibatches=1,  # optimizer updates per pass (whole groups each)
      microbatches=1,  # forward/backward passes per update, gradients summed (memory of one)
      sampling=dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=256),
      rewards=("math",), reward_weights=(1.0,),  # by name (rewards/registry.py), summed with these weights
      format_gate=True,  # reward 0 unless the response is [THINK]...[/THINK] then a boxed answer
      length_penalty_buffer=0,  # tokens before max_new_tokens where DAPO's soft penalty starts (0: off)
      eps_low=0.2, eps_high=0.28, kl_beta=0.04,  # kl_beta applies only with magistral.no_kl=False
      magistral=dict(no_kl=True, token_sum=True, minibatch_advantage=True, clip_higher=True,
                     drop_flat_groups=True),
      eval_problems=128, eval_batch=64, eval_samples=1, eval_temperature=1.0,
      eval_at_start=True))  # the held-out accuracy of the starting policy, at step 0


def check(cfg: ml_collections.ConfigDict) -> None:
  """What only GRPO needs, before any work (the prompt lengths are checked once the tokenizer exists)."""
  g, problems = cfg.grpo, []
  if cfg.data.source != "chat":
    problems.append(f"data.source={cfg.data.source!r}: GRPO reads prompts from conversations; set "
                    "data.source='chat' (the final assistant message holds the reference \\boxed{} answer)")
  if g.samples < 2:
    problems.append(f"grpo.samples={g.samples!r}: GRPO compares samples within a group; use at least 2")
  for field in ("epochs", "minibatches", "microbatches", "eval_problems", "eval_batch", "eval_samples"):
    if g[field] < 1:
      problems.append(f"grpo.{field}={g[field]!r}: at least 1")
  problems += registry.check_names(g.rewards)
  if len(g.reward_weights) != len(g.rewards):
    problems.append(f"grpo.reward_weights has {len(g.reward_weights)} weights for {len(g.rewards)} rewards")
  problems += [f"grpo.sampling.{p}" for p in sampling_of(g).check()]
  if g.sampling.temperature <= 0:
    problems.append("grpo.sampling.temperature must be positive: GRPO needs different samples per prompt")
  if not 0 < g.eps_low < 1 or g.eps_high < g.eps_low:
    problems.append(f"grpo.eps_low={g.eps_low}, eps_high={g.eps_high}: 0 < eps_low < 1 and eps_high >= eps_low")
  if cfg.train.grad_accum != 1:
    problems.append("train.grad_accum: GRPO splits each rollout with grpo.minibatches; leave grad_accum at 1")
  if cfg.train.global_batch % g.minibatches:
    problems.append(f"train.global_batch={cfg.train.global_batch} prompts must split into grpo.minibatches="
                    f"{g.minibatches} minibatches of whole groups")
  per_minibatch = cfg.train.global_batch // max(1, g.minibatches) * g.samples
  if g.microbatches >= 1 and per_minibatch % g.microbatches:
    problems.append(f"grpo.microbatches={g.microbatches} must divide the {per_minibatch} rows of a minibatch "
                    "(train.global_batch / grpo.minibatches prompts x grpo.samples)")
  if problems:
    raise UserError("The GRPO config has problems:\n  " + "\n  ".join(problems))


def sampling_of(block: ml_collections.ConfigDict) -> sampler.Sampling:
  """A trainer block's `sampling` settings (GRPO's, Online DPO's) as the rollout engine takes them."""
  s = block.sampling
  return sampler.Sampling(float(s.temperature), float(s.top_p), int(s.top_k), int(s.max_new_tokens))


# ----------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
  ids: tuple[int, ...]  # the conversation up to the assistant's first token
  reference: str  # the gold answer (or a test program), what the rewards compare against
  messages: tuple[chat.Message, ...] = ()  # the same conversation as messages (what a PWRM reads)


def prompt_of(conversation: chat.Conversation, tokenizer) -> Prompt:
  """The tokens before the final assistant message, and its reference answer."""
  if conversation.images:
    raise UserError(f"{conversation.where}: GRPO prompts with images are not supported (its rollouts are "
                    "text only); drop the image chunks.")
  rendered = chat.render(conversation, tokenizer)
  starts = np.flatnonzero(np.diff(np.concatenate([[0], rendered.mask])) == 1)
  final = conversation.messages[-1].content
  reference = answer_format.extract_boxed(final) or final
  return Prompt(tuple(int(t) for t in rendered.tokens[:starts[-1]]), reference, conversation.messages[:-1])


def prompts(data_cfg: ml_collections.ConfigDict, tokenizer, split: str, max_new_tokens: int,
            max_seq_len: int) -> list[Prompt]:
  out = [prompt_of(c, tokenizer) for c in chat.split_conversations(data_cfg, split)]
  longest = max(len(p.ids) for p in out)
  if longest + max_new_tokens > max_seq_len:
    raise UserError(f"A {split} prompt of {longest} tokens + grpo.sampling.max_new_tokens={max_new_tokens} "
                    f"exceeds the model's max_seq_len={max_seq_len}; shorten the prompts or the length limit.")
  return out


class PromptIterator:
  """This process's prompts for each step: the train prompts in a seeded order, reshuffled every epoch.
  Its state (steps taken) goes into every checkpoint."""

  def __init__(self, items: Sequence[Prompt], global_batch: int, rows: tuple[int, int], seed: int):
    self.items, self.global_batch, self.rows, self.seed, self.taken = items, global_batch, rows, seed, 0
    self.width = sampler.bucket(max(len(p.ids) for p in items))

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    first = self.taken * self.global_batch
    picked = [self.items[self._order(i // len(self.items))[i % len(self.items)]]
              for i in range(first + self.rows[0], first + self.rows[1])]
    self.taken += 1
    return {"prompts": [p.ids for p in picked], "references": [p.reference for p in picked],
            "messages": [p.messages for p in picked]}

  def get_state(self) -> dict:
    return {"taken": self.taken}

  def set_state(self, state: dict) -> None:
    self.taken = int(state["taken"])


# ----------------------------------------------------------------------------- the task


class GRPO:
  """The rollout (host: sample, decode, score), the step (device: advantages, passes, metrics), the eval."""

  def __init__(self, cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, partitioner):
    self.cfg, self.g, self.model_cfg, self.partitioner = cfg, cfg.grpo, model_cfg, partitioner
    self.settings = grpo_loss.Settings.from_config(cfg.grpo)
    self.sampling = sampling_of(cfg.grpo)
    self.verifiers = math_verifier.LazyPool()
    self.width = 0  # prompt bucket, set by the train data

  # --- data
  def train_data(self, data_cfg, tokenizer, global_batch: int, seed: int, rows: tuple[int, int]) -> PromptIterator:
    items = prompts(data_cfg, tokenizer, "train", self.sampling.max_new_tokens, self.model_cfg.max_seq_len)
    it = PromptIterator(items, global_batch, rows, seed)
    self.width = it.width
    return it

  def rewards(self, texts: list[str], references: list[str], lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Per response: the total reward and what it is made of."""
    verifier = self.verifiers.get() if "math" in self.g.rewards else None  # worker processes only when used
    scores = registry.score(self.g.rewards, registry.Responses(texts, references, verifier))
    total = sum(w * scores[n] for n, w in zip(self.g.rewards, self.g.reward_weights))
    fmt = np.asarray([answer_format.check_reasoning(t).ok for t in texts], np.float32)
    if self.g.format_gate:
      total = total * fmt
    total = total + registry.length_penalty(lengths, self.sampling.max_new_tokens, self.g.length_penalty_buffer)
    correct = next((scores[n] for n in ("math", "code") if n in scores), (total > 0).astype(np.float32))
    return {"reward": np.asarray(total, np.float32), "correct": correct, "format_ok": fmt}

  def rollout(self, params: Any, batch: dict, step: int, tokenizer) -> dict:
    rng = jax.random.fold_in(jax.random.key(self.cfg.seed + 1), step)
    out = sampler.rollout(params, self.model_cfg, batch["prompts"], self.sampling, rng, samples=self.g.samples,
                          stop_ids=[tokenizer.eos_id], partitioner=self.partitioner, width=self.width)
    texts = decode(tokenizer, out.completions())
    references = [r for r in batch["references"] for _ in range(self.g.samples)]
    scored = self.rewards(texts, references, out.lengths)
    rows = training_rows(batch["prompts"], out, self.g.samples, self.width + self.sampling.max_new_tokens,
                         self.model_cfg.pad_id)
    per_row = {**scored, "length": out.lengths.astype(np.float32), "truncated": (~out.stopped).astype(np.float32)}
    rows.update({k: per_row[k][:, None].astype(np.float32) for k in ROW_FEATURES})
    return self.partitioner.shard_batch(rows)

  # --- the step
  def policy_log_probs(self, params, mini: dict) -> tuple[jax.Array, jax.Array]:
    hidden, head = pretrain.hidden_and_head(self.model_cfg, params, mini)
    return token_log_probs(hidden, head, mini["targets"], temperature=self.sampling.temperature,
                           seq_chunk=self.cfg.loss.seq_chunk)

  def make_step(self, tx):
    s, g = self.settings, self.g

    def micro_sums(params, micro, frozen):
      """(loss_sum, (count, statistics sums)) of one microbatch, for the gradient of the sum."""
      logp, entropy = self.policy_log_probs(params, micro)
      ref = jax.lax.stop_gradient(self.policy_log_probs(frozen, micro)[0]) if s.kl_beta else None
      loss_sum, count, stats = grpo_loss.surrogate_sums(logp, micro["old_logp"], micro["advantage"][:, 0],
                                                         micro["kept"][:, 0], micro["loss_mask"], s, ref)
      generated = micro["loss_mask"]  # the policy's entropy over every sampled token, dropped groups too
      stats.update(entropy=jnp.sum(entropy * generated), generated=jnp.sum(generated))
      return loss_sum, (count, stats)

    def minibatch_update(carry, mini, frozen):
      """One optimizer update on one minibatch, its rows through in `grpo.microbatches` parts."""
      params, opt_state = carry
      adv = grpo_loss.normalize_minibatch(mini["advantage"][:, 0], mini["kept"][:, 0], s)
      grad_fn = jax.value_and_grad(lambda p, micro: micro_sums(p, micro, frozen), has_aux=True)
      loss_sum, count, stats, grads = loop.accumulate_gradients(grad_fn, params, {**mini, "advantage": adv[:, None]},
                                                                g.microbatches)
      count = jnp.maximum(count, 1.0)
      grads = jax.tree.map(lambda x: x / count, grads)
      updates, new_opt = tx.update(grads, opt_state, params)
      new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
      live = stats["live_tokens"] > 0  # a minibatch of dropped groups changes nothing (not even Adam)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(live, a, b), new, old)
      entropy = stats.pop("entropy") / jnp.maximum(stats.pop("generated"), 1.0)
      out = {"loss": loss_sum / count, "grad_norm": loop.global_norm(grads),
             "update_norm": loop.global_norm(updates) * live, "updated": live.astype(jnp.float32),
             "entropy": entropy, **grpo_loss.per_token_stats(stats)}
      out.pop("live_tokens")
      return (keep(new_params, params), keep(new_opt, opt_state)), out

    def step(state: loop.TrainState, batch: dict, frozen: Any):
      rows = batch["inputs"].shape[0]
      rewards = batch["reward"][:, 0].reshape(rows // g.samples, g.samples)
      adv, kept = grpo_loss.group_advantages(rewards, s)
      data = {**batch, "advantage": adv.reshape(rows, 1), "kept": kept.reshape(rows, 1)}
      minis = jax.tree.map(lambda x: split_minibatches(x, g.minibatches, g.samples), data)
      one_pass = lambda carry, _: jax.lax.scan(lambda c, m: minibatch_update(c, m, frozen), carry, minis)
      (params, opt_state), hist = jax.lax.scan(one_pass, (state.params, state.opt_state), None, length=g.epochs)
      out = {k: jnp.mean(v) for k, v in hist.items()}  # [epochs, minibatches] -> mean over updates
      out["entropy"] = jnp.mean(hist["entropy"][0])  # the first pass: the sampling policy's own entropy
      out.update(rollout_metrics(batch, kept))
      return loop.TrainState(state.step + 1, params, opt_state), out
    return step

  # --- the eval
  def evaluate(self, params: Any, tokenizer) -> dict[str, float]:
    """Held-out accuracy: greedy and, with eval_samples = k > 1, pass@1 and pass@k at eval_temperature."""
    from ministral_jax.eval import generate as eval_generate
    g = self.g
    items = prompts(self.cfg.data, tokenizer, "eval", self.sampling.max_new_tokens,
                    self.model_cfg.max_seq_len)[:g.eval_problems]
    width = sampler.bucket(max(len(p.ids) for p in items))
    refs = [p.reference for p in items]

    def answers(sampling: sampler.Sampling, samples: int, seed: int) -> sampler.Rollout:
      parts = [sampler.rollout(params, self.model_cfg, [p.ids for p in items[i:i + g.eval_batch]], sampling,
                               jax.random.key(seed + i), samples=samples, stop_ids=[tokenizer.eos_id], width=width)
               for i in range(0, len(items), g.eval_batch)]
      return sampler.Rollout(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("tokens", "logprobs",
                                                                                        "lengths", "stopped")), 0)

    greedy = answers(dataclasses.replace(self.sampling, temperature=0.0, top_p=1.0, top_k=0), 1, 0)
    texts = decode(tokenizer, greedy.completions())
    scored = self.rewards(texts, refs, greedy.lengths)
    out = {"eval_accuracy": float(np.mean(scored["correct"])), "eval_reward": float(np.mean(scored["reward"])),
           "eval_mean_length": float(np.mean(greedy.lengths)), "eval_truncated": float(np.mean(~greedy.stopped)),
           "eval_format_ok": float(np.mean(scored["format_ok"]))}
    if g.eval_samples > 1:
      k = g.eval_samples
      sampled = answers(dataclasses.replace(self.sampling, temperature=g.eval_temperature), k, 1)
      texts = decode(tokenizer, sampled.completions())
      right = self.rewards(texts, [r for r in refs for _ in range(k)], sampled.lengths)["correct"]
      out[f"eval_pass@{k}"] = eval_generate.pass_at_k(right.reshape(len(items), k), k)
      out["eval_sampled_accuracy"] = float(np.mean(right))  # pass@1 at eval_temperature, over k samples each
    return out

  def task(self, frozen, frozen_shardings) -> loop.Task:
    tokens = self.cfg.train.global_batch * self.g.samples
    return loop.Task("grpo", loss_fn=None, frozen=frozen, frozen_shardings=frozen_shardings,
                     train_data=self.train_data, rollout=self.rollout, make_step=self.make_step,
                     updates_per_step=self.g.epochs * self.g.minibatches, evaluate=self.evaluate,
                     eval_at_start=self.g.eval_at_start,
                     tokens_per_step=tokens * self.sampling.max_new_tokens, close=self.verifiers.close)


def decode(tokenizer, completions: list[list[int]]) -> list[str]:
  """Responses as text with control tokens by name. A model's vocabulary may be padded past the
  tokenizer's, and a policy can sample those ids: they decode to nothing (and earn no reward)."""
  n = tokenizer.vocab_size
  return [tokenizer.decode([t for t in c if 0 <= t < n], keep_special=True) for c in completions]


def training_rows(prompts_: Sequence[Sequence[int]], out: sampler.Rollout, samples: int, width: int,
                  pad_id: int) -> dict[str, np.ndarray]:
  """Each (prompt + sampled response) as one right-padded training row `[rows, width]`: inputs, targets
  (the next token), positions, segment ids (0 on padding), the mask of generated targets, and each
  generated target's sampling log-probability at the same place."""
  n = len(out.lengths)
  inputs = np.full((n, width + 1), pad_id, np.int32)
  mask = np.zeros((n, width), np.float32)
  old = np.zeros((n, width), np.float32)
  segments = np.zeros((n, width), np.int32)
  for r in range(n):
    p, c = prompts_[r // samples], int(out.lengths[r])
    inputs[r, :len(p)] = p
    inputs[r, len(p):len(p) + c] = out.tokens[r, :c]
    mask[r, len(p) - 1:len(p) - 1 + c] = 1.0  # the inputs whose next token was sampled
    old[r, len(p) - 1:len(p) - 1 + c] = out.logprobs[r, :c]
    segments[r, :len(p) + c] = 1
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), (n, width)).copy()
  return {"inputs": inputs[:, :-1], "targets": inputs[:, 1:], "positions": positions, "segment_ids": segments,
          "loss_mask": mask, "old_logp": old}


def split_minibatches(x: jax.Array, minibatches: int, samples: int) -> jax.Array:
  """`[prompts * samples, ...]` -> `[minibatches, prompts / minibatches * samples, ...]`; minibatch m holds
  the groups of prompts m, m + minibatches, ... so that each one spans every batch shard."""
  prompts = x.shape[0] // samples
  grouped = x.reshape(prompts // minibatches, minibatches, samples, *x.shape[1:])
  return jnp.swapaxes(grouped, 0, 1).reshape(minibatches, -1, *x.shape[1:])


def rollout_metrics(batch: dict, kept: jax.Array) -> dict[str, jax.Array]:
  col = lambda k: batch[k][:, 0]
  return {"reward_mean": jnp.mean(col("reward")), "reward_std": jnp.std(col("reward")),
          "accuracy": jnp.mean(col("correct")), "format_ok": jnp.mean(col("format_ok")),
          "groups_dropped": 1.0 - jnp.mean(kept), "mean_length": jnp.mean(col("length")),
          "max_length": jnp.max(col("length")), "truncated": jnp.mean(col("truncated")),
          "tokens": jnp.sum(batch["loss_mask"])}


# ----------------------------------------------------------------------------- the job


def make_task(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, partitioner) -> loop.Task:
  frozen = shardings = None
  if not cfg.grpo.magistral.no_kl:  # the ablation's frozen reference: the starting policy
    from ministral_jax.checkpoint import convert
    shardings = partitioner.param_shardings(model_cfg)
    frozen, _ = convert.load_or_init(cfg.init_from, model_cfg, partitioner, cfg.seed)
  return GRPO(cfg, model_cfg, partitioner).task(frozen, shardings)


def batch_shapes(cfg: ml_collections.ConfigDict, prompt_width: int) -> dict[str, tuple]:
  """The step's batch as (shape, dtype) per feature: for compiling it from shapes alone."""
  rows, width = cfg.train.global_batch * cfg.grpo.samples, prompt_width + cfg.grpo.sampling.max_new_tokens
  ints = {k: ((rows, width), jnp.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
  floats = {k: ((rows, width), jnp.float32) for k in ("loss_mask", "old_logp")}
  return {**ints, **floats, **{k: ((rows, 1), jnp.float32) for k in ROW_FEATURES}}


def compile_abstract(cfg: ml_collections.ConfigDict, partitioner, prompt_width: int) -> tuple[Any, Any]:
  """This job's rollout (prefill + decode loop, G samples per prompt) and train step (every pass and
  minibatch) compiled from shapes alone, for prompts bucketed to `prompt_width`: the real-size check,
  with no checkpoint read. Returns the two compiled programs."""
  from ministral_jax.train import checkpointing
  model_cfg = ModelConfig.from_dict(cfg.model)
  params = checkpointing.abstract_with_shardings(transformer.abstract_params(model_cfg),
                                                 partitioner.param_shardings(model_cfg))
  prompts = cfg.train.global_batch
  rows = lambda *shape: partitioner.batch_sharding(len(shape))
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows(*shape))
  with partitioner.activate():
    rollout = sampler._rollout.lower(  # pylint: disable=protected-access
        params, model_cfg, sds((prompts, prompt_width), jnp.int32), sds((prompts,), jnp.int32),
        sds((prompts, 1), jnp.int32), jax.random.key(0), sampling_of(cfg.grpo), cfg.grpo.samples).compile()
  task = GRPO(cfg, model_cfg, partitioner).task(None, None)
  step = loop.compile_step(cfg, task, model_cfg, partitioner, batch_shapes(cfg, prompt_width))
  return rollout, step


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  check(cfg)
  cfg = sft.prepare_after_stage(cfg, workdir, "grpo")  # its SFT starting point first, when it makes its own
  last = loop.run(cfg, workdir, make_task)
  from ministral_jax.train import grpo_report
  if jax.process_index() == 0:
    print(f"[grpo] reward and held-out accuracy against steps: {grpo_report.plot(workdir)}", flush=True)
  return last
