"""Rewards: generated problems, the math verifier, the code sandbox, the reasoning format and the loop detector.

Run: python -m pytest -q -n 2 tests/test_rewards.py
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import signal
import time
from fractions import Fraction

import pytest

from ministral_jax.errors import UserError
from ministral_jax.rewards import code_sandbox, format as fmt, math_verifier, tasks

ALL_LEVELS = [(f, lvl) for f, fam in tasks.FAMILIES.items() for lvl in fam.levels]


# ---------------------------------------------------------------------------------------------------------------
# Tasks.

# A chain of arithmetic facts "A = B = C" where each side is integers joined by + - * / (negatives in
# parentheses). Not preceded by a word, a slash or "op ", so "3x - 76 = 39" and "12/18 = 2/3" are not misread.
_ATOM = r"(?:\d+|\(-?\d+(?: [-+] \d+)?\))"
_EXPR = rf"-?{_ATOM}(?: [-+*/] {_ATOM})*"
_FACT = re.compile(rf"(?<![\w/)])(?<!\d\.)(?<![-+*/] ){_EXPR}(?: = {_EXPR})+(?![\w/(]|\.\d)")


_Q = r"-?\d+(?:/\d+)?"  # an integer or a plain fraction
_OTHER_FACTS = [  # (pattern, whether its groups hold), for the steps of the linear family that are not sums
    (re.compile(r"gcd\((\d+), (\d+)\) = (\d+)"), lambda a, b, g: math.gcd(int(a), int(b)) == int(g)),
    (re.compile(r"(?<![\w/])(\d+/\d+) = (\d+/\d+)"), lambda a, b: Fraction(a) == Fraction(b)),
    (re.compile(rf"(-?\d+) \* \(?({_Q})\)? = ({_Q})"), lambda a, b, c: Fraction(a) * Fraction(b) == Fraction(c)),
    (re.compile(rf"({_Q}), plus \(?(-?\d+)\)? is ({_Q})"), lambda a, b, c: Fraction(a) + Fraction(b) == Fraction(c)),
    (re.compile(r"(-?\d+) / \(?(-?\d+)\)? = (-?\\frac\{\d+\}\{\d+\})"),
     lambda a, b, c: Fraction(int(a), int(b)) == _as_fraction(c)),
]


def _facts_hold(text: str) -> int:
  """Checks every arithmetic fact in a chain of thought exactly; returns how many it checked."""
  count = 0
  for match in _FACT.finditer(text):
    values = {eval(re.sub(r"\d+", r"F(\g<0>)", side), {"F": Fraction})  # pylint: disable=eval-used
              for side in match.group(0).split(" = ")}
    assert len(values) == 1, f"false step {match.group(0)!r} in:\n{text}"
    count += 1
  for pattern, holds in _OTHER_FACTS:
    for match in pattern.finditer(text):
      assert holds(*match.groups()), f"false step {match.group(0)!r} in:\n{text}"
      count += 1
  return count


def _true_answer(prompt: str) -> Fraction:
  """The answer recomputed from the prompt alone, by a different route than the generator's."""
  if prompt.startswith("Compute "):
    expr = prompt[len("Compute "):prompt.index(".")]
    return Fraction(eval(expr, {"__builtins__": {}}))  # pylint: disable=eval-used
  equation = prompt[len("Solve for x: "):prompt.index(".")]
  left, right = (re.sub(r"(\d)x", r"\1*x", side) for side in equation.split(" = "))
  # Linear in x: f(x) = left - right; the root is -f(0) / (f(1) - f(0)).
  f = lambda x: eval(left, {"x": Fraction(x)}) - eval(right, {"x": Fraction(x)})  # pylint: disable=eval-used
  return -f(0) / (f(1) - f(0))


def _as_fraction(latex: str) -> Fraction:
  m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", latex)
  return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1) if m else Fraction(int(latex))


@pytest.mark.parametrize("family,level", ALL_LEVELS)
def test_problems_are_exact_and_boxed(family, level):
  problems = tasks.generate(family, level, "train", 40, seed=1) + tasks.generate(family, level, "eval", 10, seed=1)
  checked = 0
  for p in problems:
    assert _as_fraction(p.answer) == _true_answer(p.prompt), p
    assert fmt.extract_boxed(p.short_cot) == fmt.extract_boxed(p.long_cot) == p.answer
    assert p.short_cot.endswith(f"\\boxed{{{p.answer}}}.") and p.long_cot.endswith(f"\\boxed{{{p.answer}}}.")
    assert len(p.long_cot) > len(p.short_cot)
    checked += _facts_hold(p.short_cot) + _facts_hold(p.long_cot)
    assert p.id.startswith(f"{family}/L{level}/")
  assert checked >= 2 * len(problems)  # the fact check really read the chains of thought


def test_long_cot_spells_out_carries_and_borrows():
  p = tasks.generate("arithmetic", 2, "train", 50, seed=0)
  text = "\n".join(x.long_cot for x in p)
  assert "carry 1" in text and "borrow 10" in text and "hundreds:" in text


def test_generate_is_reproducible_and_distinct():
  a = tasks.generate("arithmetic", 3, "train", 200, seed=7)
  assert a == tasks.generate("arithmetic", 3, "train", 200, seed=7)
  assert a != tasks.generate("arithmetic", 3, "train", 200, seed=8)
  assert len({p.id for p in a}) == len(a)


def test_splits_are_disjoint_across_seeds_and_levels():
  """The split is a function of the problem, so no seed or level can move a problem across it."""
  for family, fam in tasks.FAMILIES.items():
    train, eval_ = set(), set()
    for level in fam.levels:
      for seed in range(3):
        train |= {p.prompt for p in tasks.generate(family, level, "train", 300, seed)}
        eval_ |= {p.prompt for p in tasks.generate(family, level, "eval", 100, seed)}
    # Levels overlap (arithmetic 1 and 3 both hold 2-digit sums), so this also covers one problem reached
    # from two levels.
    assert train and eval_ and not train & eval_, family


def test_eval_share_is_about_ten_percent():
  draws = [tasks.split_of(f"arithmetic:{a}+{b}") for a in range(100) for b in range(100)]
  assert 0.08 < draws.count("eval") / len(draws) < 0.12


def test_bad_requests_are_user_errors():
  for args in [("geometry", 1, "train", 1, 0), ("arithmetic", 9, "train", 1, 0), ("linear", 1, "test", 1, 0),
               ("linear", 1, "train", -1, 0)]:
    with pytest.raises(UserError):
      tasks.generate(*args)
  with pytest.raises(UserError, match="distinct eval problems"):
    tasks.generate("linear", 1, "eval", 2000, 0)  # about 1,000 such equations are in eval
  with pytest.raises(UserError):
    tasks.to_conversation(tasks.generate("linear", 1, "train", 1, 0)[0], "verbose")


def test_conversations_and_jsonl(tmp_path):
  p = tasks.generate("linear", 3, "train", 3, seed=0)
  instruct = tasks.to_conversation(p[0], "instruct")
  assert instruct == {"messages": [{"role": "user", "content": p[0].prompt},
                                   {"role": "assistant", "content": p[0].short_cot}]}
  for style, cot in (("short", p[0].short_cot), ("long", p[0].long_cot)):
    user, assistant = tasks.to_conversation(p[0], style)["messages"]
    assert user == {"role": "user", "content": p[0].prompt}
    assert assistant["thinking"] == cot and fmt.extract_boxed(assistant["content"]) == p[0].answer
    # Rendered as the model will see it, the record passes the format check.
    rendered = f"[THINK]{assistant['thinking']}[/THINK]{assistant['content']}</s>"
    assert fmt.check_reasoning(rendered).ok and fmt.extract_answer(rendered) == p[0].answer
  path = tmp_path / "long.jsonl"
  tasks.write_jsonl(p, str(path), "long")
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert rows == [tasks.to_conversation(x, "long") for x in p]
  assert [f.name for f in tmp_path.iterdir()] == ["long.jsonl"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------------------------
# Math verifier: one pool for the module (workers start once).


@pytest.fixture(scope="module")
def pool():
  with math_verifier.VerifierPool(workers=2) as p:
    yield p


def test_equivalent_answers(pool):
  cases = [
      ("\\boxed{0.5}", "\\frac{1}{2}", True),
      ("so it is \\boxed{1/2}", "0.5", True),
      ("\\boxed{\\frac{1}{2}}", "1/2", True),
      ("\\boxed{-3.0}", "-3", True),
      ("\\boxed{-3}", "-3.0", True),
      ("\\boxed{x = 7}", "7", True),
      ("\\boxed{\\frac{-7}{3}}", "-\\frac{7}{3}", True),
      ("first \\boxed{3}, then \\boxed{4}", "4", True),  # the last boxed answer counts
      ("\\boxed{4}", "The answer is \\boxed{4}.", True),  # gold may be boxed text too
      ("\\boxed{5}", "4", False),
      ("\\boxed{0.50001}", "\\frac{1}{2}", False),
      ("\\boxed{-3}", "3", False),
      ("the answer is 4", "4", False),  # no boxed answer
      ("\\boxed{}", "4", False),
      ("\\boxed{4", "4", False),  # never closed
      ("\\boxed{\\frac{{}", "1", False),  # malformed LaTeX
      ("\\boxed{}{)(\\sqrt}", "1", False),
      ("\\boxed{five}", "5", False),
      ("\\boxed{+4}", "4", True),  # integers are decided on the host; these agree with math-verify
      ("\\boxed{007}", "7", True),
      ("\\boxed{-0}", "0", True),
      ("\\boxed{- 12}", "-12", True),
      ("\\boxed{" + "9" * 70 + "}", "9" * 70, True),  # too long for the host's int rule: same text
  ]
  preds, golds, expected = zip(*cases)
  assert pool.verify(list(preds), list(golds)) == list(expected)


def test_generated_chains_of_thought_verify(pool):
  problems = [p for f, lvl in ALL_LEVELS for p in tasks.generate(f, lvl, "eval", 2, seed=3)]
  answers = [p.answer for p in problems]
  assert pool.verify([p.long_cot for p in problems], answers) == [True] * len(problems)
  wrong = [f"\\boxed{{{_as_fraction(a) + 1}}}" for a in answers]
  assert pool.verify(wrong, answers) == [False] * len(problems)


def test_integer_answers_are_graded_without_a_worker():
  pool = math_verifier.VerifierPool(workers=1)
  pool.close()  # a closed pool raises if any item reaches a worker
  assert pool.verify(["\\boxed{53}", "\\boxed{+7}", "\\boxed{72}", "x"], ["53", "7", "53", "1"]) == [
      True, True, False, False]
  with pytest.raises(RuntimeError, match="closed"):
    pool.verify(["\\boxed{0.5}"], ["1/2"])


def test_hung_item_is_false_and_the_pool_survives(pool):
  start = time.monotonic()
  got = pool.verify(["\\boxed{10^{10^{10}}}", "\\boxed{2}"], ["5", "2.0"], timeout_s=1.0)
  assert got == [False, True]
  assert time.monotonic() - start < 1.0 + math_verifier._KILL_GRACE_S + 2.0
  assert pool.verify(["\\boxed{0.25}"], ["\\frac14"]) == [True]


def test_unresponsive_workers_are_killed_and_replaced(pool):
  """A worker stuck where its alarm cannot reach (here: stopped) is killed at the deadline, its item False."""
  pool.wait_until_ready()  # stopped while still starting, a worker would only be waited for (start_timeout_s)
  before = pool.worker_pids
  for pid in before:
    os.kill(pid, signal.SIGSTOP)
  start = time.monotonic()
  assert pool.verify(["\\boxed{0.5}", "\\boxed{1/3}"], ["1/2", "2/6"], timeout_s=0.5) == [False, False]
  assert time.monotonic() - start < 0.5 + math_verifier._KILL_GRACE_S + 2.0
  assert not set(pool.worker_pids) & set(before)
  assert pool.verify(["\\boxed{0.5}", "\\boxed{1/3}"], ["1/2", "2/6"]) == [True, True]


def test_verifier_input_errors(pool):
  with pytest.raises(UserError):
    pool.verify(["\\boxed{1}"], [])
  with pytest.raises(UserError):
    pool.verify(["\\boxed{1}"], ["1"], timeout_s=0)


def test_close_stops_the_workers():
  p = math_verifier.VerifierPool(workers=1)
  pids = p.worker_pids
  p.close()
  for pid in pids:
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] in "ZX"
  with pytest.raises(RuntimeError, match="closed"):
    p.verify(["\\boxed{1/2}"], ["0.25"])  # not two integers: this needs a worker


def test_one_shot_verify():
  assert math_verifier.verify(["\\boxed{0.5}", "\\boxed{2}", "x"], ["\\frac{1}{2}", "3", "1"]) == [True, False, False]


# ---------------------------------------------------------------------------------------------------------------
# Code sandbox.


def test_every_humaneval_canonical_solution_passes():
  problems = list(code_sandbox.humaneval_problems().values())
  assert len(problems) == 164
  with concurrent.futures.ThreadPoolExecutor(4) as ex:  # each run waits on a child process, not the GIL
    results = list(ex.map(lambda p: code_sandbox.check_humaneval(p, p["canonical_solution"]), problems))
  failures = [(p["task_id"], r.status, r.stderr_tail[-300:]) for p, r in zip(problems, results) if not r.passed]
  assert not failures


def test_broken_solutions_fail():
  problem = code_sandbox.humaneval_problems()["HumanEval/0"]
  wrong = code_sandbox.check_humaneval(problem, "    return False\n")
  assert (wrong.passed, wrong.status) == (False, "failed") and "AssertionError" in wrong.stderr_tail
  broken = code_sandbox.check_humaneval(problem, "    return (\n")
  assert (broken.passed, broken.status) == (False, "error") and "SyntaxError" in broken.stderr_tail
  raising = code_sandbox.check_humaneval(problem, "    raise RuntimeError('no')\n")
  assert raising.status == "error" and "RuntimeError" in raising.stderr_tail


def test_infinite_loop_is_killed_within_its_limit():
  start = time.monotonic()
  result = code_sandbox.run("while True:\n  pass\n", timeout_s=1.0)
  assert (result.passed, result.status) == (False, "timeout")
  assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("program", [
    "x = bytearray(8 << 30)\n",
    "chunks = []\nwhile True:\n  chunks.append(bytearray(16 << 20))\n",
])
def test_memory_bomb_is_stopped(program):
  start = time.monotonic()
  result = code_sandbox.run(program, timeout_s=10.0, memory_mb=256)
  assert (result.passed, result.status) == (False, "error") and "MemoryError" in result.stderr_tail
  assert time.monotonic() - start < 5.0


def test_output_flood_is_capped():
  result = code_sandbox.run("while True:\n  print('x' * 1000)\n", timeout_s=5.0)
  assert not result.passed and len(result.stderr_tail) <= code_sandbox._TAIL_BYTES


def test_child_sees_no_environment_secrets_and_a_fresh_directory(monkeypatch):
  monkeypatch.setenv("MJ_FAKE_SECRET", "hunter2")
  program = (
      "import os, sys\n"
      "assert 'MJ_FAKE_SECRET' not in os.environ, 'secret leaked'\n"
      "assert b'hunter2' not in open('/proc/self/environ', 'rb').read()\n"
      "assert set(os.environ) <= {'PATH', 'LC_CTYPE'}, sorted(os.environ)\n"
      "assert sys.flags.isolated == 1\n"
      "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
      "sys.stderr.write('CWD=' + os.getcwd() + '\\n')\n")
  result = code_sandbox.run(program)
  assert result.passed, result.stderr_tail
  cwd = re.search(r"CWD=(\S+)", result.stderr_tail).group(1)
  assert not os.path.exists(cwd)  # removed afterwards


def test_a_program_leaves_no_process_running_after_its_timeout():
  """As a normal user RLIMIT_NPROC=0 stops the program from starting any process; the kernel does not
  apply it to root, so there the whole process group is killed at the timeout instead."""
  if os.getuid() != 0:
    result = code_sandbox.run("import os\nos.fork()\n")
    assert result.status == "error" and "BlockingIOError" in result.stderr_tail
    return
  program = ("import subprocess, sys\n"
             "child = subprocess.Popen(['sleep', '60'])\n"
             "sys.stderr.write(f'PID={child.pid}\\n'); sys.stderr.flush()\n"
             "while True:\n  pass\n")
  result = code_sandbox.run(program, timeout_s=1.0)
  assert result.status == "timeout"
  pid = int(re.search(r"PID=(\d+)", result.stderr_tail).group(1))
  time.sleep(0.2)
  try:
    with open(f"/proc/{pid}/status") as f:
      state = re.search(r"State:\s+(\w)", f.read()).group(1)
    assert state in "ZX", state  # gone, or a zombie waiting to be reaped: never still running
  except FileNotFoundError:
    pass


# ---------------------------------------------------------------------------------------------------------------
# Reasoning format.


@pytest.mark.parametrize("text,reason", [
    ("[THINK]2 + 2 = 4[/THINK]The answer is \\boxed{4}.", "ok"),
    ("  [THINK]2 + 2 = 4[/THINK]\n\\boxed{4}</s>", "ok"),
    ("The answer is \\boxed{4}.", "does not start with [THINK]"),
    ("Well [THINK]x[/THINK]\\boxed{4}", "does not start with [THINK]"),
    ("[THINK]x[THINK]y[/THINK]\\boxed{4}", "more than one [THINK]"),
    ("[THINK]2 + 2 = 4 and so on", "no [/THINK]: the thinking never ended"),
    ("[THINK]x[/THINK]\\boxed{4}[/THINK]", "more than one [/THINK]"),
    ("[THINK]  [/THINK]\\boxed{4}", "empty thinking"),
    ("[THINK]x[/THINK]  </s>", "empty answer after [/THINK]"),
    ("[THINK]x \\boxed{4}[/THINK]The answer is 4.", "no complete \\boxed{} in the answer"),
    ("[THINK]x[/THINK]\\boxed{\\frac{1}{2}", "no complete \\boxed{} in the answer"),
    ("[THINK]x[/THINK]\\boxed{ }", "empty \\boxed{} in the answer"),
    ("[THINK]x[/THINK]\\boxed{4}[INST]more", "control token [INST] inside the response"),
])
def test_check_reasoning(text, reason):
  result = fmt.check_reasoning(text)
  assert (result.ok, result.reason) == (reason == "ok", reason)


def test_extract_and_strip():
  assert fmt.extract_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
  assert fmt.extract_boxed("\\boxed {\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are not structure
  assert fmt.extract_boxed("\\boxed{\\frac{1}{2}") is None and fmt.extract_boxed("no box") is None
  text = "[THINK]maybe \\boxed{3}[/THINK] It is \\boxed{4}.</s>"
  assert fmt.strip_thinking(text) == "It is \\boxed{4}."
  assert fmt.extract_answer(text) == "4"
  assert fmt.extract_answer("[THINK]maybe \\boxed{3}[/THINK] It is 4.") is None  # never from the thinking
  assert fmt.strip_thinking("[THINK]still thinking \\boxed{3}") == ""
  assert fmt.extract_answer("[THINK]still thinking \\boxed{3}") is None
  assert fmt.strip_thinking("Plain answer \\boxed{5}") == "Plain answer \\boxed{5}"
  assert fmt.extract_answer("Plain answer \\boxed{5}") == "5"


# ---------------------------------------------------------------------------------------------------------------
# Loop detector.

_PROSE = ("The cat sat on the mat. Then the cat looked at the dog, and the dog looked at the cat. "
          "Neither moved for a while; the clock ticked, the kettle hummed, and the afternoon went on. "
          "At last the dog yawned, the cat blinked, and both of them fell asleep on the mat by the door.")


@pytest.fixture(scope="module")
def tok():
  from ministral_jax.data.tokenizers import load_tokenizer  # pylint: disable=g-import-not-at-top
  return load_tokenizer("spm_v3")


def test_natural_text_is_not_a_loop(tok):
  ids = tok.encode(_PROSE)
  assert len(ids) > 64
  assert not any(fmt.is_looping(ids[:n]) for n in range(1, len(ids) + 1))
  said_twice = tok.encode("I think so. I think so. I think so. Yes.")
  assert not fmt.is_looping(said_twice)


def test_repetition_is_a_loop(tok):
  abc = [11, 12, 13] * 11
  assert fmt.is_looping(abc) and fmt.is_looping(tok.encode(_PROSE) + abc)
  assert fmt.is_looping([7] * 32) and not fmt.is_looping([7] * 31)
  sentence = tok.encode("The cat sat on the mat and looked at the dog for a long, long time. ")
  assert 16 < len(sentence) <= 64
  assert fmt.is_looping(tok.encode(_PROSE) + sentence * 4)
  assert not fmt.is_looping(tok.encode(_PROSE) + sentence * 3)
  assert not fmt.is_looping(abc + tok.encode(_PROSE))  # a loop that ended is not looping now
  assert fmt.is_looping(tok.encode(("a b c " * 40).strip()))  # also through the tokenizer


def test_loop_rule_parameters():
  assert fmt.is_looping([1, 2] * 4, min_repeats=4, min_tokens=8)
  assert not fmt.is_looping([1, 2] * 4, min_repeats=4, min_tokens=9)
  with pytest.raises(UserError):
    fmt.is_looping([1, 2, 3], max_period=0)
