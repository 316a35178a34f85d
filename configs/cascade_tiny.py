r"""The built-in default: Cascade Distillation in miniature, on the built-in corpus, no download.

COMMAND: python -m ministral_jax.main --config=configs/cascade_tiny.py --workdir=/tmp/ministral_jax/cascade_tiny

Pretrains a tiny parent (4 layers, d_model 128, d_ffn 384, plain RoPE like
Mistral Small 3.1), then cascades to two children, ~57% and ~35% of the
parent's non-embedding parameters: prune, distill from the parent at 128
tokens, a long-context stage at 512 tokens (YaRN x4, query temperature on),
and trains each child's shape from scratch on as many tokens as the child saw
in distillation (the baselines). Writes report.md, report.json and
eval_loss.png to the workdir; about 15 minutes on 2 CPU cores. Kill it and run
the same command: it resumes where it stopped.

`configs/cascade_tiny.py:quick` is the same pipeline at toy sizes (about 40
seconds), for tests and Colab. Any field is a flag, e.g.
`--config.stages[0].short_steps=600 --config.distill.teacher=previous`.

Sweep (get_hyper): which teacher, the root parent (the paper) or the stage
before: `python -m launch.local --config=configs/cascade_tiny.py
--workdir=/tmp/ministral_jax/teacher_sweep` runs both cascades and writes sweep.md.
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.cascade import task as cascade
from ministral_jax.data import pipeline
from ministral_jax.eval import task as eval_task
from ministral_jax.model import config as model_config
from ministral_jax.prune import pruner
from ministral_jax.train import distill, loop, optimizer, pretrain


def get_hyper(h):
  return h.sweep("distill.teacher", ["parent", "previous"])


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  quick = arg == "quick"
  c = ml_collections.ConfigDict()
  c.task = "cascade"
  c.seed = 0
  c.data = pipeline.data_config()  # the built-in corpus; a SentencePiece trained on it
  c.data.update(spm_vocab_size=512 if quick else 1024, seq_len=64 if quick else 128, epochs=1,
                max_documents=120 if quick else 0)
  c.mesh = sharding.mesh_config(data=-1)
  c.train = loop.train_config(global_batch=8 if quick else 16)  # every training job's loop settings
  c.train.update(log_every=10 if quick else 50, eval_every=10 if quick else 50, eval_batches=2 if quick else 4,
                 checkpoint_every=10 if quick else 100)
  c.loss = pretrain.loss_config()
  c.eval = eval_task.eval_config()  # the report's evals: the eval split (+ eval.files)
  c.eval.max_batches = 2 if quick else 0

  # The parent: pretrained here unless `parent.checkpoint` names one (orbax, HF or native).
  c.parent = ml_collections.ConfigDict()
  c.parent.checkpoint = ""
  tiny = dict(vocab_size=512, n_layers=2, d_model=64, d_ffn=128) if quick else {}
  c.parent.model = model_config.preset_dict("cpu_tiny", rope_scaling="none", query_temperature_beta=0.0, **tiny)
  c.parent.steps = 30 if quick else 600
  c.parent.optimizer = optimizer.optimizer_config(lr=3e-3)  # also the from-scratch baselines' recipe
  c.parent.optimizer.warmup_steps = 5 if quick else 30

  # The children, largest first; each is pruned from the previous one's short-context model.
  if quick:
    c.stages = [cascade.stage_config("child_a", 2, 48, 96, short_steps=10, long_steps=2),
                cascade.stage_config("child_b", 1, 48, 64, short_steps=10, long_steps=0)]
  else:
    c.stages = [cascade.stage_config("child57", 3, 112, 320, short_steps=300, long_steps=20),
                cascade.stage_config("child35", 3, 96, 192, short_steps=300, long_steps=20)]
  c.prune = pruner.prune_config()  # scorers and calibration, shared by every stage
  c.prune.calibration_batches = 2 if quick else 16
  c.distill = distill.distill_config(teacher="parent")  # "parent" (the paper), "previous", or a path
  c.distill_optimizer = optimizer.optimizer_config(lr=1e-3)
  c.distill_optimizer.warmup_steps = 2 if quick else 10
  c.long = ml_collections.ConfigDict(dict(seq_len=128 if quick else 512, global_batch=8, yarn_factor=4.0,
                                          query_temperature_beta=0.1))
  c.baselines = True
  return c
