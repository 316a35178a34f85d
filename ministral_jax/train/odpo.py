"""Trainer `odpo`: Online DPO, labelled by a pairwise reward model, on the shared loop (Ministral 3 §post-training).

Each step: B prompts from the train split; two samples of each from the live params at `odpo.sampling`
(T = 0.7; `sample/sampler.rollout`, one prefill per prompt, rows over the mesh's data axes); each response
as the PWRM reads it (the answer alone with `odpo.strip_thinking`, as for reasoning models); the PWRM's
calibrated P(first > second) (`rewards/pwrm.Judge`, on the same mesh); then one DPO update
(`dpo.make_loss`, the offline trainer's loss) against the frozen starting policy, with

  - soft labels (default): the loss is the binary cross-entropy between sigmoid(delta) and the PWRM's p;
    `odpo.labels="hard"` binarises p at 1/2 (sigmoid DPO; a tie drops the pair), as TRL does with judges;
  - loops: a response caught in a loop (no EOS within the limit, or the repetition detector
    `rewards.format.is_looping`) loses with probability 1; when both loop the pair is dropped;
  - beta rescaling, `odpo.beta_rescale="length"` (default): the paper names it without a formula. We scale
    beta per pair by beta_tokens / (the pair's mean response length), so delta is a difference of per-token
    log-ratios: its size (and the loss's curvature) does not grow with the length of the responses, which
    otherwise vary by 10x within a batch and make long pairs dominate the step. "none": beta as given.

The held-out eval answers the eval prompts greedily and reports accuracy, mean length, truncation and loop
rates, and the win rate against the starting policy's answers by the stated rule (`rewards/judge.py`).
Everything else (resume, SIGTERM, checkpoints) is the shared loop's: the prompt iterator's position is in
each checkpoint and the rollout RNG is a function of the seed and the step, so a killed run resumes to the
same result. With `init_from` empty the job first makes its SFT model (`sft_stage`), and with `odpo.pwrm`
empty its PWRM (`pwrm_stage`, from that SFT model), each in its own directory.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ministral_jax.checkpoint import convert
from ministral_jax.errors import UserError
from ministral_jax.eval import responses
from ministral_jax.model.config import ModelConfig
from ministral_jax.rewards import math_verifier, pwrm
from ministral_jax.sample import sampler
from ministral_jax.train import dpo, grpo, loop, sft

ROW_FEATURES = ("label", "pair_weight", "length", "loops", "truncated", "pwrm_p")  # [rows, 1] float32


def odpo_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      pwrm="",  # a train_pwrm job's params; its calibration.json beside them gives the temperature
      pwrm_temperature=0.0,  # 0: the fitted one
      pwrm_seq_len=512,  # the judgment's width; longer responses are cut to fit
      strip_thinking=False,  # the PWRM reads the answers alone (reasoning models)
      beta=0.1, labels="soft", beta_rescale="length", beta_tokens=32,
      sampling=dict(temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=128),
      loop=responses.loop_config(),
      eval_problems=64, eval_batch=64, eval_at_start=True))


def check(cfg: ml_collections.ConfigDict) -> None:
  o, problems = cfg.odpo, []
  if cfg.data.source != "chat":
    problems.append(f"data.source={cfg.data.source!r}: Online DPO samples answers to prompts from conversations; "
                    "set data.source='chat'")
  problems += dpo.loss_problems(o, "odpo")
  if o.beta_rescale not in ("none", "length") or not o.beta_tokens > 0:
    problems.append(f"odpo.beta_rescale={o.beta_rescale!r}, beta_tokens={o.beta_tokens!r}: 'none' or 'length', "
                    "and a positive token count")
  problems += [f"odpo.sampling.{p}" for p in grpo.sampling_of(o).check()]
  if o.sampling.temperature <= 0:
    problems.append("odpo.sampling.temperature must be positive: the two samples of a prompt must differ")
  if o.pwrm_temperature < 0 or o.eval_problems < 1 or o.eval_batch < 1:
    problems.append("odpo.pwrm_temperature >= 0 (0: the fitted one), odpo.eval_problems and eval_batch >= 1")
  if not o.pwrm and not (cfg.get("pwrm_stage") and cfg.pwrm_stage.get("task")):
    problems.append("odpo.pwrm is empty: name a train_pwrm job's <workdir>/params, or give a pwrm_stage config")
  problems += sft.start_problems(cfg, "Online DPO")
  if problems:
    raise UserError("The ODPO config has problems:\n  " + "\n  ".join(problems))


def labels(p: np.ndarray, loops_1: np.ndarray, loops_2: np.ndarray, hard: bool) -> tuple[np.ndarray, np.ndarray]:
  """`[pairs]` (label, weight): the PWRM's p, overruled by the loop rule (a looping response loses with
  probability 1; both looping: weight 0); `hard` binarises at 1/2 (a tie: weight 0)."""
  label = np.where(loops_1 & ~loops_2, 0.0, np.where(loops_2 & ~loops_1, 1.0, p))
  weight = ~(loops_1 & loops_2)
  if hard:
    weight &= label != 0.5
    label = (label > 0.5).astype(np.float64)
  return label.astype(np.float32), weight.astype(np.float32)


class ODPO:
  """The rollout (sample two, judge, label), the loss (DPO's), the eval (greedy answers, rule-judged)."""

  def __init__(self, cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, partitioner, reference: Any):
    self.cfg, self.o, self.model_cfg, self.partitioner = cfg, cfg.odpo, model_cfg, partitioner
    self.reference, self.sampling = reference, grpo.sampling_of(cfg.odpo)
    self.judge: pwrm.Judge | None = None
    self.width = 0
    self.verifiers = math_verifier.LazyPool()
    self._baseline = None  # the starting policy's eval answers, made once

  def train_data(self, data_cfg, tokenizer, global_batch: int, seed: int, rows: tuple[int, int]):
    items = grpo.prompts(data_cfg, tokenizer, "train", self.sampling.max_new_tokens, self.model_cfg.max_seq_len)
    it = grpo.PromptIterator(items, global_batch, rows, seed)
    self.width = it.width
    self.judge = pwrm.Judge(self.o.pwrm, tokenizer, self.partitioner, self.o.pwrm_seq_len, self.o.pwrm_temperature)
    return it

  def rollout(self, params: Any, batch: dict, step: int, tokenizer) -> dict:
    rng = jax.random.fold_in(jax.random.key(self.cfg.seed + 2), step)
    out = sampler.rollout(params, self.model_cfg, batch["prompts"], self.sampling, rng, samples=2,
                          stop_ids=[tokenizer.eos_id], partitioner=self.partitioner, width=self.width)
    completions = out.completions()
    texts = grpo.decode(tokenizer, completions)
    loops = np.asarray([responses.looping(c, s, self.o.loop) for c, s in zip(completions, out.stopped)])
    read = [pwrm.response_text(t, self.o.strip_thinking) for t in texts]
    p = self.judge.probabilities([pwrm.Judgment(m, read[2 * i], read[2 * i + 1])
                                  for i, m in enumerate(batch["messages"])])
    label, weight = labels(p, loops[0::2], loops[1::2], self.o.labels == "hard")
    rows = grpo.training_rows(batch["prompts"], out, 2, self.width + self.sampling.max_new_tokens,
                              self.model_cfg.pad_id)
    rows.pop("old_logp")
    per_row = {"label": np.repeat(label, 2), "pair_weight": np.repeat(weight, 2), "length": out.lengths,
               "loops": loops, "truncated": ~out.stopped, "pwrm_p": np.repeat(p, 2)}
    rows.update({k: np.asarray(v, np.float32)[:, None] for k, v in per_row.items()})
    return self.partitioner.shard_batch(rows)

  def loss_fn(self):
    dpo_loss_fn = dpo.make_loss(self.model_cfg, self.o, self.cfg.loss.seq_chunk, labels_from_batch=True)

    def loss(params, batch, reference, rng):
      loss_sum, count, stats = dpo_loss_fn(params, batch, reference, rng)
      # the rollout's statistics over every sampled response, scaled so that the loop's division by the
      # number of pairs kept (at least 1) leaves their means
      scale = jnp.maximum(count, 1.0)
      for k in ("length", "loops", "truncated", "pwrm_p", "pair_weight"):
        stats[{"pair_weight": "pairs_kept", "loops": "loop_rate"}.get(k, k)] = jnp.mean(batch[k]) * scale
      # how sure the judge is: 0 when every p is 1/2 (soft labels then teach nothing), 1 when every p is 0 or 1
      stats["pwrm_confidence"] = jnp.mean(jnp.abs(2 * batch["pwrm_p"] - 1)) * scale
      return loss_sum, count, stats
    return loss

  def evaluate(self, params: Any, tokenizer) -> dict[str, float]:
    items = grpo.prompts(self.cfg.data, tokenizer, "eval", self.sampling.max_new_tokens,
                         self.model_cfg.max_seq_len)[:self.o.eval_problems]
    answer = lambda p: responses.respond(p, self.model_cfg, [i.ids for i in items], [i.reference for i in items],
                                         tokenizer, self.sampling.max_new_tokens, self.o.eval_batch, self.verifiers.get(),
                                         self.o.loop)
    if self._baseline is None:
      self._baseline = answer(self.reference)
    return {f"eval_{k}": v for k, v in responses.summary(answer(params), self._baseline).items()}

  def task(self) -> loop.Task:
    return loop.Task("odpo", self.loss_fn(), frozen=self.reference, row_group=2,
                     frozen_shardings=self.partitioner.param_shardings(self.model_cfg), train_data=self.train_data,
                     rollout=self.rollout, evaluate=self.evaluate, eval_at_start=self.o.eval_at_start,
                     perplexity=False, tokens_per_step=2 * self.cfg.train.global_batch * self.sampling.max_new_tokens,
                     close=self.verifiers.close)


def make_task(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, partitioner) -> loop.Task:
  reference, _ = convert.load_or_init(cfg.init_from, model_cfg, partitioner, cfg.seed)
  return ODPO(cfg, model_cfg, partitioner, reference).task()


def prepare(cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Its SFT starting point (`sft_stage`, in <workdir>/sft), then its PWRM (`pwrm_stage`, in <workdir>/pwrm,
  from that SFT model unless it names its own start), when it makes them itself."""
  from ministral_jax import multihost
  from ministral_jax.train import pwrm as pwrm_job
  cfg = sft.prepare_after_stage(cfg, workdir, "odpo")
  if not cfg.odpo.pwrm:
    stage = copy.deepcopy(cfg.pwrm_stage)
    with stage.unlocked():
      stage.init_from = stage.init_from or cfg.init_from
      stage.train.log_prefix = "[odpo pwrm]"
    pwrm_job.run(stage, str(epath.Path(workdir) / "pwrm"))
    multihost.sync("odpo:pwrm-stage")
    with cfg.unlocked():
      cfg.odpo.pwrm = str(epath.Path(workdir) / "pwrm" / "params")
  return cfg


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  check(cfg)
  cfg = prepare(cfg, workdir)
  return loop.run(cfg, workdir, make_task, sources=lambda c: {"odpo.pwrm": c.odpo.pwrm})


def batch_shapes(cfg: ml_collections.ConfigDict, prompt_width: int) -> dict[str, tuple]:
  """The step's batch as (shape, dtype) per feature: for compiling it from shapes alone."""
  rows, width = 2 * cfg.train.global_batch, prompt_width + cfg.odpo.sampling.max_new_tokens
  ints = {k: ((rows, width), jnp.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
  return {**ints, "loss_mask": ((rows, width), jnp.float32), **{k: ((rows, 1), jnp.float32) for k in ROW_FEATURES}}


def compile_abstract(cfg: ml_collections.ConfigDict, partitioner, prompt_width: int,
                     pwrm_cfg: ModelConfig) -> tuple[Any, Any, Any]:
  """This job's three programs from shapes alone, for prompts bucketed to `prompt_width`: the rollout (two
  samples per prompt), the PWRM's judgment of `odpo.pwrm_seq_len`-token rows, and the DPO step (policy and
  frozen reference). The real-size check, with no checkpoint read."""
  from ministral_jax.train import checkpointing
  from ministral_jax.model import transformer
  model_cfg = ModelConfig.from_dict(cfg.model)
  abstract = lambda m: checkpointing.abstract_with_shardings(transformer.abstract_params(m),
                                                             partitioner.param_shardings(m))
  params, judge_params = abstract(model_cfg), abstract(pwrm_cfg)
  prompts = cfg.train.global_batch
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=partitioner.batch_sharding(len(shape)))
  judge_rows = {k: sds((2 * prompts, cfg.odpo.pwrm_seq_len), jnp.int32) for k in pwrm.FEATURES}
  with partitioner.activate():
    rollout = sampler._rollout.lower(  # pylint: disable=protected-access
        params, model_cfg, sds((prompts, prompt_width), jnp.int32), sds((prompts,), jnp.int32),
        sds((prompts, 1), jnp.int32), jax.random.key(0), grpo.sampling_of(cfg.odpo), 2).compile()
    judge = jax.jit(lambda p, b: pwrm.pair_logits(pwrm_cfg, p, b, pwrm.Choice((), 1, 2))).lower(
        judge_params, judge_rows).compile()
  task = ODPO(cfg, model_cfg, partitioner, params).task()
  step = loop.compile_step(cfg, task, model_cfg, partitioner, batch_shapes(cfg, prompt_width))
  return rollout, judge, step
