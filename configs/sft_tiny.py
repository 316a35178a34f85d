r"""SFT in miniature: a tiny model fine-tuned on the verifiable task suite's problems, from nothing.

COMMAND: python -m ministral_jax.main --config=configs/sft_tiny.py:reasoning --workdir=/tmp/ministral_jax/sft_reasoning

Variants (the argument):
  reasoning  answers `[THINK] <chain of thought> [/THINK] The answer is \boxed{...}.` (the paper's
             reasoning SFT); `tasks.long_fraction` of the conversations carry the long chain of thought
  instruct   answers without thinking: a short worked solution ending in the boxed answer
  quick      reasoning at toy sizes, for tests and Colab (about a minute)

Without `init_from` the job first pretrains a tiny parent on the built-in corpus in
<workdir>/parent (its SentencePiece, with Mistral's control tokens, is the SFT tokenizer); with
`--config.init_from=DIR --config.data.tokenizer=init_from` it starts from any checkpoint (orbax,
HF or native) and the tokenizer it records or ships. With `data.paths` empty the conversations
are the suite's `tasks.family` problems at `tasks.level` (train and eval splits disjoint by
construction), written to <workdir>/data. Distil from a stronger SFT'd teacher on the same tokens:
`--config.sft.teacher=DIR --config.sft.kd_weight=0.5` (1.0: KL only). fp8: `--config.sft.fp8=True`.
Score the result on held-out problems:
  python -m ministral_jax.main --config=configs/sft_tiny.py:reasoning --config.task=eval_generate --workdir=<same>
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.data import pipeline
from ministral_jax.eval import generate
from ministral_jax.eval import task as eval_task
from ministral_jax.model import config as model_config
from ministral_jax.train import loop, optimizer, pretrain, sft


def get_config(arg: str = "reasoning") -> ml_collections.ConfigDict:
  if arg not in ("reasoning", "instruct", "quick"):
    raise ValueError(f"configs/sft_tiny.py:{arg}: use reasoning, instruct or quick")
  quick = arg == "quick"
  c = ml_collections.ConfigDict()
  c.task = "sft"
  c.seed = 0
  c.init_from = ""  # any checkpoint; empty: the parent below
  c.model = model_config.preset_dict("cpu_tiny", rope_scaling="none", query_temperature_beta=0.0,
                                     **(dict(vocab_size=512, n_layers=2, d_model=64, d_ffn=128) if quick else {}))
  c.mesh = sharding.mesh_config(data=-1)
  c.loss = pretrain.loss_config()
  c.eval = eval_task.eval_config()

  # The parent this job pretrains when init_from is empty (parent.checkpoint names one instead).
  c.parent = ml_collections.ConfigDict()
  c.parent.checkpoint = ""
  c.parent.steps = 30 if quick else 300
  c.parent.data = pipeline.data_config()  # the built-in corpus; a SentencePiece trained on it
  c.parent.data.update(spm_vocab_size=512 if quick else 1024, seq_len=128, max_documents=120 if quick else 0)
  c.parent.optimizer = optimizer.optimizer_config(lr=3e-3)
  c.parent.optimizer.warmup_steps = 5 if quick else 30

  # The SFT data: the task suite's problems as conversations (when data.paths is empty).
  # Level 1 (a ± b, 2 digits): the tiny model reaches ~10% on it, neither 0 nor 100 (README). 3/4 of the
  # reasoning answers carry the long, column-by-column chain of thought, so greedy decoding follows it.
  c.tasks = sft.tasks_config(family="arithmetic", level=1, train=400 if quick else 6000, eval_=32 if quick else 256,
                             style="instruct" if arg == "instruct" else "short",
                             long_fraction=0.0 if arg == "instruct" else 0.75)
  c.data = pipeline.data_config()
  c.data.update(source="chat", tokenizer="init_from", seq_len=128 if quick else 256, epochs=0)

  c.sft = sft.sft_config()
  c.train = loop.train_config(steps=20 if quick else 600, global_batch=8 if quick else 16)
  c.train.update(log_every=10 if quick else 50, eval_every=10 if quick else 200, eval_batches=2 if quick else 4,
                 checkpoint_every=10 if quick else 200)
  c.optimizer = optimizer.optimizer_config(lr=1e-3)
  c.optimizer.warmup_steps = 5 if quick else 50

  # task eval_generate on this workdir: held-out problems of the same family and level.
  c.generate = generate.generate_config(family=c.tasks.family, level=c.tasks.level)
  c.generate.update(n=32 if quick else 256, max_new_tokens=64 if quick else 256, batch_size=32,
                    reasoning=arg != "instruct")
  return c
