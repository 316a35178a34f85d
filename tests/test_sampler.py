"""The rollout engine (`sample/sampler.py`): what is drawn, what is scored, how often things are compiled and
run, per-row stops, and the same rows on a mesh.

Every check that a rollout's tokens or log-probabilities are right compares against a teacher-forced forward
pass of the model over prompt + completion (`Transformer.apply`, no cache), not against the sampler itself;
the draw's thresholds and frequencies are checked against their sorted definitions and the policy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ministral_jax import sharding
from ministral_jax.model import config, transformer
from ministral_jax.sample import sampler

TINY = config.preset("tiny")
NEW = 12  # max_new_tokens of most tests
# Prompts of different lengths (right-padded to one width); the longest runs past the 32-token original
# context of the tiny YaRN / query temperature during generation.
PROMPTS = [[1, 5, 9, 33, 2, 7], [1, 7], [1, 100, 200, 300, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410,
                                        411, 412, 413, 414, 415, 416, 417, 418, 419]]
NO_STOP = [-1]  # never drawn: every row runs to the length limit


@pytest.fixture(scope="module")
def params():
  return jax.jit(functools.partial(transformer.init_params, TINY))(jax.random.key(0))


def _sampling(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=NEW):
  return sampler.Sampling(temperature, top_p, top_k, max_new_tokens)


def _rollout(params, sampling, samples=1, seed=0, prompts=PROMPTS, stop_ids=NO_STOP, **kw):
  return sampler.rollout(params, TINY, prompts, sampling, jax.random.key(seed), samples=samples,
                         stop_ids=stop_ids, **kw)


@jax.jit
def _forward(params, tokens):
  return transformer.Transformer(TINY).apply({"params": params}, tokens)[0]


def _teacher_forced_logits(params, prompts, out: sampler.Rollout, samples: int) -> list[np.ndarray]:
  """For each row, the logits `[n_generated, vocab]` that predicted its generated tokens, from one forward
  pass over prompt + completion (right-padded: the padding lies after every position that is read)."""
  rows = [list(prompts[r // samples]) + c for r, c in enumerate(out.completions())]
  width = max(len(p) for p in prompts) + NEW
  tokens = np.full((len(rows), width), TINY.pad_id, np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  logits = np.asarray(_forward(params, jnp.asarray(tokens)))
  result = []
  for r, n in enumerate(out.lengths):
    start = len(prompts[r // samples]) - 1  # the logits at the prompt's last token predict the first new one
    result.append(logits[r, start:start + n])
  return result


def test_top_k_1_sampling_equals_greedy(params):
  greedy = _rollout(params, _sampling())
  top1 = _rollout(params, _sampling(temperature=1.0, top_k=1), seed=3)
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)


def test_tiny_top_p_sampling_equals_greedy(params):
  greedy = _rollout(params, _sampling())
  nucleus = _rollout(params, _sampling(temperature=1.0, top_p=1e-6), seed=4)
  np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)


def test_top_k_never_draws_a_token_outside_the_k_most_likely(params):
  k, samples = 3, 4
  out = _rollout(params, _sampling(temperature=1.0, top_k=k), samples=samples, seed=5)
  logits = _teacher_forced_logits(params, PROMPTS, out, samples)
  outside = 0
  for row, lg in zip(out.tokens, logits):
    kth = np.sort(lg, axis=-1)[:, -k]
    drawn = lg[np.arange(len(lg)), row[:len(lg)]]
    outside += int(np.sum(drawn < kth))
  assert outside == 0
  # The check can fail: the same policy without top-k draws outside the top 3 in most steps.
  free = _rollout(params, _sampling(temperature=1.0), samples=samples, seed=5)
  free_logits = _teacher_forced_logits(params, PROMPTS, free, samples)
  assert sum(int(np.sum(lg[np.arange(len(lg)), row[:len(lg)]] < np.sort(lg, axis=-1)[:, -k]))
             for row, lg in zip(free.tokens, free_logits)) > 0


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_log_softmax_over_temperature_of_a_teacher_forced_pass(params, temperature):
  samples = 4
  out = _rollout(params, _sampling(temperature=temperature), samples=samples, seed=6)
  logits = _teacher_forced_logits(params, PROMPTS, out, samples)
  for row, logp, lg, n in zip(out.tokens, out.logprobs, logits, out.lengths):
    expected = jax.nn.log_softmax(jnp.asarray(lg) / (temperature or 1.0), axis=-1)
    np.testing.assert_allclose(logp[:n], np.asarray(expected)[np.arange(n), row[:n]], atol=1e-4)
    if temperature == 0.0:  # and greedy drew the argmax of the same logits
      np.testing.assert_array_equal(row[:n], np.argmax(lg, axis=-1))


def test_greedy_samples_of_a_prompt_all_equal_its_single_greedy_output(params):
  one = _rollout(params, _sampling())
  four = _rollout(params, _sampling(), samples=4)
  assert four.tokens.shape == (4 * len(PROMPTS), NEW)
  np.testing.assert_array_equal(four.tokens, np.repeat(one.tokens, 4, axis=0))
  np.testing.assert_allclose(four.logprobs, np.repeat(one.logprobs, 4, axis=0), atol=1e-6)


def test_samples_at_temperature_1_differ_and_are_deterministic_given_rng(params):
  sampling = _sampling(temperature=1.0)
  a = _rollout(params, sampling, samples=4, seed=7)
  again = _rollout(params, sampling, samples=4, seed=7)
  other = _rollout(params, sampling, samples=4, seed=8)
  np.testing.assert_array_equal(a.tokens, again.tokens)
  np.testing.assert_array_equal(a.logprobs, again.logprobs)
  assert not np.array_equal(a.tokens, other.tokens)
  for p in range(len(PROMPTS)):  # the 4 samples of each prompt are 4 different completions
    assert len({tuple(row) for row in a.tokens[4 * p:4 * p + 4]}) == 4


def _calls_named(jaxpr, name: str) -> list:
  """The jitted calls named `name` anywhere inside a closed jaxpr (nested jits, loops, conds)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.params.get("name") == name:
      found.append(eqn)
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _calls_named(sub.jaxpr, name)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _calls_named(sub, name)
  return found


def test_prefill_runs_once_on_the_prompts_not_once_per_sample(params):
  prompts, samples = 3, 4
  tokens = jnp.zeros((prompts, 8), jnp.int32)
  lengths = jnp.full((prompts,), 3, jnp.int32)
  stops = jnp.full((prompts, 1), -1, jnp.int32)
  traced = jax.make_jaxpr(functools.partial(sampler._rollout, cfg=TINY, sampling=_sampling(), samples=samples))(
      params, tokens=tokens, lengths=lengths, stop_ids=stops, rng=jax.random.key(0))
  prefills = _calls_named(traced.jaxpr, "prefill")
  assert len(prefills) == 1
  token_inputs = [v.aval.shape for v in prefills[0].invars if v.aval.dtype == jnp.int32 and v.aval.ndim == 2]
  assert token_inputs == [(prompts, 8)]  # B prompts, not B * samples rows
  # ... while the decode loop carries every sample's row.
  (rollout,) = _calls_named(traced.jaxpr, "_rollout")
  (loop,) = [e for e in rollout.params["jaxpr"].jaxpr.eqns if e.primitive.name == "while"]
  assert {v.aval.shape[0] for v in loop.outvars if v.aval.ndim >= 1} == {prompts * samples}


def test_stop_tokens_are_per_row_and_the_loop_exits_when_every_row_has_stopped(params):
  # Three rows with the same prompt, so the same greedy tokens, each with its own stop list (one program).
  sampling, prompts = _sampling(max_new_tokens=16), [PROMPTS[0]] * 3
  free = _rollout(params, sampling, prompts=prompts, stop_ids=[[-1, -1]] * 3)
  row = free.completions()[0]
  assert free.steps == 16 and free.stopped.tolist() == [False] * 3
  first_at = {t: row.index(t) for t in row}
  (early, i_early), (late, i_late) = sorted(first_at.items(), key=lambda kv: kv[1])[1:5:3]
  assert 0 < i_early < i_late < 15

  out = _rollout(params, sampling, prompts=prompts, stop_ids=[[early, -1], [late, 509], [-1, -1]])
  assert out.completions() == [row[:i_early + 1], row[:i_late + 1], row]  # row 1 went on past row 0's stop
  assert out.stopped.tolist() == [True, True, False]  # row 2 was cut by the length limit
  np.testing.assert_array_equal(out.lengths, [i_early + 1, i_late + 1, 16])
  assert out.steps == 16
  assert (out.tokens[0, i_early + 1:] == TINY.pad_id).all() and (out.logprobs[0, i_early + 1:] == 0).all()
  np.testing.assert_allclose(out.logprobs[1, :i_late + 1], free.logprobs[1, :i_late + 1], atol=1e-6)

  every_row_stops = _rollout(params, sampling, prompts=prompts, stop_ids=[[early, -1], [late, 509], [late, -1]])
  assert every_row_stops.steps == i_late + 1  # exited early: the longest row's length, not max_new_tokens
  np.testing.assert_array_equal(every_row_stops.lengths, [i_early + 1, i_late + 1, i_late + 1])


def test_prompt_widths_and_batches_within_one_bucket_share_one_compiled_program(params):
  sampling = _sampling(max_new_tokens=5)  # used by no other test: its program is compiled here
  before = sampler._rollout._cache_size()
  a = _rollout(params, sampling, prompts=[[1, 2, 3, 4, 5], [1, 2], [1, 3, 5]])  # width 5, batch 3
  after_first = sampler._rollout._cache_size()
  b = _rollout(params, sampling, prompts=[[1, 2, 3, 4, 5, 6, 7], [1, 2], [1, 3], [4]])  # width 7, batch 4
  assert after_first == before + 1
  assert sampler._rollout._cache_size() == after_first
  assert a.tokens.shape == (3, 5) and b.tokens.shape == (4, 5)
  np.testing.assert_array_equal(a.tokens[1], b.tokens[1])  # the same prompt, alone in its row


@pytest.mark.parametrize("mesh", [dict(data=-1, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)],
                         ids=["data8", "data2_fsdp2_tensor2"])
def test_sharded_rollout_equals_the_unsharded_one_token_for_token(params, mesh):
  sampling, samples = _sampling(temperature=1.0), 4
  ref = _rollout(params, sampling, samples=samples, seed=9)
  partitioner = sharding.Partitioner.from_config(mesh)
  sharded = partitioner.shard_params(params, TINY)
  with partitioner.activate():
    out = _rollout(sharded, sampling, samples=samples, seed=9, partitioner=partitioner)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.lengths, ref.lengths)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
  assert out.steps == ref.steps


@functools.partial(jax.jit, static_argnums=(1, 2))
def _sorted_truncation(logits, top_k, top_p):
  """The definitions, by sorting: the k-th largest logit; the nucleus threshold over the sorted probabilities."""
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(jnp.where(mass_before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return ~jnp.isinf(logits)


def test_top_k_and_top_p_thresholds_equal_their_sorted_definitions():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 512)).astype(np.float32) * 3
  logits[:4, 100:150] = logits[:4, :50]  # ties
  logits[4, :] = 0.0
  logits[4, ::3] = -0.0
  logits[4, 7] = 1.0  # one above a tie of 511 zeros of either sign
  logits[5] = -np.abs(logits[5]) - 50.0
  logits = jnp.asarray(logits)
  truncate = jax.jit(sampler._truncate, static_argnums=(1, 2))
  for top_k, top_p in [(1, 1.0), (7, 1.0), (60, 1.0), (0, 1e-6), (0, 0.5), (0, 0.95), (7, 0.5), (60, 0.95)]:
    np.testing.assert_array_equal(np.asarray(truncate(logits, top_k, top_p)),
                                  np.asarray(_sorted_truncation(logits, top_k, top_p)),
                                  err_msg=f"top_k={top_k} top_p={top_p}")


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.8)])
def test_drawn_tokens_follow_the_truncated_policy(top_k, top_p):
  logits = jnp.full((512,), -4.0).at[:5].set(jnp.array([2.0, 1.5, 1.0, 0.5, 0.0]))
  rows = 40_000
  tokens, logp = sampler._draw(jnp.tile(logits, (rows, 1)), jax.random.key(11), _sampling(0.8, top_p, top_k))
  policy = np.asarray(jax.nn.softmax(logits / 0.8))
  expected = policy * np.asarray(_sorted_truncation(logits / 0.8, top_k, top_p))
  expected /= expected.sum()
  freq = np.bincount(np.asarray(tokens), minlength=512) / rows
  np.testing.assert_allclose(freq, expected, atol=0.01)
  assert (freq[expected == 0] == 0).all()
  np.testing.assert_allclose(np.asarray(logp), np.log(policy)[np.asarray(tokens)], atol=1e-5)
