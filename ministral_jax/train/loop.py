"""The one training loop, shared by every trainer (pretrain, distill, and later SFT, ODPO, GRPO).

A trainer contributes a `Task`: its loss on a batch, plus any frozen trees
(a teacher's params) the loss reads. Everything else is here and written
once: validation before any work, one job per workdir (a lock), the sharded
train state, the jitted step with gradient accumulation, metrics, periodic
eval, async checkpoints with the data-iterator state, resume from
`--workdir`, SIGTERM, and non-finite losses.

A job is done when `<workdir>/params` exists. The order of each step's
housekeeping is what makes a kill at any moment survivable: metrics, then the
checkpoint, then the eval (an eval that fails never costs the steps before
it, and one a kill cut off runs again on resume); after the last checkpoint,
the final params. A re-run whose checkpoints already reach `train.steps`
writes the params instead of saying it is done. After SIGTERM the loop saves,
then raises `errors.Preempted` (exit status 75), so nothing after it treats
the job as finished.

The step never syncs with the host. The loop keeps each step's loss on the
device and fetches them in one transfer at every log or checkpoint step; a
non-finite loss found there stops the run before the bad state is saved, so
the last checkpoint stays good.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import struct

from ministral_jax import config_checks, faults, sharding, workdir_lock
from ministral_jax.checkpoint import convert, orbax_io
from ministral_jax.data import pipeline, tokenizers
from ministral_jax.errors import Preempted, UserError
from ministral_jax.model import config as model_config
from ministral_jax.model import transformer
from ministral_jax.train import checkpointing, metrics, optimizer, preemption

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
  extra_flops_per_token: float = 0.0  # matmuls outside the model's own fwd+bwd (a teacher's forward)
  # Where batches come from: (data_cfg, tokenizer, global_batch, seed, rows) -> a checkpointable iterator of
  # this process's rows, and (data_cfg, tokenizer, batch_size, max_batches, rows) -> eval batches. Offline
  # trainers read files (the document stream by default, conversations for SFT); online trainers sample.
  train_data: Callable[..., Any] = pipeline.train_iterator
  eval_data: Callable[..., Any] = pipeline.eval_batches
  # Online trainers (GRPO, ODPO) make each step's batch from the live params: (params, what train_data
  # yielded, step, tokenizer) -> the sharded device batch. The params never leave the devices.
  rollout: Callable[..., Any] | None = None
  # A step that is not one optimizer update (GRPO: several passes over minibatches): tx -> step(state,
  # batch, frozen) -> (state, metrics); `updates_per_step` optimizer updates per step (for the schedule).
  make_step: Callable[..., Callable] | None = None
  updates_per_step: int = 1
  # A periodic eval that is not a loss (GRPO: held-out accuracy): (params, tokenizer) -> metrics.
  evaluate: Callable[..., dict] | None = None
  # Metrics reported beside the eval loss (SFT on image QA: held-out answer accuracy): same signature.
  extra_eval: Callable[..., dict] | None = None
  eval_at_start: bool = False  # also evaluate the starting params (step 0): the "before" of a fine-tune
  tokens_per_step: int = 0  # for tokens/s (default: global_batch x seq_len)
  perplexity: bool = True  # the eval loss is a token NLL, so exp(loss) is reported as eval_ppl
  close: Callable[[], None] | None = None  # releases what the task holds (a verifier pool)
  row_group: int = 1  # rows that stay in one microbatch (2: a preference pair's two rows, 2i and 2i + 1)


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def train_config(steps: int = 100, global_batch: int = 8) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=steps, global_batch=global_batch, grad_accum=1, log_every=10, eval_every=50, eval_batches=4,
      checkpoint_every=50, keep_checkpoints=2, async_checkpoints=True, peak_flops_per_device=0.0,
      log_prefix="",  # e.g. "[cascade 2/7 child60/short]" on every console line
      allow_resume_changes=False,  # resume a checkpoint trained with other settings (checkpointing.RESUMABLE)
      flops_after=0.0))  # the work after this job (the rest of a cascade), for total_eta_min


class NonFiniteLoss(UserError):
  pass


def _check_batching(cfg: ml_collections.ConfigDict, partitioner: sharding.Partitioner) -> None:
  t = cfg.train
  partitioner.check_batch(t.global_batch)
  if t.global_batch % t.grad_accum:
    raise UserError(f"train.global_batch={t.global_batch} must split into train.grad_accum={t.grad_accum} "
                    "equal microbatches.")
  partitioner.check_batch(t.global_batch // t.grad_accum)
  partitioner.process_rows(t.global_batch)


def make_train_step(task: Task, tx, grad_accum: int, seed: int) -> Callable:
  def step(state: TrainState, batch: dict, frozen: Any):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    grad_fn = jax.value_and_grad(lambda p, b: _with_aux(task.loss_fn(p, b, frozen, rng)), has_aux=True)
    loss_sum, count, aux, grads = accumulate_gradients(grad_fn, state.params, batch, grad_accum, task.row_group)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)  # gradient of the mean over all tokens
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, updates)
    out = {"loss": loss_sum / count, "grad_norm": global_norm(grads), "update_norm": global_norm(updates),
           "tokens": count,
           **{k: v / count for k, v in aux.items()}}
    return TrainState(state.step + 1, params, opt_state), out
  return step


def accumulate_gradients(grad_fn: Callable, params: Any, batch: dict, parts: int, group: int = 1
                         ) -> tuple[Any, Any, Any, Any]:
  """(loss_sum, count, aux, grads) of `grad_fn(params, rows) -> ((loss_sum, (count, aux)), grads)`, summed over
  `parts` microbatches run one after another (the activation memory of one).

  Microbatch m holds the row groups m, m + parts, ... (a group: `group` adjacent rows, e.g. a preference pair):
  on a mesh each microbatch then spans every batch shard, where a split into contiguous blocks would leave each
  block on a few devices."""
  if parts == 1:
    (loss_sum, (count, aux)), grads = grad_fn(params, batch)
    return loss_sum, count, aux, grads
  micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, parts, group, *x.shape[1:]), 0, 1).reshape(
      parts, -1, *x.shape[1:]), batch)

  def one(mb):
    (loss_sum, (count, aux)), grads = grad_fn(params, mb)
    return loss_sum, count, aux, grads
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: one(jax.tree.map(lambda x: x[0], micro))))
  return jax.lax.scan(lambda total, mb: (jax.tree.map(jnp.add, total, one(mb)), None), zeros, micro)[0]


def _with_aux(result):
  loss_sum, count, aux = result
  return loss_sum, (count, aux)


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _abstract_state(model_cfg, tx, partitioner, param_shardings) -> tuple[TrainState, TrainState]:
  """The train state's shapes and its shardings by the rules (step replicated, optimizer state like params)."""
  abstract_state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                                  transformer.abstract_params(model_cfg))
  replicated = jax.sharding.NamedSharding(partitioner.mesh, jax.sharding.PartitionSpec())
  return abstract_state, TrainState(replicated, param_shardings,
                                    partitioner.like_params(abstract_state.opt_state, param_shardings))


def compile_step(cfg: ml_collections.ConfigDict, task: Task, model_cfg: model_config.ModelConfig,
                 partitioner: sharding.Partitioner, features: Sequence[str] | dict[str, tuple]) -> Any:
  """The job's exact train step lowered and compiled from shapes alone (real sizes on a simulated mesh):
  `task.frozen` may hold ShapeDtypeStructs. `features` names the batch's `[global_batch, seq_len]` int32
  arrays, or maps each name to its (shape, dtype). Returns the compiled program (`.memory_analysis()`)."""
  tx, _ = optimizer.make_optimizer(cfg.optimizer, cfg.train.steps * task.updates_per_step,
                                  optimizer.frozen_params(model_cfg))
  param_shardings = partitioner.param_shardings(model_cfg)
  abstract_state, state_shardings = _abstract_state(model_cfg, tx, partitioner, param_shardings)
  state = checkpointing.abstract_with_shardings(abstract_state, state_shardings)
  batch_sharding = partitioner.batch_sharding(2)
  if not isinstance(features, dict):
    features = {k: ((cfg.train.global_batch, cfg.data.seq_len), jnp.int32) for k in features}
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for k, (shape, dtype) in features.items()}
  with partitioner.activate():
    return _jit_step(cfg, task, tx, state_shardings, partitioner).lower(state, batch, task.frozen).compile()


def _jit_step(cfg, task: Task, tx, state_shardings: TrainState, partitioner: sharding.Partitioner) -> Callable:
  """The train step, jitted with the state and batch shardings; the state is donated."""
  step = task.make_step(tx) if task.make_step else make_train_step(task, tx, cfg.train.grad_accum, cfg.seed)
  return jax.jit(step,
                 in_shardings=(state_shardings, partitioner.batch_sharding(2), task.frozen_shardings),
                 out_shardings=(state_shardings, state_shardings.step), donate_argnums=(0,))


def _start_state(cfg, model_cfg, tx, partitioner, param_shardings, mngr, workdir, data, expected):
  """The newest intact checkpoint's state (and data-iterator state), or a fresh one; sharded by the rules."""
  abstract_state, state_shardings = _abstract_state(model_cfg, tx, partitioner, param_shardings)
  restored = checkpointing.restore_intact(
      mngr, workdir, checkpointing.abstract_with_shardings(abstract_state, state_shardings), expected,
      cfg.train.allow_resume_changes)
  if restored is not None:
    step, state, data_state = restored
    data.set_state(data_state)
    print(f"{_prefix(cfg)}resumed from step {step} of {cfg.train.steps} ({workdir})", flush=True)
    return state, state_shardings
  params, _ = convert.load_or_init(cfg.get("init_from", ""), model_cfg, partitioner, cfg.seed,
                                   allow_rope_change=True)  # e.g. a long-context stage from a short one
  state = TrainState(jnp.zeros((), jnp.int32), params,
                     jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params))
  return jax.device_put(state, state_shardings), state_shardings


def _prefix(cfg: ml_collections.ConfigDict) -> str:
  return f"{cfg.train.log_prefix} " if cfg.train.log_prefix else ""


def check(cfg: ml_collections.ConfigDict, workdir: str, sources: dict[str, str]
          ) -> tuple[model_config.ModelConfig, sharding.Partitioner]:
  """Everything about a training job that can be wrong, before anything is written or loaded."""
  config_checks.require(config_checks.workdir(workdir) + config_checks.training_job(cfg))
  model_cfg = model_config.ModelConfig.from_dict(cfg.model)
  problems = []
  if cfg.data.seq_len > model_cfg.max_seq_len:
    problems.append(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}; "
                    "lower data.seq_len or raise model.max_seq_len (with RoPE scaling to match)")
  if cfg.data.tokenizer == "spm_train" and cfg.data.spm_vocab_size > model_cfg.vocab_size:
    problems.append(f"data.spm_vocab_size={cfg.data.spm_vocab_size} exceeds model.vocab_size="
                    f"{model_cfg.vocab_size}; lower it")
  for what, path in sources.items():
    if path and not epath.Path(path).exists():
      problems.append(f"{what}={path!r} does not exist; point it at an orbax, HF or Mistral-native checkpoint "
                      "directory (e.g. another run's <workdir>/params)")
  config_checks.require(problems)
  partitioner = sharding.Partitioner.from_config(cfg.mesh)
  partitioner.param_shardings(model_cfg)
  partitioner.check_sequence(cfg.data.seq_len)
  _check_batching(cfg, partitioner)
  pipeline.documents(cfg.data, "train")  # an empty corpus fails here
  if cfg.train.eval_every:
    try:
      pipeline.documents(cfg.data, "eval")
    except UserError as e:
      raise UserError(f"{e}: the periodic eval (train.eval_every={cfg.train.eval_every}) would fail. Give it "
                      "documents (data.eval_paths) or set train.eval_every=0.") from None
  return model_cfg, partitioner


def run(cfg: ml_collections.ConfigDict, workdir: str, make_task: Callable,
        sources: Callable[[ml_collections.ConfigDict], dict[str, str]] | None = None) -> dict:
  """Trains `cfg.train.steps` steps (resuming from `workdir`) and writes `<workdir>/params`; returns the
  last logged metrics. `sources(cfg)` names the checkpoints the trainer reads besides `init_from`
  (e.g. {"distill.teacher": path}): they must exist and share the data's tokenizer."""
  preemption.install()
  if not cfg.train.log_prefix and cfg.get("task"):  # every progress line names its job
    cfg = cfg.copy_and_resolve_references()
    cfg.train.log_prefix = f"[{cfg.task}]"
  sources = {"init_from": cfg.get("init_from", ""), **(sources(cfg) if sources else {})}
  model_cfg, partitioner = check(cfg, workdir, sources)
  with workdir_lock.hold(workdir):
    return _run(cfg, workdir, make_task, model_cfg, partitioner, sources)


def _run(cfg, workdir, make_task, model_cfg, partitioner, sources) -> dict:
  tokenizer = pipeline.build_tokenizer(cfg.data, workdir)
  tokenizers.check_vocab_fits(tokenizer, model_cfg.vocab_size)
  token_id = tokenizer.identity()
  for what, path in sources.items():
    if path:
      tokenizers.check_same(convert.recorded_tokenizer(path), token_id, f"{what}={path}", "this job's data")
  expected = {"model": model_cfg.to_dict(), "task": None, "settings": checkpointing.settings(cfg),
              "tokenizer": token_id}
  out = epath.Path(workdir) / "params"
  task: Task = make_task(cfg, model_cfg, partitioner)
  expected["task"] = task.name
  tx, schedule = optimizer.make_optimizer(cfg.optimizer, cfg.train.steps * task.updates_per_step,
                                         optimizer.frozen_params(model_cfg))
  rows = partitioner.process_rows(cfg.train.global_batch)
  data = task.train_data(cfg.data, tokenizer, cfg.train.global_batch, seed=cfg.seed, rows=rows)
  if cfg.train.eval_every and not task.evaluate:  # a bad eval record fails now, before the checkpoints exist
    task.eval_data(cfg.data, tokenizer, cfg.train.global_batch, max_batches=1, rows=rows)
  mngr = checkpointing.manager(workdir, cfg.train.keep_checkpoints, cfg.train.async_checkpoints)
  if out.exists() and mngr.latest_step() in (None, cfg.train.steps):
    mngr.close()
    if task.close:
      task.close()
    print(f"{_prefix(cfg)}{workdir} is finished: its final params are in {out}; nothing to do.", flush=True)
    return {}
  param_shardings = partitioner.param_shardings(model_cfg)
  state, state_shardings = _start_state(cfg, model_cfg, tx, partitioner, param_shardings, mngr, workdir, data,
                                        expected)
  step_fn = _jit_step(cfg, task, tx, state_shardings, partitioner)
  eval_loss = task.eval_loss_fn or task.loss_fn
  loss_eval = jax.jit(lambda p, b, f: eval_loss(p, b, f, jax.random.key(0)),
                      in_shardings=(param_shardings, partitioner.batch_sharding(2), task.frozen_shardings))
  eval_fn = ((lambda params: task.evaluate(params, tokenizer)) if task.evaluate else
             (lambda params: {**evaluate(loss_eval, params, task, cfg, tokenizer, partitioner),
                              **(task.extra_eval(params, tokenizer) if task.extra_eval else {})}))
  start_step = int(state.step)
  writer = metrics.MetricsWriter(workdir, start_step, prefix=cfg.train.log_prefix)
  meta = {k: expected[k] for k in ("model", "task", "settings", "tokenizer")}
  try:
    with partitioner.activate():
      eval_key = "eval_accuracy" if task.evaluate else "eval_loss"
      if start_step and _eval_due(cfg.train, start_step) and not writer.logged(start_step, eval_key):
        writer.write(start_step, eval_fn(state.params), console=True)  # the eval a kill cut off
      if not start_step and task.eval_at_start and cfg.train.eval_every:
        writer.write(0, eval_fn(state.params), console=True)
      state, last, stopped = _train(cfg, state, data, step_fn, eval_fn, task, tokenizer, partitioner, mngr,
                                    writer, schedule, meta, model_cfg)
  finally:  # an async save in flight still commits, even when a step raised
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    if task.close:
      task.close()
  if stopped:
    raise Preempted(workdir, int(state.step))
  if int(state.step) == cfg.train.steps and (int(state.step) > start_step or not out.exists()):
    faults.point("loop.after_final_checkpoint")
    orbax_io.save_params(out, state.params, model_cfg, overwrite=True,
                         extra_metadata={"task": task.name, "step": cfg.train.steps, "tokenizer": token_id})
  return last


def _eval_due(t: ml_collections.ConfigDict, step: int) -> bool:
  return bool(t.eval_every) and (step % t.eval_every == 0 or step == t.steps)


def _train(cfg, state, data, step_fn, eval_fn, task, tokenizer, partitioner, mngr, writer, schedule, meta,
           model_cfg):
  t = cfg.train
  tokens_per_step = task.tokens_per_step or t.global_batch * cfg.data.seq_len
  model_flops = model_config.flops_per_token(model_cfg, cfg.data.seq_len)
  speed = metrics.Throughput(model_flops, metrics.peak_flops_per_device(t.peak_flops_per_device), t.steps,
                             job_flops_per_token=model_flops + task.extra_flops_per_token,
                             flops_after=t.flops_after)
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
      values["lr"] = float(schedule((s - 1) * task.updates_per_step))
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
    batch = (task.rollout(state.params, batch, step, tokenizer) if task.rollout
             else partitioner.shard_batch(batch))
    state, out = step_fn(state, batch, task.frozen)
    pending.append((step, out))
    faults.point("loop.after_step")
    stop = preemption.reached(step) and step < t.steps  # the last step finishes the job instead
    save = step % t.checkpoint_every == 0 or step == t.steps or stop
    if save or step % t.log_every == 0:
      last = flush(step) or last
      mngr.check_for_errors()  # an async save that failed (a full disk) stops the run now, not at the end
    if save:
      checkpointing.save(mngr, step, state, data.get_state(), meta, force=stop)
    if stop:
      return state, last, True
    if _eval_due(t, step):
      writer.write(step, eval_fn(state.params), console=True)
  return state, last, False


def evaluate(eval_fn, params, task: Task, cfg, tokenizer, partitioner) -> dict[str, float]:
  """Mean loss over the eval split (or its first `train.eval_batches`), the task's other statistics per counted
  item, and the perplexity when the loss is a token NLL."""
  total, count, sums = 0.0, 0.0, {}
  batches = task.eval_data(cfg.data, tokenizer, cfg.train.global_batch, max_batches=cfg.train.eval_batches,
                           rows=partitioner.process_rows(cfg.train.global_batch))
  for batch in batches:
    loss_sum, n, aux = jax.device_get(eval_fn(params, partitioner.shard_batch(batch), task.frozen))
    total, count = total + float(loss_sum), count + float(n)
    sums = {k: sums.get(k, 0.0) + float(v) for k, v in aux.items()}
  if count == 0:
    raise UserError("The eval split produced no tokens; check data.eval_paths / the eval split.")
  out = {"eval_loss": total / count, **{f"eval_{k}": v / count for k, v in sums.items()}}
  if task.perplexity:
    out["eval_ppl"] = float(np.exp(total / count))
  return out

