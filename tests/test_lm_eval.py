"""The lm-evaluation-harness backend against the harness's own Hugging Face backend, and the `lm_eval` task.

One tiny random model with the Tekken vocabulary (the harness needs a tokenizer both backends share: the HF
export ships `tekken.json`, which `AutoTokenizer` loads through mistral-common, the library our tokenizer
wraps) is scored on the three offline tasks by both backends. Tolerances: a loglikelihood request sums a few
fp32 log-probs computed by two programs (XLA, torch) from the same fp32 weights, ~1e-6 apart (measured
1.5e-5 at worst); a rolling document sums ~700 of them, and the HF backend adds each window's in fp32, so
its sum carries ~1e-7 relative rounding (measured 3.6e-4 on sums of ~8000 nats).
"""

import json
import os

import jax
import numpy as np
import pytest

from ministral_jax import sharding
from ministral_jax.checkpoint import convert, orbax_io
from ministral_jax.data import chat, tokenizers
from ministral_jax.errors import UserError
from ministral_jax.model import config, transformer

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from ministral_jax.eval import harness_model, harness_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 256


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny random model (orbax, tokenizer recorded; and its HF export), the offline tasks, our backend."""
  root = tmp_path_factory.mktemp("lm_eval")
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  tok = tokenizers.load_tokenizer("tekken")
  cfg = config.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=MAX_LEN, dtype="float32")
  orbax_io.save_params(root / "orbax", transformer.init_params(cfg, jax.random.key(0)), cfg,
                       extra_metadata={"tokenizer": tok.identity()})
  convert.convert("orbax", "hf", str(root / "orbax"), str(root / "hf"))
  tasks = harness_tasks.write(root / "tasks", n=8, shots=2)
  ours = harness_model.MinistralLM(checkpoint=str(root / "orbax"), batch_size=4, mesh="data=-1",
                                   show_progress=False)
  return root, tasks, ours, tok, cfg


def _evaluate(model, tasks, **kwargs):
  tm = TaskManager(include_path=str(tasks), include_defaults=False)
  return lm_eval.simple_evaluate(model=model, tasks=list(harness_tasks.TASKS), task_manager=tm, bootstrap_iters=0,
                                 log_samples=True, verbosity="ERROR", **kwargs)


@pytest.fixture(scope="module")
def ours_results(setup):
  _, tasks, ours, _, _ = setup
  return _evaluate(ours, tasks)


def _responses(results, task):
  return [[r[0] for r in s["resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _assert_same_scores(a, b, ll_atol=1e-4, rolling_rtol=1e-6):
  """Per request: loglikelihoods within `ll_atol` and the same greedy flags; the same generated strings;
  rolling log-likelihoods within `rolling_rtol`. Then the same accuracies and exact matches."""
  for ra, rb in zip(_responses(a, "mj_code_mc"), _responses(b, "mj_code_mc")):
    np.testing.assert_allclose([r[0] for r in ra], [r[0] for r in rb], atol=ll_atol, rtol=0)
    assert [r[1] for r in ra] == [r[1] for r in rb]
  assert _responses(a, "mj_code_line") == _responses(b, "mj_code_line")
  np.testing.assert_allclose(sum(_responses(a, "mj_code_ppl"), []), sum(_responses(b, "mj_code_ppl"), []),
                             rtol=rolling_rtol)
  for task, metric in (("mj_code_mc", "acc,none"), ("mj_code_mc", "acc_norm,none"),
                       ("mj_code_line", "exact_match,none")):
    assert a["results"][task][metric] == b["results"][task][metric], (task, metric)


def test_our_backend_scores_the_offline_tasks_as_the_harness_hf_backend_scores_the_hf_export(setup, ours_results):
  root, tasks, _, _, _ = setup
  assert (root / "hf" / "tekken.json").is_file()  # the export ships the tokenizer
  from lm_eval.models.huggingface import HFLM
  hf = HFLM(pretrained=str(root / "hf"), batch_size=4, device="cpu", dtype="float32", max_length=MAX_LEN)
  hf_results = _evaluate(hf, tasks)
  _assert_same_scores(ours_results, hf_results)
  assert ours_results["n-samples"] == hf_results["n-samples"]


def test_eight_devices_score_exactly_what_one_device_scores(setup, ours_results):
  root, tasks, _, _, _ = setup
  assert jax.device_count() == 8
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), sharding.MESH_AXES)
  one = harness_model.MinistralLM(checkpoint=str(root / "orbax"), batch_size=4, show_progress=False,
                                  partitioner=sharding.Partitioner(mesh, sharding.RULES))
  _assert_same_scores(ours_results, _evaluate(one, tasks), ll_atol=1e-5, rolling_rtol=1e-7)


def _requests(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _direct_logprob(params, cfg, tokens, n_scored):
  """log p of the last `n_scored` tokens given the ones before, from one plain forward pass."""
  logits, _ = transformer.Transformer(cfg).apply({"params": params}, np.asarray([tokens[:-1]]))
  logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
  return float(sum(logp[len(tokens) - 1 - n_scored + k, t] for k, t in enumerate(tokens[-n_scored:])))


def test_choices_sharing_a_context_share_a_row_and_each_gets_its_own_score(setup):
  _, _, ours, tok, cfg = setup
  context = "def add(a, b):\n    return"
  choices = [" a", " b", " a + b", " None"]
  got = ours.loglikelihood(_requests("loglikelihood", [(context, c) for c in choices]), disable_tqdm=True)
  for choice, (logp, _) in zip(choices, got):
    whole, ctx = tok.encode(context + choice, bos=True), tok.encode(context, bos=True)
    np.testing.assert_allclose(logp, _direct_logprob(ours.params, cfg, whole, len(whole) - len(ctx)), atol=1e-4)


def test_a_context_longer_than_max_length_loses_tokens_on_the_left_and_is_counted(setup):
  _, _, ours, tok, cfg = setup
  before = ours.truncated
  context = " ".join(f"word{i}" for i in range(400))
  (logp, _), = ours.loglikelihood(_requests("loglikelihood", [(context, " end")]), disable_tqdm=True)
  assert ours.truncated == before + 1
  whole = tok.encode(context + " end", bos=True)[-(MAX_LEN + 1):]
  n = len(tok.encode(context + " end", bos=True)) - len(tok.encode(context, bos=True))
  np.testing.assert_allclose(logp, _direct_logprob(ours.params, cfg, whole, n), atol=1e-4)


def test_a_long_document_is_scored_in_windows_that_add_up_to_every_token_once(setup):
  _, _, ours, tok, cfg = setup
  text = " ".join(f"token{i % 37}" for i in range(110))
  ids = tok.encode(text, bos=True)
  assert MAX_LEN < len(ids) <= 2 * MAX_LEN  # two windows
  (total,) = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
  first = [tok.bos_id] + ids[:MAX_LEN - 1]
  expected = _direct_logprob(ours.params, cfg, first + [ids[MAX_LEN - 1]], MAX_LEN)
  expected += _direct_logprob(ours.params, cfg, ids[len(ids) - MAX_LEN - 1:], len(ids) - MAX_LEN)
  np.testing.assert_allclose(total, expected, rtol=1e-6)


def test_generation_stops_at_the_first_stop_string_and_follows_the_greedy_sampler(setup):
  _, _, ours, tok, cfg = setup
  from ministral_jax.sample import sampler
  prompt = "x = 1\ny ="
  (free,) = ours.generate_until(_requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 12})]),
                                disable_tqdm=True)
  greedy = sampler.generate(ours.params, cfg, [tok.encode(prompt, bos=True)], 12, eos_id=tok.eos_id)[0]
  assert free == tok.decode(greedy)
  stop = free[len(free) // 2:len(free) // 2 + 2] or "e"
  (cut,) = ours.generate_until(_requests("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 12})]),
                               disable_tqdm=True)
  assert cut == free.split(stop)[0]


def test_an_empty_request_list_gives_an_empty_answer(setup):
  ours = setup[2]
  assert ours.loglikelihood([]) == [] and ours.loglikelihood_rolling([]) == [] and ours.generate_until([]) == []


def test_requests_that_cannot_be_served_are_one_clear_error(setup):
  ours = setup[2]
  with pytest.raises(UserError, match="longer than max_length"):
    ours.loglikelihood(_requests("loglikelihood", [("a", " b" * (MAX_LEN + 10))]), disable_tqdm=True)
  with pytest.raises(UserError, match="max_gen_toks"):
    ours.generate_until(_requests("generate_until", [("a", {"until": ["\n"], "max_gen_toks": MAX_LEN})]),
                        disable_tqdm=True)
  with pytest.raises(UserError, match="max_length"):
    harness_model.MinistralLM(params=ours.params, model_cfg=ours.cfg, tokenizer=ours.tok, max_length=MAX_LEN + 1,
                              partitioner=ours.partitioner)
  with pytest.raises(UserError, match="Unknown model_args"):
    harness_model.MinistralLM(checkpoint="x", batchsize=4)
  with pytest.raises(UserError, match="checkpoint"):
    harness_model.MinistralLM(checkpoint="", partitioner=ours.partitioner)


def test_the_chat_template_is_the_sft_rendering_of_the_whole_history_and_its_ids_survive_the_text(setup):
  ours = setup[2]
  history = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 1 + 1?"},
             {"role": "assistant", "content": "2"}, {"role": "user", "content": "What is 2 + 2?"}]
  text = ours.apply_chat_template(history)
  expected = chat.render(chat.parse_conversation({"messages": [*history, {"role": "assistant", "content": "4"}]},
                                                 "test"), ours.tok)
  answer = int(np.flatnonzero(np.asarray(expected.mask))[-2])  # "4" then EOS: the last answer's first token
  assert ours.tok_encode(text) == expected.tokens[:answer].tolist()
  assert "What is 1 + 1?" in text and "Answer with a number." in text and text.endswith("[/INST]")
  assert ours.tok_encode(text + " 4") == expected.tokens[:answer].tolist() + ours.tok.encode(" 4")


def test_sampled_generation_follows_the_task_temperature_and_repeats_with_the_seed(setup):
  ours = setup[2]
  args = [("x = 1\ny =", {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0})] * 2
  first = ours.generate_until(_requests("generate_until", args), disable_tqdm=True)
  greedy = ours.generate_until(_requests("generate_until", [(args[0][0], {"until": [], "max_gen_toks": 8})]),
                               disable_tqdm=True)
  assert first[0] != first[1] or first[0] != greedy[0]  # two samples of a near-uniform model differ
  assert ours.generate_until(_requests("generate_until", args), disable_tqdm=True) == first


def _task_config(checkpoint, **eval_fields):
  from ministral_jax import configs
  cfg = configs.load(os.path.join(REPO, "configs", "lm_eval_tiny.py") + f":{checkpoint}")
  cfg.eval.update(eval_fields)
  return cfg


def test_the_lm_eval_task_writes_its_metrics_and_table_to_the_workdir(setup, tmp_path):
  from ministral_jax.eval import harness
  root = setup[0]
  report = harness.run(_task_config(str(root / "orbax"), local_docs=4, batch_size=4, limit=2.0), str(tmp_path))
  saved = json.loads((tmp_path / "lm_eval.json").read_text())
  assert saved["tasks"] == list(harness_tasks.TASKS) and set(saved["results"]) == set(harness_tasks.TASKS)
  assert saved["n-samples"]["mj_code_mc"]["effective"] == 2
  assert 0.0 <= saved["results"]["mj_code_mc"]["acc,none"] <= 1.0
  assert saved["results"]["mj_code_ppl"]["bits_per_byte,none"] == report["results"]["mj_code_ppl"]["bits_per_byte,none"]
  assert "mj_code_line" in (tmp_path / "lm_eval.md").read_text()


def test_an_unknown_task_or_a_missing_checkpoint_is_one_error_before_any_weights_are_read(setup, tmp_path,
                                                                                         monkeypatch):
  from ministral_jax.eval import harness
  root = setup[0]
  monkeypatch.setattr(convert, "load_any", lambda *a, **k: pytest.fail("weights were read"))
  with pytest.raises(UserError, match=r"Unknown lm-eval task\(s\): 'mj_code_mcq' \(did you mean mj_code_mc"):
    harness.run(_task_config(str(root / "orbax"), tasks="mj_code_mcq"), str(tmp_path))
  with pytest.raises(UserError, match="no checkpoint to evaluate"):
    harness.run(_task_config(str(root / "missing")), str(tmp_path))
  with pytest.raises(UserError, match="eval.tasks is empty"):
    harness.run(_task_config(str(root / "orbax"), tasks=" , "), str(tmp_path))
