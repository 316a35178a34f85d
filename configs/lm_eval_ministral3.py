r"""The paper's base-model benchmarks through lm-evaluation-harness, on a real-size checkpoint.

COMMAND: python -m ministral_jax.main --config=configs/lm_eval_ministral3.py:gs://BUCKET/cascade/ministral3_3b/params --workdir=gs://BUCKET/lm_eval/ministral3_3b

Run it on every worker of a TPU pod slice (or one GPU host). The checkpoint may be orbax, HF or
Mistral-native (e.g. a released `Ministral-3-3B-Base-2512` directory for the reference numbers); its
tokenizer is the Tekken file it records or ships. The tasks are the harness's own (their datasets come from
the Hugging Face Hub, or a `datasets` cache that holds them): MMLU, ARC easy/challenge, TriviaQA and GSM8K
5-shot, as the paper reports its base models; MATH (`minerva_math`, 4-shot) is a separate run with
`--config.eval.tasks=minerva_math --config.eval.num_fewshot=4`. The params are split over every device
(`fsdp`), the batch over the same devices; `eval.max_length` 0 reads up to the model's context.
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.data import pipeline
from ministral_jax.eval import task as eval_task


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: the checkpoint to score."""
  c = ml_collections.ConfigDict()
  c.task = "lm_eval"
  c.data = pipeline.data_config()
  c.data.tokenizer = "init_from"
  c.mesh = sharding.mesh_config(data=1, fsdp=-1)
  c.eval = eval_task.eval_config()
  c.eval.checkpoint = arg
  c.eval.tasks = "mmlu,arc_easy,arc_challenge,triviaqa,gsm8k"
  c.eval.num_fewshot = 5
  c.eval.batch_size = 32
  c.eval.max_gen_toks = 256
  return c
