"""Trainer `train_pwrm`: the pairwise reward model, trained on preference pairs, then temperature-calibrated.

Each step reads `train.global_batch` pairs (the DPO files: prompt, chosen, rejected, optional p), each in
both orders (`rewards/pwrm.py`), and minimises the binary cross-entropy between sigmoid(d) and the pair's
label (`dpo_loss.pair_losses`, the loss DPO uses, here on the PWRM's own margin d). `pwrm.strip_thinking`
shows the judge the answers alone, as Online DPO does for reasoning models. The periodic eval reports the
held-out loss and pairwise accuracy.

When training ends the job fits the temperature T of sigmoid(d / T) on the held-out pairs and writes
`<workdir>/calibration.json`: T, the pairwise accuracy, and the log-loss and expected calibration error
(ECE) before (T = 1) and after. Online DPO reads T from there. Resume, SIGTERM and checkpoints are the
shared loop's; a re-run of a finished job only (re)writes a missing calibration.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ministral_jax import files
from ministral_jax.checkpoint import convert
from ministral_jax.data import pipeline, preference
from ministral_jax.errors import UserError
from ministral_jax.model.config import ModelConfig
from ministral_jax.rewards import pwrm
from ministral_jax.train import dpo, dpo_loss, loop, sft


def pwrm_config(strip_thinking: bool = True) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(strip_thinking=strip_thinking, ece_bins=10))


def check(cfg: ml_collections.ConfigDict) -> None:
  problems = []
  if cfg.data.source != "preference":
    problems.append(f"data.source={cfg.data.source!r}: a PWRM trains on preference pairs; set "
                    "data.source='preference' and data.paths to JSONL files of {\"prompt\", \"chosen\", \"rejected\"}")
  problems += sft.start_problems(cfg, "A PWRM", reference=False)
  if cfg.pwrm.ece_bins < 2:
    problems.append(f"pwrm.ece_bins={cfg.pwrm.ece_bins}: at least 2")
  if problems:
    raise UserError("The train_pwrm config has problems:\n  " + "\n  ".join(problems))


def judgments(pairs: Sequence[preference.Pair], strip_thinking: bool) -> list[pwrm.Judgment]:
  out = []
  for pair in pairs:
    j = pwrm.Judgment(pair.prompt, pwrm.response_text(pair.first, strip_thinking),
                      pwrm.response_text(pair.second, strip_thinking), pair.p, pair.where)
    if j.first == j.second:
      raise UserError(f"{pair.where}: the two responses read the same to the PWRM (pwrm.strip_thinking="
                      f"{strip_thinking} leaves their answers alone); drop the pair or keep the thinking")
    out.append(j)
  return out


def batch_fn(tokenizer, width: int, strip_thinking: bool):
  return lambda pairs: pwrm.rows(judgments(pairs, strip_thinking), tokenizer, width)


def make_loss(model_cfg: ModelConfig, choices: pwrm.Choice) -> loop.LossFn:
  def loss_fn(params, batch, frozen, rng):
    del frozen, rng
    d = pwrm.pair_logits(model_cfg, params, batch, choices)  # [pairs]
    label = batch["label"][:, 0].reshape(-1, 2)[:, 0]
    real = (batch["loss_mask"].sum(axis=-1).reshape(-1, 2)[:, 0] > 0).astype(jnp.float32)
    agrees = jnp.where(label >= 0.5, d > 0, d < 0).astype(jnp.float32)
    stats = {"accuracy": jnp.sum(agrees * real), "margin": jnp.sum(d * real)}
    return jnp.sum(dpo_loss.pair_losses(d, label) * real), jnp.sum(real), stats
  return loss_fn


class PWRMTask:
  def __init__(self, cfg: ml_collections.ConfigDict, model_cfg: ModelConfig):
    self.cfg, self.model_cfg = cfg, model_cfg

  def rows_of(self, tokenizer):
    return batch_fn(tokenizer, self.cfg.data.seq_len, self.cfg.pwrm.strip_thinking)

  def train_data(self, data_cfg, tokenizer, global_batch, seed, rows):
    return preference.train_iterator(data_cfg, tokenizer, global_batch, seed, rows, self.rows_of(tokenizer))

  def eval_data(self, data_cfg, tokenizer, batch_size, max_batches=0, rows=None):
    return preference.eval_batches(data_cfg, tokenizer, batch_size, max_batches, rows, self.rows_of(tokenizer))


def make_task(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, partitioner) -> loop.Task:
  del partitioner
  tokenizer = pipeline.build_tokenizer(cfg.data, "")
  t = PWRMTask(cfg, model_cfg)
  return loop.Task("train_pwrm", make_loss(model_cfg, pwrm.choice(tokenizer)), row_group=2, train_data=t.train_data,
                   eval_data=t.eval_data, perplexity=False, tokens_per_step=2 * cfg.train.global_batch * cfg.data.seq_len)


def held_out_logits(cfg: ml_collections.ConfigDict, params_path: str) -> tuple[np.ndarray, np.ndarray]:
  """d and the label of every held-out pair, under the trained params (sharded like training)."""
  from ministral_jax import multihost, sharding
  partitioner = sharding.Partitioner.from_config(cfg.mesh)
  tokenizer = pipeline.build_tokenizer(cfg.data, "")
  params, model_cfg = convert.load_any(params_path, partitioner)
  choices = pwrm.choice(tokenizer)
  forward = jax.jit(lambda p, b: pwrm.pair_logits(model_cfg, p, b, choices),
                    in_shardings=(partitioner.param_shardings(model_cfg), partitioner.batch_sharding(2)))
  batch, rows = cfg.train.global_batch, partitioner.process_rows(cfg.train.global_batch)
  t = PWRMTask(cfg, model_cfg)
  ds, labels = [], []
  with partitioner.activate():
    for b in t.eval_data(cfg.data, tokenizer, batch, rows=rows):
      real = b["loss_mask"].sum(axis=-1).reshape(-1, 2)[:, 0] > 0
      d = multihost.local_rows(forward(params, partitioner.shard_batch(b)))
      ds.append(np.asarray(d)[real])
      labels.append(b["label"][::2, 0][real])
  gathered = multihost.gather_json([np.concatenate(ds).tolist(), np.concatenate(labels).tolist()])
  return (np.asarray([x for g in gathered for x in g[0]], np.float64),
          np.asarray([x for g in gathered for x in g[1]], np.float64))


def calibrate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fits T on the held-out pairs and writes `<workdir>/calibration.json` (once); returns its contents."""
  import json
  from ministral_jax import multihost
  path = epath.Path(workdir) / pwrm.CALIBRATION_FILE
  done = path.exists()
  multihost.sync("train_pwrm:calibration-checked")  # every process decides before process 0 may write it
  if done:
    return json.loads(path.read_text())
  d, labels = held_out_logits(cfg, str(epath.Path(workdir) / "params"))
  temperature = pwrm.fit_temperature(d, labels)
  prob = lambda t: 1.0 / (1.0 + np.exp(-d / t))
  bins = cfg.pwrm.ece_bins
  out = {"temperature": temperature, "eval_pairs": len(d),
         "accuracy": float(np.mean(np.where(labels >= 0.5, d > 0, d < 0))),
         "nll_before": pwrm.nll(d, labels, 1.0), "nll_after": pwrm.nll(d, labels, temperature),
         "ece_before": pwrm.expected_calibration_error(prob(1.0), labels, bins),
         "ece_after": pwrm.expected_calibration_error(prob(temperature), labels, bins)}
  if jax.process_index() == 0:
    files.write_json(path, out)
    if min(abs(np.log(temperature / b)) for b in pwrm.TEMPERATURE_BOUNDS) < 1e-3:
      logging.warning("The PWRM's fitted temperature %.3g is at the bound of %s: its held-out margins barely "
                      "track the labels; train it longer or check its pairs.", temperature, pwrm.TEMPERATURE_BOUNDS)
    print(f"[train_pwrm] held-out pairs {len(d)}: accuracy {out['accuracy']:.3f}; temperature {temperature:.4g}; "
          f"ECE {out['ece_before']:.3f} -> {out['ece_after']:.3f}; log-loss {out['nll_before']:.3f} -> "
          f"{out['nll_after']:.3f} ({path})", flush=True)
  multihost.sync("train_pwrm:calibration-written")
  return out


def prepare(cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Its SFT starting point and its rule pairs first, when it makes them itself (as `dpo.prepare`)."""
  return dpo.prepare(cfg, workdir, "train_pwrm")


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  check(cfg)
  cfg = prepare(cfg, workdir)
  last = loop.run(cfg, workdir, make_task)
  return {**last, **{f"calibration_{k}": v for k, v in calibrate(cfg, workdir).items()}}


def compile_abstract(cfg: ml_collections.ConfigDict, partitioner) -> Any:
  """This job's train step from shapes alone (both readings of `train.global_batch` pairs of `data.seq_len`
  tokens): the real-size check, with no checkpoint read. Returns the compiled program."""
  model_cfg = ModelConfig.from_dict(cfg.model)
  task = loop.Task("train_pwrm", make_loss(model_cfg, pwrm.Choice((), 1, 2)), row_group=2)
  rows = 2 * cfg.train.global_batch
  shapes = {k: ((rows, cfg.data.seq_len), jnp.int32) for k in pwrm.FEATURES}
  return loop.compile_step(cfg, task, model_cfg, partitioner, {**shapes, "label": ((rows, 1), jnp.float32)})
