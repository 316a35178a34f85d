"""The one training loop, shared by every trainer (pretrain, distill, and later SFT, ODPO, GRPO).

A trainer contributes a `Task`: its loss on a batch, plus any frozen trees
(a teacher's params) the loss reads. Everything else is here and written
once: validation before any work, the sharded train state, the jitted step
with gradient accumulation, metrics, periodic eval, async checkpoints with
the data-iterator state, resume from `--workdir`, SIGTERM, and non-finite
losses.

The step never syncs with the host. The loop keeps each step's loss on the
device and fetches them in one transfer at every log or checkpoint step; a
non-finite loss found there stops the run before the bad state is saved, so
the last checkpoint stays good.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import struct

from ministral_jax import sharding
from ministral_jax.checkpoint import convert, orbax_io
from ministral_jax.data import pipeline, tokenizers
from ministral_jax.errors import UserError
from ministral_jax.model import config as model_config
from ministral_jax.model import transformer
from ministral_jax.train import checkpointing, metrics, optimizer

# (params, batch, frozen, rng) -> (loss_sum, token_count, aux scalars summed over tokens)
LossFn = Callable[[Any, dict, Any, jax.Array], tuple[jax.Array, jax.Array, dict]]


@dataclasses.dataclass
class Task:
  name: str
  loss_fn: LossFn
  frozen: Any = None  # passed to every step as an argument, never baked into the program
  frozen_shardings: Any = None
  # Periodic eval reports this loss (default: the training loss). Distillation evaluates
  # next-token loss, so eval numbers compare across trainers.
  eval_loss_fn: LossFn | None = None


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def train_config(steps: int = 100, global_batch: int = 8) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=steps, global_batch=global_batch, grad_accum=1, log_every=10, eval_every=50, eval_batches=4,
      checkpoint_every=50, keep_checkpoints=2, async_checkpoints=True, peak_flops_per_device=0.0,
      log_prefix=""))  # e.g. "[stage 2/7 child60 short]" on every console line


class NonFiniteLoss(RuntimeError):
  pass


def _check_batching(cfg: ml_collections.ConfigDict, partitioner: sharding.Partitioner) -> None:
  t = cfg.train
  partitioner.check_batch(t.global_batch)
  if t.global_batch % t.grad_accum or (t.global_batch // t.grad_accum) % jax.process_count():
    raise UserError(f"train.global_batch={t.global_batch} must split into train.grad_accum={t.grad_accum} "
                     f"microbatches, each divisible by the {jax.process_count()} processes.")
  partitioner.check_batch(t.global_batch // t.grad_accum)


def make_train_step(task: Task, tx, grad_accum: int, seed: int) -> Callable:
  def step(state: TrainState, batch: dict, frozen: Any):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    grad_fn = jax.value_and_grad(lambda p, b: _with_aux(task.loss_fn(p, b, frozen, rng)), has_aux=True)
    if grad_accum == 1:
      (loss_sum, (count, aux)), grads = grad_fn(state.params, batch)
    else:  # microbatches one after another: activation memory of one microbatch
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

      def body(carry, mb):
        (ls, (n, aux)), g = grad_fn(state.params, mb)
        return jax.tree.map(jnp.add, carry, (ls, n, aux, g)), None
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: _first_micro(grad_fn, state.params, micro)))
      (loss_sum, count, aux, grads), _ = jax.lax.scan(body, zeros, micro)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)  # gradient of the mean over all tokens
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, updates)
    out = {"loss": loss_sum / count, "grad_norm": _global_norm(grads), "update_norm": _global_norm(updates),
           "tokens": count,
           **{k: v / count for k, v in aux.items()}}
    return TrainState(state.step + 1, params, opt_state), out
  return step


def _with_aux(result):
  loss_sum, count, aux = result
  return loss_sum, (count, aux)


def _first_micro(grad_fn, params, micro):
  (ls, (n, aux)), g = grad_fn(params, jax.tree.map(lambda x: x[0], micro))
  return ls, n, aux, g


def _global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _install_sigterm() -> dict:
  flag = {"stop": False}

  def handler(signum, frame):
    del frame
    logging.warning("Signal %d: saving a checkpoint and exiting.", signum)
    flag["stop"] = True
  signal.signal(signal.SIGTERM, handler)
  return flag


def _start_state(cfg, model_cfg, tx, partitioner, param_shardings, mngr, latest, data):
  """A fresh state, or the latest checkpoint's (and its data-iterator state), sharded by the rules."""
  abstract_state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                                  transformer.abstract_params(model_cfg))
  replicated = jax.sharding.NamedSharding(partitioner.mesh, jax.sharding.PartitionSpec())
  state_shardings = TrainState(replicated, param_shardings,
                               partitioner.like_params(abstract_state.opt_state, param_shardings))
  if latest is None:
    params, _ = convert.load_or_init(cfg.get("init_from", ""), model_cfg, partitioner, cfg.seed,
                                     allow_rope_change=True)  # e.g. a long-context stage from a short one
    state = TrainState(jnp.zeros((), jnp.int32), params,
                       jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params))
    return jax.device_put(state, state_shardings), state_shardings
  state, data_state = checkpointing.restore(
      mngr, latest, checkpointing.abstract_with_shardings(abstract_state, state_shardings))
  data.set_state(data_state)
  logging.info("Resumed from step %d", latest)
  return state, state_shardings


def run(cfg: ml_collections.ConfigDict, workdir: str, make_task: Callable) -> dict:
  """Trains `cfg.train.steps` steps (resuming from `workdir`); returns the last logged metrics."""
  # ---- everything that can be wrong is checked before any work ----
  model_cfg = model_config.ModelConfig.from_dict(cfg.model)
  partitioner = sharding.Partitioner.from_config(cfg.mesh)
  param_shardings = partitioner.param_shardings(model_cfg)
  _check_batching(cfg, partitioner)
  tokenizer = pipeline.build_tokenizer(cfg.data, workdir)
  tokenizers.check_vocab_fits(tokenizer, model_cfg.vocab_size)
  task: Task = make_task(cfg, model_cfg, partitioner)
  tx, schedule = optimizer.make_optimizer(cfg.optimizer, cfg.train.steps)
  mngr = checkpointing.manager(workdir, cfg.train.keep_checkpoints, cfg.train.async_checkpoints)
  latest = mngr.latest_step()
  if latest is not None:
    checkpointing.check_same_experiment(mngr, latest, model_cfg, task.name, workdir)
  data = pipeline.train_iterator(cfg.data, tokenizer, cfg.train.global_batch // jax.process_count(),
                                 seed=cfg.seed, process_index=jax.process_index(),
                                 process_count=jax.process_count())

  state, state_shardings = _start_state(cfg, model_cfg, tx, partitioner, param_shardings, mngr, latest, data)
  step_fn = jax.jit(make_train_step(task, tx, cfg.train.grad_accum, cfg.seed),
                    in_shardings=(state_shardings, partitioner.batch_sharding(2), task.frozen_shardings),
                    out_shardings=(state_shardings, state_shardings.step), donate_argnums=(0,))
  eval_loss = task.eval_loss_fn or task.loss_fn
  eval_fn = jax.jit(lambda p, b, f: eval_loss(p, b, f, jax.random.key(0))[:2],
                    in_shardings=(param_shardings, partitioner.batch_sharding(2), task.frozen_shardings))
  start_step = int(state.step)
  writer = metrics.MetricsWriter(workdir, start_step, prefix=cfg.train.log_prefix)
  meta = {"model": model_cfg.to_dict(), "task": task.name}
  try:
    with partitioner.activate():
      state, last = _train(cfg, state, data, step_fn, eval_fn, task, tokenizer, partitioner, mngr,
                           writer, schedule, meta, model_cfg)
  finally:  # an async save in flight still commits, even when a step raised
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  if int(state.step) == cfg.train.steps > start_step:  # the final model, for eval, sampling, next stage
    orbax_io.save_params(epath.Path(workdir) / "params", state.params, model_cfg, overwrite=True,
                         extra_metadata={"task": task.name, "step": cfg.train.steps})
  return last


def _train(cfg, state, data, step_fn, eval_fn, task, tokenizer, partitioner, mngr, writer, schedule, meta,
           model_cfg):
  t = cfg.train
  tokens_per_step = t.global_batch * cfg.data.seq_len
  speed = metrics.Throughput(model_config.flops_per_token(model_cfg, cfg.data.seq_len),
                             metrics.peak_flops_per_device(t.peak_flops_per_device), t.steps)
  stop = _install_sigterm()
  pending: list[tuple[int, dict]] = []
  last: dict = {}
  speed.start(int(state.step))

  def flush(step: int) -> dict:
    """One device->host transfer for every step since the last flush."""
    values = {}
    for s, out in jax.device_get(pending):
      values = {k: float(v) for k, v in out.items()}
      bad = [k for k in ("loss", "grad_norm", "update_norm") if not np.isfinite(values[k])]
      if bad:
        raise NonFiniteLoss(f"Non-finite {', '.join(bad)} at step {s} (loss {values['loss']}). The last good "
                            f"checkpoint (step {mngr.latest_step()}) is intact; lower optimizer.lr or check "
                            "the data.")
      values["lr"] = float(schedule(s - 1))
      report = s == step and (s % t.log_every == 0 or s == t.steps)
      if report:
        values.update(speed.report(s, tokens_per_step), tokens_seen=s * tokens_per_step)
      writer.write(s, values, console=report)
    pending.clear()
    return values

  for step in range(int(state.step) + 1, t.steps + 1):
    batch = next(data, None)
    if batch is None:
      raise UserError(f"The training data ran out at step {step} of {t.steps}: data.epochs={cfg.data.epochs} "
                       f"pass(es) from document {cfg.data.start_document} on. Lower train.steps or raise "
                       "data.epochs (0 repeats forever).")
    state, out = step_fn(state, partitioner.shard_batch(batch), task.frozen)
    pending.append((step, out))
    save = step % t.checkpoint_every == 0 or step == t.steps or stop["stop"]
    if save or step % t.log_every == 0:
      last = flush(step) or last
    if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
      writer.write(step, evaluate(eval_fn, state.params, task.frozen, cfg, tokenizer, partitioner), console=True)
    if save:
      checkpointing.save(mngr, step, state, data.get_state(), meta, force=stop["stop"])
    if stop["stop"]:
      break
  return state, last


def evaluate(eval_fn, params, frozen, cfg, tokenizer, partitioner) -> dict[str, float]:
  """Mean token loss and perplexity over the eval split (or its first `train.eval_batches`)."""
  total, count = 0.0, 0.0
  batches = pipeline.eval_batches(cfg.data, tokenizer, cfg.train.global_batch // jax.process_count(),
                                  max_batches=cfg.train.eval_batches)
  for batch in batches:
    loss_sum, n = eval_fn(params, partitioner.shard_batch(batch), frozen)
    total, count = total + float(loss_sum), count + float(n)
  if count == 0:
    raise UserError("The eval split produced no tokens; check data.eval_paths / the eval split.")
  return {"eval_loss": total / count, "eval_ppl": float(np.exp(total / count))}

