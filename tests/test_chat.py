"""Chat data: validation, Mistral instruct rendering and its mask, whole-conversation packing, truncation, resume."""

import json
import pathlib
import re

import grain
import numpy as np
import pytest

from ministral_jax.data import chat, pipeline, spm_train, tokenizers

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _words(rng, low: int, high: int) -> str:
  return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))


def _record(i: int) -> dict:
  """Conversation i: 1-3 exchanges, a system prompt for every third, thinking for every fourth."""
  rng = np.random.default_rng(i)
  messages = [{"role": "system", "content": f"system {i}: {_words(rng, 1, 4)}"}] if i % 3 == 0 else []
  for turn in range(1 + i % 3):
    messages.append({"role": "user", "content": f"question {i}.{turn}: {_words(rng, 1, 8)}"})
    answer = {"role": "assistant", "content": f"answer {i}.{turn}: {_words(rng, 1, 10)}"}
    if i % 4 == 1:
      answer["thinking"] = f"think {_words(rng, 1, 6)}"
    messages.append(answer)
  return {"messages": messages, "id": i}


def _write(path: pathlib.Path, records) -> pathlib.Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("chat")
  _write(root / "part_a.jsonl", [_record(i) for i in range(30)])
  _write(root / "part_b.jsonl", [_record(i) for i in range(30, 48)])
  return root


def _cfg(corpus: pathlib.Path, **overrides):
  cfg = pipeline.data_config()
  cfg.update({**dict(source="chat", paths=str(corpus / "*.jsonl"), seq_len=96, spm_vocab_size=400, chat_pack_bins=3),
              **overrides})
  return cfg


@pytest.fixture(scope="module")
def spm(corpus, tmp_path_factory) -> tokenizers.Tokenizer:
  """The project's own SentencePiece, trained by spm_train on the conversations' text."""
  return pipeline.build_tokenizer(_cfg(corpus), str(tmp_path_factory.mktemp("workdir")))


@pytest.fixture(scope="module")
def tekken_v13(tmp_path_factory) -> tokenizers.Tokenizer:
  """A v13 Tekken file: the bundled vocabulary plus every special token mistral-common knows (as [THINK])."""
  from mistral_common.tokens.tokenizers.base import SpecialTokens

  data = json.loads(tokenizers.bundled_tokenizer_path("tekken").read_text())
  count = data["config"]["default_num_special_tokens"]
  names = [t.value for t in SpecialTokens] + [f"<SPECIAL_{i}>" for i in range(len(SpecialTokens), count)]
  data["special_tokens"] = [{"rank": i, "token_str": name, "is_control": True} for i, name in enumerate(names)]
  data["config"]["version"] = "v13"
  data.pop("image", None)
  path = tmp_path_factory.mktemp("tekken") / "tekken_v13.json"
  path.write_text(json.dumps(data))
  return tokenizers.load_tokenizer(path)


def _conversation(*messages, where: str = "test:1") -> chat.Conversation:
  return chat.parse_conversation({"messages": [dict(zip(("role", "content", "thinking"), m)) for m in messages]},
                                 where)


MULTI_TURN = (("system", "You are terse."), ("user", "Hi there"), ("assistant", "Hello!  "),
              ("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "6, of course."))
THINKING = (("system", "Think first."), ("user", "What is 7*6?"), ("assistant", "42 ", "7*6 is 42"),
            ("user", "Sure?"), ("assistant", "Yes."), ("user", "Why?"), ("assistant", "Arithmetic.", "tables"))


def _mistral_common_ids(path: pathlib.Path, messages) -> list[int]:
  """What mistral-common's public API encodes for the conversation in finetuning mode."""
  from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
  from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
  from mistral_common.protocol.instruct.request import ChatCompletionRequest
  from mistral_common.protocol.instruct.validator import ValidationMode
  from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

  def message(role, content, thinking=None):
    if role == "system":
      return SystemMessage(content=content)
    if role == "user":
      return UserMessage(content=content)
    return AssistantMessage(content=[ThinkChunk(thinking=thinking), TextChunk(text=content)] if thinking else content)

  tok = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
  return tok.encode_chat_completion(ChatCompletionRequest(messages=[message(*m) for m in messages])).tokens


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("name", ["tekken", "spm_v7"])
def test_rendering_equals_mistral_common_multi_turn_with_system_prompt(name):
  tok = tokenizers.load_tokenizer(name)
  rendered = chat.render(_conversation(*MULTI_TURN), tok)
  assert rendered.tokens.tolist() == _mistral_common_ids(tok.path, MULTI_TURN)
  assert rendered.tokens.dtype == rendered.mask.dtype == np.int32
  assert len(rendered.turn_ends) == 3 and rendered.turn_ends[-1] == len(rendered.tokens)


def test_rendering_with_thinking_equals_mistral_common_v13(tekken_v13):
  rendered = chat.render(_conversation(*THINKING), tekken_v13)
  assert rendered.tokens.tolist() == _mistral_common_ids(tekken_v13.path, THINKING)
  text = tekken_v13.decode(rendered.tokens, keep_special=True)
  assert text.startswith("<s>[SYSTEM_PROMPT]Think first.[/SYSTEM_PROMPT][INST]What is 7*6?[/INST]"
                         "[THINK]7*6 is 42[/THINK]42 </s>[INST]Sure?[/INST]Yes.</s>")


@pytest.mark.parametrize("name", ["spm_v7", "tekken_v13"])
def test_own_layout_is_mistral_commons_v7_v13_layout(name, tekken_v13):
  """The layout spm_train models get is mistral-common's, spaces and system placement included."""
  tok = tekken_v13 if name == "tekken_v13" else tokenizers.load_tokenizer(name)
  messages = THINKING if name == "tekken_v13" else MULTI_TURN
  own, reference = chat._render_own(_conversation(*messages), tok), chat.render(_conversation(*messages), tok)
  assert own.tokens.tolist() == reference.tokens.tolist() == _mistral_common_ids(tok.path, messages)
  assert own.mask.tolist() == reference.mask.tolist() and own.turn_ends == reference.turn_ends


def test_spm_control_tokens_are_single_ids_never_text(spm):
  ids = [spm.special_id(name) for name in spm_train.CHAT_CONTROL_TOKENS]
  assert len(set(ids)) == 6 and all(spm.is_special(i) for i in ids)
  assert not set(ids) & set(spm.encode("[INST] [/INST] [THINK] [SYSTEM_PROMPT]"))  # text stays text
  rendered = chat.render(_conversation(*THINKING[:3]), spm)
  assert not chat.uses_mistral_common(spm)
  assert spm.decode(rendered.tokens, keep_special=True) == (
      "<s>[SYSTEM_PROMPT]Think first.[/SYSTEM_PROMPT][INST]What is 7*6?[/INST][THINK]7*6 is 42[/THINK]42 </s>")
  assert sorted(rendered.tokens[np.isin(rendered.tokens, ids)].tolist()) == sorted(ids)  # each once, one id each


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("kind", ["spm", "tekken_v13"])
def test_mask_covers_exactly_the_assistant_tokens_and_closing_eos(kind, spm, tekken_v13):
  tok = spm if kind == "spm" else tekken_v13
  messages = THINKING
  rendered = chat.render(_conversation(*messages), tok)
  answers = [m for m in messages if m[0] == "assistant"]
  runs = _runs(rendered.mask)
  assert len(runs) == len(answers)
  for (start, stop), (_, content, *thinking) in zip(runs, answers):
    expected = f"[THINK]{thinking[0]}[/THINK]{content}</s>" if thinking else f"{content.rstrip(' ')}</s>"
    assert tok.decode(rendered.tokens[start:stop], keep_special=True) == expected
  given = tok.decode(rendered.tokens[rendered.mask == 0], keep_special=True)
  assert given == ("<s>[SYSTEM_PROMPT]Think first.[/SYSTEM_PROMPT][INST]What is 7*6?[/INST]"
                   "[INST]Sure?[/INST][INST]Why?[/INST]")
  assert list(rendered.turn_ends) == [stop for _, stop in runs]


# ----------------------------------------------------------------------------- truncation


def test_truncation_drops_whole_trailing_exchanges_and_counts(tmp_path, spm):
  long = "alpha beta gamma delta " * 12
  records = [
      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},  # fits
      {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
                    {"role": "user", "content": long}, {"role": "assistant", "content": long}]},  # loses 1
      {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": long},
                    {"role": "assistant", "content": long}]},  # dropped
  ]
  _write(tmp_path / "train.jsonl", records)
  conversations = chat.read_conversations(str(tmp_path / "train.jsonl"))
  seq_len = 40
  assert len(chat.render(conversations[1].head(2), spm).tokens) <= seq_len + 1 < len(
      chat.render(conversations[2], spm).tokens)
  rendered, dropped = chat.truncate(conversations[1], spm, seq_len + 1)
  assert dropped == 1 and rendered.tokens.tolist() == chat.render(conversations[1].head(2), spm).tokens.tolist()
  assert rendered.mask[-1] == 1 and rendered.tokens[-1] == spm.eos_id  # ends on a whole answer
  assert chat.truncate(conversations[2], spm, seq_len + 1) == (None, 1)
  cfg = _cfg(tmp_path, paths=str(tmp_path / "train.jsonl"), eval_paths=str(tmp_path / "train.jsonl"), seq_len=seq_len)
  it = chat.chat_iterator(cfg, spm, global_batch=2, seed=0)
  assert it.stats == {"conversations": 3, "kept": 2, "truncated": 1, "dropped": 1, "dropped_exchanges": 2}
  assert it.get_state()["pipeline"]["documents"] == 2
  with pytest.raises(ValueError, match="raise data.seq_len"):
    chat.chat_iterator(_cfg(tmp_path, paths=str(tmp_path / "train.jsonl"), eval_paths="x", seq_len=4), spm, 2, 0)


def test_truncation_re_renders_when_the_system_prompt_moves():
  """v3 puts the system prompt into the last user turn, so a cut conversation is not a prefix of the whole."""
  tok = tokenizers.load_tokenizer("tekken")
  conversation = _conversation(*MULTI_TURN)
  full, two = chat.render(conversation, tok), chat.render(conversation.head(2), tok)
  assert len(two.tokens) < len(full.tokens)
  rendered, dropped = chat.truncate(conversation, tok, len(two.tokens))
  assert dropped == 1
  assert rendered.tokens.tolist() == _mistral_common_ids(tok.path, MULTI_TURN[:5])
  assert rendered.tokens.tolist() != full.tokens[: len(rendered.tokens)].tolist()


# ----------------------------------------------------------------------------- packing and resume


def _take(it, n: int) -> list[dict]:
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _segments(batches) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """(tokens, mask) of every packed conversation, in row order, rebuilt from inputs + the final target."""
  out = []
  for b in batches:
    for r in range(len(b["inputs"])):
      seg = b["segment_ids"][r]
      for s in range(1, seg.max() + 1):
        at = np.flatnonzero(seg == s)
        tokens = (*b["inputs"][r, at].tolist(), int(b["targets"][r, at[-1]]))
        out.append((tokens, (0, *b["loss_mask"][r, at].tolist())))
  return out


def _rendered(cfg, tok, split="train") -> dict[tuple[int, ...], tuple[int, ...]]:
  conversations = chat._prepare(cfg, tok, split).conversations
  return {tuple(r.tokens.tolist()): tuple(r.mask.tolist()) for r in (chat.render(c, tok) for c in conversations)}


def test_packing_keeps_conversations_whole_and_apart(corpus, spm):
  cfg = _cfg(corpus)
  batches = _take(chat.chat_iterator(cfg, spm, global_batch=4, seed=0), 8)
  for b in batches:
    assert set(b) == set(chat.FEATURES) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    assert all(v.shape == (4, cfg.seq_len) and v.dtype == np.int32 for v in b.values())
    seg, pos = b["segment_ids"], b["positions"]
    pad = seg == 0
    for row in seg:  # 1, 1, 2, 2, 2, 3, ..., then padding only at the end
      used = row[row > 0]
      assert used[0] == 1 and np.isin(np.diff(used), [0, 1]).all() and (row[len(used):] == 0).all()
    for k in ("inputs", "targets", "positions", "loss_mask"):
      assert (b[k][pad] == 0).all()
    for r in range(4):
      for s in range(1, seg[r].max() + 1):
        at = np.flatnonzero(seg[r] == s)
        np.testing.assert_array_equal(pos[r, at], np.arange(len(at)))  # positions restart per conversation
        np.testing.assert_array_equal(b["targets"][r, at[:-1]], b["inputs"][r, at[1:]])
        assert b["inputs"][r, at[0]] == spm.bos_id and b["targets"][r, at[-1]] == spm.eos_id
  rendered = _rendered(cfg, spm)
  segments = _segments(batches)
  assert len(segments) > 30
  for tokens, mask in segments:  # each packed conversation is one whole rendered conversation, mask shifted along
    assert rendered[tokens] == mask


def _next_row(state) -> int:
  return max(int(s["packer"]["next_row"]) for s in state["slots"].values())


@pytest.mark.parametrize("epochs", [0, 1])
def test_restored_chat_iterator_continues_the_exact_stream(corpus, spm, epochs):
  cfg = _cfg(corpus, max_documents=10, epochs=epochs)
  make = lambda: chat.chat_iterator(cfg, spm, global_batch=2, seed=1)
  it, batches, states = make(), [], []
  for batch in it:  # a finite stream to its end; an infinite one across epoch boundaries
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(batch)
    if len(batches) == 12:
      break
  assert len(batches) < 12 if epochs else len(batches) == 12
  assert any(_next_row(s) for s in states) and any(s["slots"]["0"]["emitted"] for s in states)
  for start in range(len(states)):  # mid-group and group-boundary states
    resumed = make()
    resumed.set_state(states[start])
    rest = list(resumed) if epochs else _take(resumed, len(batches) - start - 1)
    _assert_same(rest, batches[start + 1:])


def test_two_row_ranges_make_the_batches_of_one_process_and_states_say_what_was_read(corpus, spm):
  cfg = _cfg(corpus, epochs=1)
  whole = chat.chat_iterator(cfg, spm, 4, seed=0)
  parts = [chat.chat_iterator(cfg, spm, 4, seed=0, rows=rows) for rows in ((0, 1), (1, 4))]
  reference = _take(whole, 4)  # 4 rows per slot: the second group of 3 (chat_pack_bins) is under way
  halves = [_take(p, 4) for p in parts]
  _assert_same([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)], reference)
  merged = pipeline.merge_states([json.loads(json.dumps(p.get_state())) for p in parts])
  state = whole.get_state()
  assert merged == json.loads(json.dumps(state)) and _next_row(state) > 0
  # The positions the state calls read are exactly the conversations in the rows emitted so far.
  kept = chat._prepare(cfg, spm, "train").conversations
  stream = grain.MapDataset.source(list(kept)).shuffle(seed=state["pipeline"]["shuffle_seed"])
  read = sorted(tuple(chat.render(stream[p], spm).tokens.tolist()) for p in pipeline.read_positions(state))
  assert read == sorted(tokens for tokens, _ in _segments(reference))
  resumed = chat.chat_iterator(cfg, spm, 4, seed=0)
  resumed.set_state(merged)
  _assert_same(_take(resumed, 3), _take(whole, 3))
  # A run continued from here reads every conversation once, even with another batch size.
  state = json.loads(json.dumps(whole.get_state()))
  start, skip = pipeline.stream_position(state)
  assert _next_row(state) > 0 and skip
  second = chat.chat_iterator(_cfg(corpus, epochs=1, start_document=start, skip_documents=",".join(map(str, skip))),
                              spm, 2, seed=0)
  _take(second, 2)
  a, b = pipeline.read_positions(state), pipeline.read_positions(second.get_state())
  assert a.isdisjoint(b) and set(range(second.get_state()["next_document"])) <= a | b


def test_eval_batches_hold_out_or_read_eval_paths_in_order(corpus, spm):
  cfg = _cfg(corpus)
  held_out = [c.where for c in chat.split_conversations(cfg, "eval")]
  train = [c.where for c in chat.split_conversations(cfg, "train")]
  assert held_out and set(held_out).isdisjoint(train) and len(held_out) + len(train) == 48
  cfg = _cfg(corpus, paths=str(corpus / "part_a.jsonl"), eval_paths=str(corpus / "part_b.jsonl"), seq_len=256)
  batches = list(chat.chat_eval_batches(cfg, spm, batch_size=3))
  expected = [tuple(chat.render(c, spm).tokens.tolist()) for c in chat.read_conversations(str(corpus / "part_b.jsonl"))]
  assert sorted(t for t, _ in _segments(batches)) == sorted(expected)
  assert all(b["inputs"].shape == (3, cfg.seq_len) for b in batches) and (batches[-1]["segment_ids"][-1] == 0).any()
  again = list(chat.chat_eval_batches(cfg, spm, batch_size=3, max_batches=2, rows=(1, 3)))
  _assert_same(again, [{k: v[1:3] for k, v in b.items()} for b in batches[:2]])


# ----------------------------------------------------------------------------- bad input

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
BAD = {
    "malformed JSON": ('{"messages": [', "not valid JSON"),
    "no assistant": ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    "assistant first": ({"messages": [{"role": "assistant", "content": "a"}]}, "message 1 is 'assistant' where 'user'"),
    "two users": ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"}]}, "message 2 is 'user' where 'assistant'"),
    "late system": ({"messages": [*GOOD["messages"], {"role": "system", "content": "s"}]},
                    "only the first message may be a system message"),
    "ends with user": ({"messages": [*GOOD["messages"], {"role": "user", "content": "q"}]},
                       "ends with a user message"),
    "empty message": ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]},
                      r"message 1 \(user\) is empty"),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}, *GOOD["messages"]]}, "role 'tool'"),
    "unknown field": ({"messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a", "reasoning": "r"}]},
                      r"unknown field\(s\) \['reasoning'\]"),
    "user thinking": ({"messages": [{"role": "user", "content": "q", "thinking": "t"},
                                    {"role": "assistant", "content": "a"}]}, "only assistant messages may think"),
    "no messages": ({"text": "plain"}, '"messages" list'),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_record_is_an_error_naming_file_and_line(tmp_path, case):
  bad, message = BAD[case]
  path = tmp_path / "data.jsonl"
  path.write_text(json.dumps(GOOD) + "\n\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
  with pytest.raises(ValueError, match=f"{re.escape(str(path))}:3: .*{message}"):
    chat.read_conversations(str(path))


def test_every_bad_line_is_listed_and_missing_control_tokens_are_named(tmp_path, spm, tekken_v13):
  path = _write(tmp_path / "data.jsonl", [GOOD, {"messages": []}, GOOD, {"messages": [GOOD["messages"][1]]}])
  listed = r"(?s)2 bad conversation.*data.jsonl:2: .*empty messages list\n.*data.jsonl:4: "
  with pytest.raises(ValueError, match=listed):
    chat.read_conversations(str(path))
  thinking = _conversation(*THINKING[:3], where="chats.jsonl:7")
  with pytest.raises(ValueError, match=r"chats.jsonl:7: .*thinking.*v13\+.*tekken_240911.json is v3"):
    chat.render(thinking, tokenizers.load_tokenizer("tekken"))
  plain = tmp_path / "plain.model"  # a SentencePiece without the chat control tokens renders the own layout
  plain.write_bytes(tokenizers.bundled_tokenizer_path("spm_v7").read_bytes())
  with pytest.raises(ValueError, match=r"chats.jsonl:7: .*control token '\[THINK\]'.*Fix: .*spm_train"):
    chat.render(thinking, tokenizers.load_tokenizer(plain))
  assert chat.render(thinking, tekken_v13).mask.any()
  with pytest.raises(ValueError, match="data.source='chat'"):
    chat.chat_iterator(pipeline.data_config(), spm, 2, 0)
