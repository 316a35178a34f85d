"""Task `eval_generate`: sample answers to held-out verifiable problems and score them.

    python -m ministral_jax.main --config=configs/sft_tiny.py:reasoning --config.task=eval_generate --workdir=DIR

The checkpoint is `eval.checkpoint` or `<workdir>/params`. The problems are
`generate.family` at `generate.level` from the suite's eval split
(`rewards/tasks.py`; disjoint from the train split by construction). Each
prompt is the user turn in Mistral's instruct format (`data/chat.py`), so the
model answers as it was fine-tuned to: `[THINK] ... [/THINK]` then the answer
for reasoning models, the answer alone for instruct ones. Reported, to the
console and `<workdir>/eval_generate.json`:

  accuracy       pass@1 of the greedy answer: the last \\boxed{...} after the thinking equals the reference
                 (math-verify; a box inside [THINK]...[/THINK] does not count)
  pass@k         with `generate.samples` = k > 1 samples per problem at `generate.temperature`: the
                 unbiased estimator 1 - C(n - c, k) / C(n, k) with n = k samples, i.e. any sample right
  mean_length    generated tokens per greedy answer (EOS included)
  truncated      fraction of greedy answers without EOS within `generate.max_new_tokens`
  looping        fraction caught by the repetition detector (`rewards.format.is_looping`)
  format_ok      reasoning answers: one [THINK]...[/THINK] block, then a boxed answer
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from ministral_jax import files, sharding
from ministral_jax.checkpoint import convert
from ministral_jax.data import chat, pipeline, tokenizers
from ministral_jax.errors import UserError
from ministral_jax.rewards import format as answer_format
from ministral_jax.rewards import math_verifier, tasks
from ministral_jax.sample import sampler

RESULT_FILE = "eval_generate.json"


def generate_config(family: str = "arithmetic", level: int = 1) -> ml_collections.ConfigDict:
  """n problems; greedy answers (pass@1); `samples` > 1 adds pass@samples at `temperature`."""
  return ml_collections.ConfigDict(dict(family=family, level=level, n=128, seed=0, max_new_tokens=128,
                                        batch_size=32, samples=1, temperature=0.8, reasoning=True))


def check(cfg: ml_collections.ConfigDict) -> None:
  g, problems = cfg.generate, []
  if g.family not in tasks.FAMILIES:
    problems.append(f"generate.family={g.family!r}: one of {sorted(tasks.FAMILIES)}")
  for field, low in (("n", 1), ("max_new_tokens", 1), ("batch_size", 1), ("samples", 1)):
    if g[field] < low:
      problems.append(f"generate.{field}={g[field]!r}: at least {low}")
  if g.samples > 1 and g.temperature <= 0:
    problems.append(f"generate.temperature={g.temperature!r}: pass@{g.samples} needs a positive temperature")
  if problems:
    raise UserError("The eval_generate config has problems:\n  " + "\n  ".join(problems))


def prompt_ids(prompt: str, tokenizer: tokenizers.Tokenizer) -> list[int]:
  """The tokens a model sees before it answers: the conversation up to the assistant's first token."""
  return chat.prompt_before_answer([{"role": "user", "content": prompt}], tokenizer)[0]


def _sample(params, model_cfg, prompts: list[list[int]], g, tokenizer, rng: jax.Array,
            temperature: float) -> list[list[int]]:
  """Every prompt answered once, in batches of one shape (the last padded with copies)."""
  width = max(map(len, prompts))
  out: list[list[int]] = []
  for start in range(0, len(prompts), g.batch_size):
    chunk = prompts[start:start + g.batch_size]
    padded = chunk + [chunk[-1]] * (g.batch_size - len(chunk))
    rng, sub = jax.random.split(rng)
    out += sampler.generate(params, model_cfg, padded, g.max_new_tokens, temperature, sub,
                            eos_id=tokenizer.eos_id, prompt_width=width)[:len(chunk)]
  return out


def score(answers: list[list[int]], problems: list[tasks.Problem], tokenizer, verifier, eos_id: int,
          reasoning: bool) -> dict[str, Any]:
  texts = [tokenizer.decode(a, keep_special=True) for a in answers]
  right = verifier.verify([answer_format.strip_thinking(t) for t in texts], [p.answer for p in problems])
  out = {"accuracy": float(np.mean(right)),
         "mean_length": float(np.mean([len(a) for a in answers])),
         "truncated": float(np.mean([eos_id not in a for a in answers])),
         "looping": float(np.mean([answer_format.is_looping(a) for a in answers]))}
  if reasoning:
    out["format_ok"] = float(np.mean([answer_format.check_reasoning(t).ok for t in texts]))
  return {**out, "_right": right, "_texts": texts}


def pass_at_k(correct: np.ndarray, k: int) -> float:
  """Unbiased pass@k from `correct` [problems, n] (Chen et al.'s estimator), averaged over problems."""
  n = correct.shape[1]
  c = correct.sum(axis=1)
  return float(np.mean([1.0 if n - ci < k else 1.0 - np.prod(1.0 - k / np.arange(n - ci + 1, n + 1)) for ci in c]))


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  check(cfg)
  g = cfg.generate
  path = cfg.eval.checkpoint or str(epath.Path(workdir) / "params")
  if not epath.Path(path).exists():
    raise UserError(f"There is no checkpoint to evaluate at {path}: set eval.checkpoint, or point --workdir at a "
                    "finished training run (its <workdir>/params).")
  partitioner = sharding.Partitioner.from_config(cfg.mesh)
  model_cfg = convert.load_config_any(path)
  partitioner.param_shardings(model_cfg)
  data_cfg = cfg.data
  if data_cfg.tokenizer == "init_from":  # the tokenizer the evaluated checkpoint records or ships
    recorded = convert.recorded_tokenizer(path)
    if not recorded:
      raise UserError(f"data.tokenizer='init_from', but {path} records no tokenizer; name its tokenizer file.")
    data_cfg = ml_collections.ConfigDict({**data_cfg.to_dict(), "tokenizer": recorded["source"]})
  tokenizer = pipeline.build_tokenizer(data_cfg, workdir)
  tokenizers.check_vocab_fits(tokenizer, model_cfg.vocab_size)
  tokenizers.check_same(convert.recorded_tokenizer(path), tokenizer.identity(), f"checkpoint {path}",
                        "data.tokenizer")
  problems = tasks.generate(g.family, g.level, "eval", g.n, g.seed)
  prompts = [prompt_ids(p.prompt, tokenizer) for p in problems]
  if max(map(len, prompts)) + g.max_new_tokens > model_cfg.max_seq_len:
    raise UserError(f"prompts of up to {max(map(len, prompts))} tokens + generate.max_new_tokens="
                    f"{g.max_new_tokens} exceed the model's max_seq_len={model_cfg.max_seq_len}")
  params, model_cfg = convert.load_any(path, partitioner)
  start = time.time()
  with partitioner.activate(), math_verifier.VerifierPool() as verifier:
    greedy = _sample(params, model_cfg, prompts, g, tokenizer, jax.random.key(g.seed), 0.0)
    result = score(greedy, problems, tokenizer, verifier, tokenizer.eos_id, g.reasoning)
    if g.samples > 1:
      right = []
      for k in range(g.samples):
        sampled = _sample(params, model_cfg, prompts, g, tokenizer, jax.random.key(g.seed + 1 + k), g.temperature)
        right.append(verifier.verify([answer_format.strip_thinking(tokenizer.decode(a, keep_special=True))
                                      for a in sampled], [p.answer for p in problems]))
      result[f"pass@{g.samples}"] = pass_at_k(np.array(right).T, g.samples)
  right, texts = result.pop("_right"), result.pop("_texts")
  report = {"checkpoint": path, "family": g.family, "level": g.level, "problems": g.n,
            "max_new_tokens": g.max_new_tokens, **result, "seconds": time.time() - start,
            "examples": [{"prompt": p.prompt, "answer": p.answer, "output": t, "correct": bool(r)}
                         for p, t, r in list(zip(problems, texts, right))[:8]]}
  print(f"{g.family} level {g.level}, {g.n} held-out problems: " + ", ".join(
      f"{k}={v:.3f}" for k, v in report.items() if isinstance(v, float) and k != "seconds"))
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  files.write_json(epath.Path(workdir) / RESULT_FILE, report)
  return report
