"""Task `eval`: mean token loss and perplexity of a checkpoint on the eval split or on files.

The checkpoint is `eval.checkpoint` (orbax params, HF or Mistral-native), or,
when empty, the final params of a training run in `--workdir`
(`<workdir>/params`). Text is the built-in eval split of `config.data` plus
every file in `eval.files` (.txt or .jsonl). Results are printed and written
to `<workdir>/eval.json`.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
from etils import epath

from ministral_jax import sharding
from ministral_jax.files import write_json
from ministral_jax.checkpoint import convert
from ministral_jax.data import pipeline, tokenizers
from ministral_jax.errors import UserError
from ministral_jax.train import pretrain


def eval_config() -> ml_collections.ConfigDict:
  """Task `eval`'s fields, and task `lm_eval`'s (`eval/harness.py`), so either runs on any experiment's
  workdir."""
  from ministral_jax.eval import harness
  return ml_collections.ConfigDict(dict(checkpoint="", files="", batch_size=8, max_batches=0,
                                        **harness.harness_config()))


def mean_loss(loss_fn, params, batches, partitioner) -> dict[str, float]:
  total, count = 0.0, 0.0
  for batch in batches:
    loss_sum, n = loss_fn(params, partitioner.shard_batch(batch))
    total, count = total + float(loss_sum), count + float(n)
  if count == 0:
    raise UserError("The evaluation data produced no tokens.")
  return {"loss": total / count, "perplexity": float(np.exp(total / count)), "tokens": int(count)}


@functools.lru_cache(maxsize=16)
def _loss_fn(model_cfg, seq_chunk: int, vocab_chunk: int):
  loss = pretrain.make_loss(model_cfg, ml_collections.ConfigDict(dict(seq_chunk=seq_chunk, vocab_chunk=vocab_chunk)))
  return jax.jit(lambda p, b: loss(p, b, None, jax.random.key(0))[:2])


def evaluate(params, model_cfg, cfg: ml_collections.ConfigDict, tokenizer, partitioner,
             max_batches: int | None = None, only: list[str] | None = None) -> dict[str, float]:
  """Mean next-token loss of params already on the mesh: the eval split of `cfg.data`, then every
  `cfg.eval.files` entry, by name (`max_batches` overrides `cfg.eval.max_batches`; `only` keeps
  those sources)."""
  loss_fn = _loss_fn(model_cfg, cfg.loss.seq_chunk, cfg.loss.vocab_chunk)
  e = cfg.eval
  n = e.max_batches if max_batches is None else max_batches
  names = ["eval_split"] + [f for f in e.files.split(",") if f]
  rows = partitioner.process_rows(e.batch_size)
  sources = {}
  for name in (nm for nm in names if only is None or nm in only):
    sources[name] = (pipeline.eval_batches(cfg.data, tokenizer, e.batch_size, max_batches=n, rows=rows)
                     if name == "eval_split" else
                     pipeline.eval_batches_from_file(name, cfg.data, tokenizer, e.batch_size, max_batches=n, rows=rows))
  with partitioner.activate():
    return {name: mean_loss(loss_fn, params, b, partitioner)["loss"] for name, b in sources.items()}


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  path = cfg.eval.checkpoint or str(epath.Path(workdir) / "params")
  if not epath.Path(path).exists():
    raise UserError(f"There is no checkpoint to evaluate at {path}: set eval.checkpoint, or point --workdir at a "
                    "finished training run (its <workdir>/params).")
  files = [f for f in cfg.eval.files.split(",") if f]
  for f in files:
    if not epath.Path(f).exists():
      raise UserError(f"eval.files names {f}, which does not exist.")
  if cfg.eval.batch_size < 1 or cfg.eval.max_batches < 0:
    raise UserError(f"eval.batch_size={cfg.eval.batch_size} must be >= 1 and eval.max_batches="
                    f"{cfg.eval.max_batches} >= 0 (0: all).")
  partitioner = sharding.Partitioner.from_config(cfg.mesh)
  model_cfg = convert.load_config_any(path)
  partitioner.param_shardings(model_cfg)
  tokenizer = pipeline.build_tokenizer(cfg.data, workdir)
  tokenizers.check_vocab_fits(tokenizer, model_cfg.vocab_size)
  tokenizers.check_same(convert.recorded_tokenizer(path), tokenizer.identity(), f"checkpoint {path}",
                        "the eval data (data.tokenizer)")
  batch, rows = cfg.eval.batch_size, partitioner.process_rows(cfg.eval.batch_size)

  def sources():
    out = {"eval_split": pipeline.eval_batches(cfg.data, tokenizer, batch, max_batches=cfg.eval.max_batches,
                                               rows=rows)}
    for f in files:
      out[f] = pipeline.eval_batches_from_file(f, cfg.data, tokenizer, batch, max_batches=cfg.eval.max_batches,
                                               rows=rows)
    return out
  for name, batches in sources().items():  # an empty source is an error before the weights are read
    if next(batches, None) is None:
      raise UserError(f"The eval source {name} gives no tokens; give it text, or leave it out.")
  params, model_cfg = convert.load_any(path, partitioner)
  loss_fn = _loss_fn(model_cfg, cfg.loss.seq_chunk, cfg.loss.vocab_chunk)
  with partitioner.activate():
    results = {name: mean_loss(loss_fn, params, b, partitioner) for name, b in sources().items()}
  for name, r in results.items():
    print(f"{name}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f} over {r['tokens']:,} tokens")
  out = {"checkpoint": path, "results": results}
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  write_json(epath.Path(workdir) / "eval.json", out)
  return out
