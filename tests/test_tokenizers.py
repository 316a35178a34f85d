"""Tokenizers: the files bundled in mistral-common load offline with the ids the checkpoints expect."""

from __future__ import annotations

import json

import pytest

from ministral_jax.data import tokenizers
from ministral_jax.data.tokenizers import bundled_tokenizer_path, check_vocab_fits, load_tokenizer

# Multilingual, code, odd whitespace and emoji (including a ZWJ sequence and a lone combining mark).
HARD_TEXT = (
    "Grüße, 世界! Привет мир. مرحبا بالعالم. こんにちは\n"
    "def f(x):\n\treturn x  ** 2  # tab + double space\n\n\n"
    "   leading and trailing   \r\n"
    "emoji 😀🚀👩‍💻 e\u0301 ¯\\_(ツ)_/¯"
)

SPM_V3_SPECIALS = {
    "<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[TOOL_CALLS]": 5, "[AVAILABLE_TOOLS]": 6,
    "[/AVAILABLE_TOOLS]": 7, "[TOOL_RESULTS]": 8, "[/TOOL_RESULTS]": 9, "[IMG]": 10, "[PREFIX]": 11,
    "[MIDDLE]": 12, "[SUFFIX]": 13,
}
SPM_V7_SPECIALS = SPM_V3_SPECIALS | {
    "[IMG_BREAK]": 14, "[IMG_END]": 15, "[SYSTEM_PROMPT]": 16, "[/SYSTEM_PROMPT]": 17, "[TOOL_CONTENT]": 18,
}
TEKKEN_SPECIALS = {
    "<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[AVAILABLE_TOOLS]": 5, "[/AVAILABLE_TOOLS]": 6,
    "[TOOL_RESULTS]": 7, "[/TOOL_RESULTS]": 8, "[TOOL_CALLS]": 9, "[IMG]": 10, "<pad>": 11, "[IMG_BREAK]": 12,
    "[IMG_END]": 13, "[PREFIX]": 14, "[MIDDLE]": 15, "[SUFFIX]": 16, "[SYSTEM_PROMPT]": 17,
    "[/SYSTEM_PROMPT]": 18, "[TOOL_CONTENT]": 19,
}

# Deliberately not 34/35 (Ministral 3's ids): the tokenizer must read them from the file.
THINK_RANK, END_THINK_RANK = 23, 24


@pytest.fixture(scope="module")
def loaded():
  """Tekken files take ~1 s each to load; share them across the module."""
  cache: dict[str, tokenizers.Tokenizer] = {}

  def get(name: str) -> tokenizers.Tokenizer:
    filename = tokenizers.BUNDLED_FILES[name]  # "tekken" and "tekken_240911" share one load
    if filename not in cache:
      cache[filename] = load_tokenizer(name)
    return cache[filename]

  return get


@pytest.fixture(scope="module")
def think_tekken_path(tmp_path_factory) -> str:
  """A Ministral-3-like Tekken file: tekken_240911 plus an explicit special-token list with [THINK]/[/THINK]."""
  data = json.loads(bundled_tokenizer_path("tekken_240911").read_text(encoding="utf-8"))
  from mistral_common.tokens.tokenizers.tekken import Tekkenizer

  special = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
  special += [
      {"rank": r, "token_str": f"<SPECIAL_{r}>", "is_control": True} for r in range(len(special), THINK_RANK)
  ]
  special += [
      {"rank": THINK_RANK, "token_str": "[THINK]", "is_control": True},
      {"rank": END_THINK_RANK, "token_str": "[/THINK]", "is_control": True},
  ]
  data["special_tokens"] = special
  # mistral-common accepts an explicit list at any version (it is mandatory above v7); use v13 like newer files.
  data["config"]["version"] = "v13"
  path = tmp_path_factory.mktemp("tok") / "tekken_think.json"
  path.write_text(json.dumps(data), encoding="utf-8")
  return str(path)


@pytest.mark.parametrize(
    "name,kind,vocab_size",
    [
        ("spm_v1", "sentencepiece", 32000),
        ("spm_v2", "sentencepiece", 32768),
        ("spm_v3", "sentencepiece", 32768),
        ("spm_v7", "sentencepiece", 32768),
        ("spm_v7m1", "sentencepiece", 32768),
        ("tekken_240718", "tekken", 131072),
        ("tekken_240911", "tekken", 131072),
        ("tekken", "tekken", 131072),
    ],
)
def test_every_bundled_file_loads_offline_with_expected_vocab_size(loaded, name, kind, vocab_size):
  tok = loaded(name)
  assert tok.kind == kind
  assert tok.vocab_size == vocab_size
  assert tok.path == bundled_tokenizer_path(name)
  assert tok.path.is_file()
  assert (tok.bos_id, tok.eos_id, tok.special_id("<unk>")) == (1, 2, 0)


def test_bundled_names_cover_every_tokenizer_file_in_the_wheel():
  data_dir = bundled_tokenizer_path("tekken").parent
  shipped = {p.name for p in data_dir.iterdir() if ".model" in p.name or p.name.startswith("tekken")}
  assert shipped == set(tokenizers.BUNDLED_FILES.values())


def test_load_by_path_matches_load_by_bundled_name(loaded):
  by_path = load_tokenizer(str(bundled_tokenizer_path("spm_v7")))
  assert by_path.encode(HARD_TEXT) == loaded("spm_v7").encode(HARD_TEXT)


def test_tekken_alias_points_at_tekken_240911():
  assert bundled_tokenizer_path("tekken") == bundled_tokenizer_path("tekken_240911")


def test_pad_id_is_none_for_sentencepiece_and_11_for_tekken(loaded):
  assert loaded("spm_v3").pad_id is None
  assert loaded("tekken").pad_id == 11


@pytest.mark.parametrize("name", ["spm_v3", "spm_v7"])
def test_sentencepiece_hello_world_ids_include_dummy_prefix(loaded, name):
  tok = loaded(name)
  assert tok.encode("Hello world") == [23325, 2294]
  assert tok.encode("Hello world", bos=True, eos=True) == [1, 23325, 2294, 2]


def test_sentencepiece_v1_hello_world_ids(loaded):
  assert loaded("spm_v1").encode("Hello world", bos=True) == [1, 22557, 1526]


@pytest.mark.parametrize("name", ["tekken_240718", "tekken_240911"])
def test_tekken_hello_world_ids_have_no_dummy_prefix(loaded, name):
  tok = loaded(name)
  assert tok.encode("Hello world", bos=True) == [1, 22177, 4304]
  assert tok.encode("Hello world", eos=True) == [22177, 4304, 2]


@pytest.mark.parametrize(
    "name,expected",
    [
        ("spm_v3", SPM_V3_SPECIALS),
        ("spm_v7", SPM_V7_SPECIALS),
        ("tekken_240718", TEKKEN_SPECIALS),
        ("tekken_240911", TEKKEN_SPECIALS),
    ],
)
def test_special_ids_match_the_mistral_files(loaded, name, expected):
  tok = loaded(name)
  assert {token: tok.special_id(token) for token in expected} == expected
  assert all(tok.is_special(i) for i in expected.values())


def test_v3_lacks_system_prompt_and_error_names_files_that_have_it(loaded):
  with pytest.raises(ValueError, match=r"\[SYSTEM_PROMPT\].*mistral_instruct_tokenizer_240323.*spm_v7.*tekken"):
    loaded("spm_v3").special_id("[SYSTEM_PROMPT]")


@pytest.mark.parametrize("name", ["spm_v1", "spm_v3", "spm_v7", "tekken_240718", "tekken_240911"])
def test_hard_text_round_trips_exactly(loaded, name):
  tok = loaded(name)
  ids = tok.encode(HARD_TEXT, bos=True, eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert not any(tok.is_special(i) for i in ids[1:-1])
  assert tok.decode(ids) == HARD_TEXT


@pytest.mark.parametrize("name", ["spm_v7", "tekken"])
def test_special_token_text_is_literal_unless_parse_special(loaded, name):
  tok = loaded(name)
  text = "[INST] hi [/INST]"
  literal = tok.encode(text)
  assert tok.special_id("[INST]") not in literal
  assert tok.decode(literal) == text
  parsed = tok.encode(text, parse_special=True)
  assert parsed[0] == tok.special_id("[INST]") and parsed[-1] == tok.special_id("[/INST]")
  assert tok.decode(parsed, keep_special=True) == text


def test_decode_drops_special_tokens_by_default_and_keeps_them_on_request(loaded):
  tok = loaded("tekken")
  ids = [tok.bos_id, tok.special_id("[INST]"), *tok.encode("hi"), tok.special_id("[/INST]"), tok.eos_id]
  assert tok.decode(ids) == "hi"
  assert tok.decode(ids, keep_special=True) == "<s>[INST]hi[/INST]</s>"


def test_decode_rejects_ids_outside_the_vocab(loaded):
  tok = loaded("spm_v3")
  with pytest.raises(ValueError, match=r"outside \[0, 32768\)"):
    tok.decode([1, 32768])


def test_think_ids_are_read_from_a_file_that_defines_them(think_tekken_path):
  tok = load_tokenizer(think_tekken_path)
  assert tok.kind == "tekken" and tok.vocab_size == 131072
  assert tok.special_id("[THINK]") == THINK_RANK
  assert tok.special_id("[/THINK]") == END_THINK_RANK
  assert tok.special_id("[INST]") == 3 and tok.pad_id == 11
  assert tok.encode("Hello world", bos=True) == [1, 22177, 4304]

  text = "[THINK]Let me think: 2+2=4 🤔[/THINK]The answer is 4."
  ids = tok.encode(text, bos=True, parse_special=True)
  assert ids[:2] == [1, THINK_RANK]
  assert ids.count(END_THINK_RANK) == 1
  assert tok.decode(ids, keep_special=True) == "<s>" + text
  assert tok.decode(ids) == "Let me think: 2+2=4 🤔The answer is 4."
  assert THINK_RANK not in tok.encode(text)  # literal by default
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("name", ["spm_v7", "tekken_240911"])
def test_think_on_a_bundled_file_raises_a_clear_error(loaded, name):
  tok = loaded(name)
  with pytest.raises(ValueError) as err:
    tok.special_id("[THINK]")
  message = str(err.value)
  assert "[THINK]" in message
  assert tok.path.name in message
  assert "Ministral 3" in message and "tekken.json" in message


def test_unknown_bundled_name_lists_the_bundled_names():
  with pytest.raises(ValueError, match=r"unknown bundled tokenizer 'tekken_2099'.*spm_v1.*spm_v7.*tekken_240911"):
    load_tokenizer("tekken_2099")
  with pytest.raises(ValueError, match="bundled names: spm_v1"):
    bundled_tokenizer_path("spm_v99")


def test_missing_file_gives_a_clear_error(tmp_path):
  missing = tmp_path / "tekken.json"
  with pytest.raises(ValueError, match=r"no such tokenizer file .*tekken\.json.*bundled names"):
    load_tokenizer(str(missing))


def test_corrupted_json_gives_a_clear_error(tmp_path):
  broken = tmp_path / "tekken_broken.json"
  broken.write_text('{"config": {"version": "v3", "pattern": ', encoding="utf-8")
  with pytest.raises(ValueError, match=r"could not load tokenizer .*tekken_broken\.json.*bundled names"):
    load_tokenizer(broken)


def test_json_missing_fields_gives_a_clear_error(tmp_path):
  bad = tmp_path / "tekken_bad.json"
  bad.write_text(json.dumps({"config": {"version": "v3"}}), encoding="utf-8")
  with pytest.raises(ValueError, match=r"could not load tokenizer .*tekken_bad\.json"):
    load_tokenizer(bad)


def test_corrupted_sentencepiece_file_gives_a_clear_error(tmp_path):
  broken = tmp_path / "tokenizer.model.v3"
  broken.write_bytes(b"\x00not a sentencepiece model")
  with pytest.raises(ValueError, match=r"could not load tokenizer .*tokenizer\.model\.v3"):
    load_tokenizer(broken)


def test_unrecognised_file_type_gives_a_clear_error(tmp_path):
  odd = tmp_path / "vocab.txt"
  odd.write_text("hello", encoding="utf-8")
  with pytest.raises(ValueError, match=r"cannot tell the tokenizer type"):
    load_tokenizer(odd)


def test_special_tokens_out_of_rank_order_are_rejected(tmp_path):
  from mistral_common.tokens.tokenizers.tekken import Tekkenizer

  data = json.loads(bundled_tokenizer_path("tekken_240911").read_text(encoding="utf-8"))
  # Rank 21 listed at position 20: mistral-common would silently mislabel ids.
  data["special_tokens"] = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
  data["special_tokens"].append({"rank": 21, "token_str": "[THINK]", "is_control": True})
  path = tmp_path / "tekken_misordered.json"
  path.write_text(json.dumps(data), encoding="utf-8")
  with pytest.raises(ValueError, match=r"rank order.*\[THINK\]"):
    load_tokenizer(path)


def test_check_vocab_fits_rejects_a_tekken_tokenizer_on_a_512_row_embedding(loaded):
  tok = loaded("tekken")
  with pytest.raises(ValueError, match=r"131072 ids.*only 512 rows.*vocab_size to at least 131072"):
    check_vocab_fits(tok, 512)
  check_vocab_fits(tok, 131072)
  check_vocab_fits(loaded("spm_v3"), 131072)
