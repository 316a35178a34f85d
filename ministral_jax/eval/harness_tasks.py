"""Offline lm-eval tasks built from the held-out split of the built-in corpus (the Python standard library).

Three tasks, one per kind of harness request, written as ordinary lm-eval task YAMLs over local JSON Lines
files, so the harness runs them with no download:

  mj_code_mc    multiple_choice (loglikelihood): the right-hand side of an assignment among four, the others
                taken from other assignments; acc, acc_norm
  mj_code_line  generate_until: the rest of a code line from its first words, stop at newline; exact_match
  mj_code_ppl   loglikelihood_rolling: `ppl_chars`-character pieces of held-out files; word/byte perplexity,
                bits/byte

The documents come from the corpus's eval split (`data/sources.py`), which training on the built-in corpus
never sees, so a model pretrained here is measured on text it has not trained on. Few-shot examples come
from a separate `validation` file. The same seed and interpreter give the same files.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from ministral_jax import files
from ministral_jax.data import sources

TASKS = ("mj_code_mc", "mj_code_line", "mj_code_ppl")
_ASSIGNMENT = re.compile(r"^(\s*[A-Za-z_][\w.]*) = (\S.{2,40})$")

_COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/{name}.test.jsonl
    validation: {dir}/{name}.validation.jsonl
test_split: test
validation_split: validation
fewshot_split: validation
"""
_YAML = {
    "mj_code_mc": """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "mj_code_line": """output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: false
    ignore_punctuation: false
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
""",
    "mj_code_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
}


def _held_out_sources() -> list[str]:
  docs = sources.as_dataset(sources.split_entries(sources.builtin_entries(), "eval"), "the built-in eval split")
  return [text for text in docs if text.strip()]


def _assignments(docs: list[str]) -> list[tuple[str, str, str]]:
  """(three lines before, left-hand side, right-hand side) of each one-line assignment."""
  found = []
  for doc in docs:
    lines = doc.splitlines()
    for i, line in enumerate(lines):
      m = _ASSIGNMENT.match(line)
      if m and not m.group(2).endswith(("(", "[", "{", "\\", ",")):
        found.append(("\n".join(lines[max(0, i - 3):i]), m.group(1), m.group(2)))
  return found


def _multiple_choice(items, rng: np.random.Generator, n: int) -> list[dict]:
  out = []
  for k in rng.permutation(len(items))[:n]:
    before, lhs, rhs = items[k]
    others = [items[j][2] for j in rng.permutation(len(items))[:12] if items[j][2] != rhs]
    choices = [rhs] + list(dict.fromkeys(others))[:3]
    order = rng.permutation(len(choices))
    out.append({"context": f"{before}\n{lhs} =".lstrip("\n"), "choices": [choices[i] for i in order],
                "label": int(np.argmax(order == 0))})
  return out


def _line_completion(docs: list[str], rng: np.random.Generator, n: int) -> list[dict]:
  candidates = []
  for doc in docs:
    lines = doc.splitlines()
    for i, line in enumerate(lines[3:], start=3):
      code = line.lstrip()
      words = code.split(" ")
      if 20 <= len(line) <= 80 and len(words) >= 4 and not code.startswith("#"):
        cut = len(line) - len(code) + len(" ".join(words[:len(words) // 2]))
        candidates.append({"context": "\n".join(lines[i - 3:i] + [line[:cut]]), "target": line[cut:]})
  return [candidates[k] for k in rng.permutation(len(candidates))[:n]]


def _documents(docs: list[str], rng: np.random.Generator, n: int, chars: int) -> list[dict]:
  """Consecutive `chars`-character pieces of the held-out files (they are few, and long)."""
  pieces = [doc[i:i + chars] for doc in docs for i in range(0, len(doc), chars) if doc[i:i + chars].strip()]
  return [{"text": pieces[k]} for k in rng.permutation(len(pieces))[:n]]


def write(out_dir: str | pathlib.Path, n: int = 64, shots: int = 8, ppl_chars: int = 2000, seed: int = 0
          ) -> pathlib.Path:
  """Writes the three tasks' data (`n` test documents each, `shots` validation ones) and YAMLs to
  `out_dir`, for `TaskManager(include_path=out_dir)`."""
  out = pathlib.Path(out_dir).absolute()
  out.mkdir(parents=True, exist_ok=True)
  docs = _held_out_sources()
  rng = np.random.default_rng(seed)
  builders = {"mj_code_mc": lambda m: _multiple_choice(_assignments(docs), rng, m),
              "mj_code_line": lambda m: _line_completion(docs, rng, m),
              "mj_code_ppl": lambda m: _documents(docs, rng, m, ppl_chars)}
  for name, build in builders.items():
    rows = build(n + shots)
    cut = min(n, len(rows) - shots)  # a small corpus: the test split gives way first
    for split, part in (("test", rows[:cut]), ("validation", rows[cut:])):
      files.write_text(out / f"{name}.{split}.jsonl", "".join(json.dumps(r) + "\n" for r in part))
    files.write_text(out / f"{name}.yaml", f"task: {name}\n" + _COMMON.format(dir=out, name=name) + _YAML[name])
  return out
