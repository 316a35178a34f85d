"""Procedurally generated problems with exact answers, for post-training in miniature.

Post-training (SFT on chains of thought, then GRPO against a verifier) must be
runnable, measurable and reproducible on one CPU with a model of a few
million parameters. Downloaded benchmarks are too hard for such a model and
cannot be regenerated at will; these families can: every problem comes from
a seed, its answer is computed exactly, and its two chains of thought are
produced by the same algorithm a person would follow, so a model that learns
them has learned the algorithm and not a lookup table.

Splits are disjoint by construction: a problem belongs to `eval` if and only
if the SHA-256 of its canonical form (the family plus the numbers, never the
level, the seed or the prompt wording) falls in the lowest `EVAL_PERCENT` of
the hash space. No seed, level or sample size can put an eval problem into
train, and the same problem lands in the same split at every level that can
produce it.

Levels (chosen so that one of them sits between 0% and ~100% for a tiny
model trained a few minutes on CPU; untested guesses until measured):

                                                                  tokens (spm_v3), mean / max
                                                                  short CoT     long CoT
  arithmetic  integers in [0, 10**digits), * before + and -, then left to right
    1  a ± b, 2 digits                  (warm-up, should be learned)     22 / 24     107 / 136
    2  a ± b, 3 digits                  (carries, borrows, 3 columns)    26 / 28     142 / 186
    3  a op b, 2 digits, op in + - *    (two-digit products)             23 / 26     174 / 385
    4  a op b op c, 2 digits            (precedence, negatives)          37 / 45     394 / 936
    5  a op b op c, 3 digits                                             46 / 58     674 / 1917
    6  a op b op c op d, 3 digits       (products up to 9 digits)        66 / 88    1073 / 3440
  linear      solve for x; answers are integers or reduced fractions
    1  x + b = c                                                         23 / 25      96 / 105
    2  a*x + b = c, a in 2..9, integer answer                            38 / 43     154 / 185
    3  a*x + b = c, a in ±2..12, answer usually a fraction               49 / 60     181 / 210
    4  a*x + b = c*x + d, x on both sides, fraction                      61 / 73     247 / 286
Prompts are 19-33 tokens. Arithmetic level 2 (or 3) and linear level 2 are
the likeliest to land between 0% and ~100% for a tiny model.
The smallest pools are linear 1 (10,100 equations, about 1,000 of them in
eval) and arithmetic 1 (20,000 problems); `generate` says so when asked for
more distinct problems than a split holds.

Every chain of thought ends with "The answer is \\boxed{...}" and
`Problem.answer` is exactly the boxed text, so the verifier, the format
check and the data all agree on one string.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import random
from fractions import Fraction
from typing import Callable, Iterable, Literal, Mapping, Sequence

from ministral_jax.errors import UserError
from ministral_jax.files import write_text

EVAL_PERCENT = 10
SPLITS = ("train", "eval")
Style = Literal["instruct", "short", "long"]
STYLES = ("instruct", "short", "long")
_BOXED_SUFFIX = " Put the final answer in \\boxed{}."


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem; `answer` is the exact text inside the chains of thought's final \\boxed{}."""
  id: str
  prompt: str
  short_cot: str
  long_cot: str
  answer: str


_Drawn = tuple[str, Callable[[], tuple[str, str, str, str]]]  # canonical form, writer of (prompt, short, long, answer)


@dataclasses.dataclass(frozen=True)
class Family:
  """A problem family. `draw(rng, level)` returns the canonical form and a function that writes the problem
  out: rejected draws (wrong split, duplicate) are cheap because nothing is written for them."""
  name: str
  levels: Mapping[int, str]
  draw: Callable[[random.Random, int], _Drawn]


def split_of(canonical: str) -> str:
  """The split a canonical form belongs to; a pure function of the text, so it never depends on a seed."""
  bucket = int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big") % 100
  return "eval" if bucket < EVAL_PERCENT else "train"


# ---------------------------------------------------------------------------------------------------------------
# Seeded draws. Python guarantees only `random()` (and string seeding) to stay the same across versions, so every
# integer is derived from it: the same seed gives the same problems on any interpreter.


def _int(rng: random.Random, lo: int, hi: int) -> int:
  """Uniform integer in [lo, hi]."""
  return lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)


def _pick(rng: random.Random, items: Sequence):
  return items[_int(rng, 0, len(items) - 1)]


def _paren(n: int) -> str:
  """A number as the right operand of an operator: negatives in parentheses, so '- -3' never appears."""
  return f"({n})" if n < 0 else str(n)


def _boxed(answer: str) -> str:
  return f"The answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------------------------------------------------------
# Column arithmetic on non-negative integers, written out the way it is done by hand.

_PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions",
           "ten-millions", "hundred-millions", "billions", "ten-billions", "hundred-billions")


def _place(k: int) -> str:
  return _PLACES[k] if k < len(_PLACES) else f"10^{k}"


def _digits(n: int) -> list[int]:
  """Digits of n >= 0, least significant first."""
  return [int(c) for c in reversed(str(n))]


def _column_add(x: int, y: int) -> list[str]:
  """x + y column by column from the right, with every carry."""
  dx, dy = _digits(x), _digits(y)
  lines, carry, out = [f"Add {x} + {y} column by column from the right:"], 0, []
  for k in range(max(len(dx), len(dy))):
    a, b = (dx[k] if k < len(dx) else 0), (dy[k] if k < len(dy) else 0)
    s = a + b + carry
    terms = f"{a} + {b}" + (f" + {carry}" if carry else "")
    lines.append(f"{_place(k)}: {terms} = {s}, write {s % 10}" + (", carry 1" if s >= 10 else ""))
    out.append(s % 10)
    carry = s // 10
  if carry:
    lines.append(f"{_place(len(out))}: the carry 1, write 1")
    out.append(1)
  result = int("".join(map(str, reversed(out))))
  assert result == x + y
  lines.append(f"So {x} + {y} = {result}.")
  return lines


def _column_sub(x: int, y: int) -> list[str]:
  """x - y for x >= y, column by column from the right, with every borrow."""
  assert x >= y >= 0
  dx, dy = _digits(x), _digits(y)
  lines, borrow, out = [f"Subtract {x} - {y} column by column from the right:"], 0, []
  for k in range(len(dx)):
    a, b = dx[k], (dy[k] if k < len(dy) else 0)
    top = a - borrow
    first = f"{a} - 1" if borrow else f"{a}"
    if top < b:
      lines.append(f"{_place(k)}: {first} = {top} is less than {b}, borrow 10: {top + 10} - {b} = {top + 10 - b}"
                   if borrow else f"{_place(k)}: {a} is less than {b}, borrow 10: {a + 10} - {b} = {a + 10 - b}")
      out.append(top + 10 - b)
      borrow = 1
    else:
      lines.append(f"{_place(k)}: {first} - {b} = {top - b}")
      out.append(top - b)
      borrow = 0
  result = int("".join(map(str, reversed(out))))
  assert result == x - y and borrow == 0
  lines.append(f"So {x} - {y} = {result}.")
  return lines


def _times_digit(x: int, d: int) -> list[str]:
  """x * d for one digit d, digit by digit with carries."""
  lines, carry, out = [], 0, []
  for k, a in enumerate(_digits(x)):
    p = a * d + carry
    terms = f"{a} * {d}" + (f" + {carry}" if carry else "")
    lines.append(f"  {_place(k)}: {terms} = {p}, write {p % 10}" + (f", carry {p // 10}" if p >= 10 else ""))
    out.append(p % 10)
    carry = p // 10
  if carry:
    lines.append(f"  write the carry {carry}")
    out.extend(_digits(carry))
  result = int("".join(map(str, reversed(out))))
  assert result == x * d
  lines.append(f"  So {x} * {d} = {result}.")
  return lines


def _column_mul(x: int, y: int) -> list[str]:
  """x * y: one partial product per digit of y, shifted, then the partials summed column by column."""
  if x == 0 or y == 0:
    return [f"{x} * {y} = 0, since one factor is 0."]
  lines = [f"Multiply {x} * {y}, one digit of {y} at a time from the right:"]
  partials = []
  for k, d in enumerate(_digits(y)):
    shift = 10 ** k
    lines.append(f"Digit {d} of {y} ({_place(k)}):")
    if d == 0:
      lines.append(f"  {x} * 0 = 0.")
    else:
      lines.extend(_times_digit(x, d))
    partial = x * d * shift
    if k:
      lines.append(f"  Shifted by {k} place{'s' if k > 1 else ''}: {x} * {d * shift} = {partial}.")
    partials.append(partial)
  partials = [p for p in partials if p] or [0]
  total = partials[0]
  for p in partials[1:]:
    lines.append("Add the partial products:")
    lines.extend(_column_add(total, p))
    total += p
  assert total == x * y
  lines.append(f"So {x} * {y} = {total}.")
  return lines


def _signed_step(acc: int, op: str, t: int) -> list[str]:
  """acc op t (t >= 0, acc any sign) reduced to the column methods above, with the sign rule stated."""
  head, r = f"{acc} {op} {t}", (acc + t if op == "+" else acc - t)
  if op == "+" and acc >= 0:
    return _column_add(acc, t)
  if op == "-" and acc < 0:
    return [f"{head} = -({-acc} + {t}).", *_column_add(-acc, t), f"So {head} = {r}."]
  lead = [] if op == "-" else [f"{head} = {t} - {-acc}."]
  big, small = (acc, t) if op == "-" else (t, -acc)  # the result is big - small
  if big >= small:
    return lead + _column_sub(big, small) + ([f"So {head} = {r}."] if lead else [])
  return lead + [f"{big} - {small} = -({small} - {big}).", *_column_sub(small, big), f"So {head} = {r}."]


# ---------------------------------------------------------------------------------------------------------------
# Arithmetic family.

_ARITH_LEVELS: Mapping[int, tuple[int, int, str]] = {  # level -> (operands, digits, operators)
    1: (2, 2, "+-"), 2: (2, 3, "+-"), 3: (2, 2, "+-*"), 4: (3, 2, "+-*"), 5: (3, 3, "+-*"), 6: (4, 3, "+-*")}


def _expr(nums: Sequence[int], ops: Sequence[str]) -> str:
  return " ".join([str(nums[0])] + [f"{o} {n}" for o, n in zip(ops, nums[1:])])


def _arith_plan(nums: list[int], ops: list[str]) -> list[tuple[int, str, int, int, str]]:
  """The evaluation order: all products first (left to right), then + and - left to right.

  Returns (left, op, right, result, expression after the step) per step.
  """
  nums, ops, steps = list(nums), list(ops), []
  while "*" in ops:
    i = ops.index("*")
    r = nums[i] * nums[i + 1]
    left, right = nums[i], nums[i + 1]
    nums[i:i + 2], ops[i:i + 1] = [r], []
    steps.append((left, "*", right, r, _expr(nums, ops)))
  while ops:
    left, op, right = nums[0], ops[0], nums[1]
    r = left + right if op == "+" else left - right
    nums[0:2], ops[0:1] = [r], []
    steps.append((left, op, right, r, _expr(nums, ops)))
  return steps


def _draw_arithmetic(rng: random.Random, level: int) -> _Drawn:
  operands, digits, operators = _ARITH_LEVELS[level]
  nums = [_int(rng, 0, 10 ** digits - 1) for _ in range(operands)]
  ops = [_pick(rng, operators) for _ in range(operands - 1)]
  return "arithmetic:" + _expr(nums, ops).replace(" ", ""), functools.partial(_write_arithmetic, nums, ops)


def _write_arithmetic(nums: list[int], ops: list[str]) -> tuple[str, str, str, str]:
  expr = _expr(nums, ops)
  steps = _arith_plan(nums, ops)
  answer = str(steps[-1][3])
  short = [f"{a} {op} {_paren(b)} = {r}" for a, op, b, r, _ in steps] + [_boxed(answer)]
  long = [f"We compute {expr}."]
  if "*" in ops and len(ops) > 1:
    long.append("Multiplication comes before addition and subtraction; then we go left to right.")
  for i, (a, op, b, r, rest) in enumerate(steps, 1):
    long.append(f"Step {i}: {a} {op} {b}.")
    long.extend(_column_mul(a, b) if op == "*" else _signed_step(a, op, b))
    if i < len(steps):
      long.append(f"Now the expression is {rest}.")
  long.append(_boxed(answer))
  return f"Compute {expr}." + _BOXED_SUFFIX, "\n".join(short), "\n".join(long), answer


# ---------------------------------------------------------------------------------------------------------------
# Linear equations: a*x + b = c*x + d (levels 1-3 have c = 0).


def _latex(q: Fraction) -> str:
  if q.denominator == 1:
    return str(q.numerator)
  sign = "-" if q < 0 else ""
  return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def _side(coef: int, const: int) -> str:
  """coef*x + const as a person writes it: '3x - 5', '-x', 'x + 2', '7'."""
  parts = []
  if coef:
    parts.append({1: "x", -1: "-x"}.get(coef, f"{coef}x"))
  if const or not parts:
    if parts:
      parts.append(f"{'+' if const > 0 else '-'} {abs(const)}")
    else:
      parts.append(str(const))
  return " ".join(parts)


_NONZERO_50 = tuple(v for v in range(-50, 51) if v)
_NONZERO_99 = tuple(v for v in range(-99, 100) if v)
_NONZERO_12 = tuple(v for v in range(-12, 13) if v)


def _draw_linear_coefs(rng: random.Random, level: int) -> tuple[int, int, int, int]:
  """(a, b, c, d) of a*x + b = c*x + d; levels 1-3 keep x on the left only (c = 0)."""
  if level == 1:
    return 1, _pick(rng, _NONZERO_50), 0, _int(rng, -50, 50)
  if level == 2:
    a, x, b = _int(rng, 2, 9), _int(rng, -20, 20), _pick(rng, _NONZERO_50)
    return a, b, 0, a * x + b
  if level == 3:
    return _pick(rng, [v for v in _NONZERO_12 if abs(v) >= 2]), _pick(rng, _NONZERO_99), 0, _int(rng, -99, 99)
  a = _pick(rng, _NONZERO_12)
  c = _pick(rng, [v for v in _NONZERO_12 if v != a])
  return a, _int(rng, -99, 99), c, _int(rng, -99, 99)


def _draw_linear(rng: random.Random, level: int) -> _Drawn:
  a, b, c, d = _draw_linear_coefs(rng, level)
  return f"linear:{a},{b},{c},{d}", functools.partial(_write_linear, a, b, c, d)


def _write_linear(a: int, b: int, c: int, d: int) -> tuple[str, str, str, str]:
  equation = f"{_side(a, b)} = {_side(c, d)}"
  k, m = a - c, d - b  # k*x = m
  x = Fraction(m, k)
  answer = _latex(x)
  short, long = [], [f"We solve {equation} for x."]
  if c:
    short.append(f"{_side(k, b)} = {_side(0, d)}")
    move = f"Subtract {_side(c, 0)} from" if c > 0 else f"Add {_side(-c, 0)} to"
    long.append(f"{move} both sides: {a} - {_paren(c)} = {k}, so {_side(k, b)} = {d}.")
  if b:
    short.append(f"{_side(k, 0)} = {d} - {_paren(b)} = {m}")
    move = f"Subtract {b} from both sides" if b > 0 else f"Add {-b} to both sides"
    long.append(f"{move}: {_side(k, 0)} = {d} - {_paren(b)}.")
    via = f" = {d} + {-b}" if b < 0 else ""
    long.append(f"{d} - {_paren(b)}{via} = {m}, so {_side(k, 0)} = {m}.")
  if k != 1:
    short.append(f"x = {m} / {_paren(k)} = {answer}")
    long.append(f"Divide both sides by {k}: x = {m} / {_paren(k)}.")
    long.extend(_divide_lines(m, k, x))
  check_lhs = _check_side(a, b, x)
  check_rhs = _check_side(c, d, x)
  long.append(f"Check: the left side is {check_lhs}, the right side is {check_rhs}; they agree.")
  assert a * x + b == c * x + d
  short.append(_boxed(answer))
  long.append(_boxed(answer))
  return f"Solve for x: {equation}." + _BOXED_SUFFIX, "\n".join(short), "\n".join(long), answer


def _divide_lines(m: int, k: int, x: Fraction) -> list[str]:
  """m / k as an integer or a reduced fraction, with the sign rule and the gcd spelled out."""
  lines = []
  if m == 0:
    return [f"0 divided by {k} is 0, so x = 0."]
  negative = (m < 0) != (k < 0)
  if m < 0 or k < 0:
    lines.append(f"The signs {'differ' if negative else 'agree'}, so x is {'negative' if negative else 'positive'}:"
                 f" x = {'-' if negative else ''}{abs(m)}/{abs(k)}.")
  g = math.gcd(m, k)
  if x.denominator == 1:
    lines.append(f"{abs(m)} = {abs(k)} * {abs(x.numerator)}, so x = {x.numerator}.")
  elif g > 1:
    lines.append(f"gcd({abs(m)}, {abs(k)}) = {g}: {abs(m)}/{abs(k)} = {abs(m) // g}/{abs(k) // g}, "
                 f"so x = {x.numerator}/{x.denominator}.")
  else:
    lines.append(f"gcd({abs(m)}, {abs(k)}) = 1, so the fraction is reduced: x = {x.numerator}/{x.denominator}.")
  return lines


def _check_side(coef: int, const: int, x: Fraction) -> str:
  """coef*x + const evaluated step by step, exactly."""
  if coef == 0:
    return str(const)
  prod = coef * x
  text = _frac(x) if coef == 1 else f"{coef} * {_paren_frac(x)} = {_frac(prod)}"
  if const:
    text += f", plus {_paren(const)} is {_frac(prod + const)}"
  return text


def _frac(q: Fraction) -> str:
  return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _paren_frac(q: Fraction) -> str:
  return f"({_frac(q)})" if q < 0 or q.denominator != 1 else _frac(q)


# ---------------------------------------------------------------------------------------------------------------
# Public API.

FAMILIES: Mapping[str, Family] = {
    "arithmetic": Family("arithmetic", {
        1: "a ± b, 2 digits", 2: "a ± b, 3 digits", 3: "a op b, 2 digits, + - *",
        4: "a op b op c, 2 digits, + - *", 5: "a op b op c, 3 digits, + - *",
        6: "a op b op c op d, 3 digits, + - *"}, _draw_arithmetic),
    "linear": Family("linear", {
        1: "x + b = c", 2: "a*x + b = c, integer answer", 3: "a*x + b = c, fraction answer",
        4: "a*x + b = c*x + d, fraction answer"}, _draw_linear),
}


def _problem_id(family: str, level: int, canonical: str) -> str:
  return f"{family}/L{level}/{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def generate(family: str, level: int, split: str, n: int, seed: int) -> list[Problem]:
  """`n` distinct problems of one family, level and split; the same arguments always give the same list."""
  fam = _check_args(family, level, split, n)
  rng = random.Random(f"ministral_jax.rewards.tasks|{family}|{level}|{split}|{seed}")
  seen: set[str] = set()
  out: list[Problem] = []
  budget = 50 * n + 1000  # generous for every level; only a request near the size of a small pool runs out
  while len(out) < n and budget:
    budget -= 1
    canonical, write = fam.draw(rng, level)
    if canonical in seen or split_of(canonical) != split:
      continue
    seen.add(canonical)
    out.append(Problem(_problem_id(family, level, canonical), *write()))
  if len(out) < n:
    raise UserError(f"{family} level {level} yielded only {len(out)} distinct {split} problems of the {n} asked "
                    f"for; ask for fewer, or use a higher level (more distinct problems).")
  return out


def _check_args(family: str, level: int, split: str, n: int) -> Family:
  if family not in FAMILIES:
    raise UserError(f"Unknown task family {family!r}; the families are {sorted(FAMILIES)}.")
  fam = FAMILIES[family]
  if level not in fam.levels:
    raise UserError(f"{family} has no level {level!r}; its levels are {sorted(fam.levels)}.")
  if split not in SPLITS:
    raise UserError(f"Unknown split {split!r}; use one of {SPLITS}.")
  if not isinstance(n, int) or n < 0:
    raise UserError(f"The number of problems must be a non-negative integer, got {n!r}.")
  return fam


def to_conversation(problem: Problem, style: Style) -> dict:
  """One `messages` record. "instruct" answers with the short worked solution and no thinking; "short" and
  "long" put that chain of thought in `thinking` and answer with the boxed result alone."""
  if style not in STYLES:
    raise UserError(f"Unknown conversation style {style!r}; use one of {STYLES}.")
  user = {"role": "user", "content": problem.prompt}
  if style == "instruct":
    return {"messages": [user, {"role": "assistant", "content": problem.short_cot}]}
  cot = problem.short_cot if style == "short" else problem.long_cot
  return {"messages": [user, {"role": "assistant", "content": _boxed(problem.answer), "thinking": cot}]}


def write_jsonl(problems: Iterable[Problem], path: str, style: Style) -> None:
  """Writes one conversation per line; atomically, so a reader never sees a half-written file."""
  lines = [json.dumps(to_conversation(p, style), ensure_ascii=False) for p in problems]
  write_text(path, "".join(line + "\n" for line in lines))
