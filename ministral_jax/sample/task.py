"""Task `sample`: build or restore a model in the workdir and continue a prompt.

The built-in default (`configs/tiny_sample.py`) needs no download: it
initialises a tiny random model with the Tekken vocabulary on the configured
mesh, saves it as an orbax params checkpoint in `<workdir>/params`, and
samples from it. Run again with the same workdir and it restores that
checkpoint instead of initialising a new one. `config.init_from` may name a
checkpoint to start from instead: an orbax directory, a Hugging Face
directory or a Mistral-native directory.
"""

from __future__ import annotations

import json
import logging
import time

import jax
import ml_collections
from etils import epath

from ministral_jax import sharding
from ministral_jax.checkpoint import convert, orbax_io
from ministral_jax.data import tokenizers
from ministral_jax.model import config as model_config
from ministral_jax.sample import sampler


def load_or_init(cfg: ml_collections.ConfigDict, workdir: epath.Path,
                 partitioner: sharding.Partitioner) -> tuple[dict, model_config.ModelConfig]:
  ckpt = workdir / "params"
  if ckpt.exists():
    logging.info("Restoring %s", ckpt)
    return orbax_io.load_params(ckpt, partitioner)
  params, model_cfg = convert.load_or_init(cfg.init_from, model_config.ModelConfig.from_dict(cfg.model),
                                           partitioner, cfg.seed)
  orbax_io.save_params(ckpt, params, model_cfg)
  return params, model_cfg


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  tokenizer = tokenizers.load_tokenizer(cfg.tokenizer)
  model_cfg = model_config.ModelConfig.from_dict(cfg.model)
  tokenizers.check_vocab_fits(tokenizer, model_cfg.vocab_size)  # before any work
  partitioner = sharding.Partitioner.from_config(cfg.mesh)
  partitioner.param_shardings(model_cfg)  # the mesh must divide the model
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  params, model_cfg = load_or_init(cfg, workdir, partitioner)
  prompts = [tokenizer.encode(p, bos=True) for p in cfg.prompts]
  start = time.time()
  with partitioner.activate():
    outputs = sampler.generate(params, model_cfg, prompts, cfg.max_new_tokens, cfg.temperature,
                               jax.random.key(cfg.seed))
  seconds = time.time() - start
  samples = [{"prompt": p, "completion": tokenizer.decode(o), "tokens": o}
             for p, o in zip(cfg.prompts, outputs)]
  for s in samples:
    print(f"{s['prompt']!r} -> {s['completion']!r}")
  result = {"params": model_config.param_count(model_cfg), "mesh": dict(partitioner.mesh.shape),
            "seconds": seconds, "samples": samples}
  (workdir / "samples.json").write_text(json.dumps(result, indent=2))
  print(f"{result['params']:,} parameters on mesh {result['mesh']}; "
        f"{len(prompts)} x {cfg.max_new_tokens} tokens in {seconds:.1f}s; wrote {workdir / 'samples.json'}")
  return result
