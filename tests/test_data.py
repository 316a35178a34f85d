"""Input pipeline: sources, SentencePiece training, packing, checkpointable iteration, errors."""

import json
import pathlib

import numpy as np
import pytest

from ministral_jax.data import pipeline, sources, spm_train

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _doc(i: int) -> str:
  """Deterministic documents of 1 to ~60 words, so some span several 16-token rows."""
  rng = np.random.default_rng(i)
  return f"doc{i}: " + " ".join(rng.choice(WORDS, size=1 + (i * 7) % 60))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
  """40 JSONL records split over two files, plus a cfg-ready tokenizer trained on them."""
  root = tmp_path_factory.mktemp("corpus")
  for part, ids in (("a", range(0, 25)), ("b", range(25, 40))):
    lines = [json.dumps({"text": _doc(i), "id": i}) for i in ids]
    (root / f"part_{part}.jsonl").write_text("\n".join(lines) + "\n")
  return root


def _cfg(corpus: pathlib.Path, **overrides):
  cfg = pipeline.data_config()
  cfg.source = "jsonl"
  cfg.paths = str(corpus / "*.jsonl")
  cfg.seq_len = 16
  cfg.spm_vocab_size = 400
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
  return pipeline.build_tokenizer(_cfg(corpus), str(tmp_path_factory.mktemp("workdir")))


def _take(it, n: int) -> list[dict]:
  return [next(it) for _ in range(n)]


def _stream_documents(batches, tokenizer) -> list[str]:
  """Rebuild the document texts from packed inputs: every document starts with BOS and
  contributes all of its tokens but the final EOS, in stream order, across rows.
  The last one is cut off wherever a prefix of an infinite stream ends."""
  tokens = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches]).tolist()
  starts = [i for i, t in enumerate(tokens) if t == tokenizer.bos_id] + [len(tokens)]
  return [tokenizer.decode(tokens[s + 1 : e]) for s, e in zip(starts, starts[1:])]


def _training_documents(batches, tokenizer) -> list[str]:
  """The shuffled document stream a training iterator packed: row r of every batch packs documents
  r, r+B, r+2B, ... on its own (its slot), so the stream is the slots' documents interleaved. Only
  documents every slot has finished are kept."""
  rows = len(batches[0]["inputs"])
  slots = [_stream_documents([{k: v[r:r + 1] for k, v in b.items()} for b in batches], tokenizer)[:-1]
           for r in range(rows)]
  return [slots[r][k] for k in range(min(map(len, slots))) for r in range(rows)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- packing


def test_packed_rows_keep_documents_apart_and_targets_are_next_tokens(corpus, tokenizer):
  cfg = _cfg(corpus)
  batches = _take(pipeline.train_iterator(cfg, tokenizer, global_batch=4, seed=0), 12)
  for b in batches:
    assert set(b) == {"inputs", "targets", "segment_ids", "positions"}
    assert all(v.shape == (4, 16) and v.dtype == np.int32 for v in b.values())
    seg, pos, inp, tgt = b["segment_ids"], b["positions"], b["inputs"], b["targets"]
    assert (seg[:, 0] == 1).all() and (seg > 0).all()  # an infinite stream packs without padding
    step = np.diff(seg, axis=1)
    assert np.isin(step, [0, 1]).all()  # segments are 1, 2, 3, ... within a row
    new_segment = np.concatenate([np.ones((4, 1), bool), step == 1], axis=1)
    np.testing.assert_array_equal(pos[new_segment], 0)  # positions restart per document
    np.testing.assert_array_equal(pos[:, 1:][step == 0], pos[:, :-1][step == 0] + 1)
    same_doc = step == 0
    np.testing.assert_array_equal(tgt[:, :-1][same_doc], inp[:, 1:][same_doc])  # target = next input token
    # A segment that ends inside a row ends its document, and the next one starts with BOS.
    assert (tgt[:, :-1][step == 1] == tokenizer.eos_id).all()
    assert (inp[:, 1:][step == 1] == tokenizer.bos_id).all()
    assert (inp[pos > 0] != tokenizer.bos_id).all() and (inp != tokenizer.eos_id).all()


def test_eval_pass_reproduces_every_document_in_order_and_pads_with_segment_zero(corpus, tokenizer):
  cfg = _cfg(corpus)
  path = corpus / "part_b.jsonl"
  batches = list(pipeline.eval_batches_from_file(str(path), cfg, tokenizer, batch_size=3))
  assert _stream_documents(batches, tokenizer) == [_doc(i) for i in range(25, 40)]
  targets = np.concatenate([b["targets"][b["segment_ids"] > 0] for b in batches]).tolist()
  assert targets.count(tokenizer.eos_id) == 15
  last = batches[-1]
  assert last["inputs"].shape == (3, 16)
  pad = last["segment_ids"] == 0
  assert pad[-1].any()  # the final row (or rows) end in padding
  for k in ("inputs", "targets", "positions"):
    assert (last[k][pad] == 0).all()
  assert len(list(pipeline.eval_batches_from_file(str(path), cfg, tokenizer, batch_size=3, max_batches=2))) == 2


# ----------------------------------------------------------------------------- checkpointing and order


@pytest.mark.parametrize("k", [1, 5, 17])
def test_restored_iterator_continues_the_exact_stream(corpus, tokenizer, k):
  cfg = _cfg(corpus)
  make = lambda: pipeline.train_iterator(cfg, tokenizer, global_batch=2, seed=3)
  reference = _take(make(), k + 8)
  it = make()
  _take(it, k)
  state = json.loads(json.dumps(it.get_state()))
  resumed = make()
  resumed.set_state(state)
  _assert_same(_take(resumed, 8), reference[k:])


def test_restore_across_an_epoch_boundary_and_state_records_the_epoch(corpus, tokenizer):
  cfg = _cfg(corpus, max_documents=6)
  make = lambda: pipeline.train_iterator(cfg, tokenizer, global_batch=2, seed=0)
  it, batches, states = make(), [], []
  while not states or states[-1]["epoch"] < 2:
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  assert [s["epoch"] for s in states[:1]] == [0] and any(s["epoch"] == 1 for s in states)
  for start in range(len(states)):  # every kind of packer state, mid-document or between documents
    resumed = make()
    resumed.set_state(states[start])
    _assert_same(_take(resumed, len(batches) - start), batches[start:])


def test_each_epoch_is_reshuffled_and_seeds_give_different_orders(corpus, tokenizer):
  cfg = _cfg(corpus)

  def epochs(seed: int, shuffle_seed: int = 0) -> list[str]:
    it = pipeline.train_iterator(_cfg(corpus, shuffle_seed=shuffle_seed), tokenizer, 4, seed)
    return _training_documents(_take(it, 60), tokenizer)

  train_docs = {e.read() for e in pipeline._file_documents(cfg, "train")}
  seed0 = epochs(0)
  n = len(train_docs)
  first, second = seed0[:n], seed0[n : 2 * n]
  assert set(first) == set(second) == train_docs
  assert first != second
  assert epochs(0) == seed0
  assert epochs(1)[:n] != first
  assert epochs(0, shuffle_seed=1)[:n] != first


def test_processes_reading_their_rows_make_the_batches_of_one_process(corpus, tokenizer):
  """Two processes (rows 0-1 and 2-3 of a batch of 4) together give one process's batches and read
  disjoint documents (in one epoch); a state saved by both resumes one process, and back."""
  cfg = _cfg(corpus, epochs=1)
  whole = pipeline.train_iterator(cfg, tokenizer, 4, seed=0)
  parts = [pipeline.train_iterator(cfg, tokenizer, 4, seed=0, rows=rows) for rows in ((0, 2), (2, 4))]
  reference = _take(whole, 6)
  halves = [_take(p, 6) for p in parts]
  _assert_same([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)], reference)
  shards = [set(_training_documents(h, tokenizer)) for h in halves]
  assert shards[0] and shards[1] and shards[0].isdisjoint(shards[1])
  assert shards[0] | shards[1] <= {e.read() for e in pipeline._file_documents(cfg, "train")}
  merged = pipeline.merge_states([json.loads(json.dumps(p.get_state())) for p in parts])
  assert merged["next_document"] == whole.get_state()["next_document"]
  assert pipeline.read_positions(merged) == pipeline.read_positions(whole.get_state())
  resumed = pipeline.train_iterator(cfg, tokenizer, 4, seed=0)
  resumed.set_state(merged)
  _assert_same(_take(resumed, 2), _take(whole, 2))
  second = pipeline.train_iterator(cfg, tokenizer, 4, seed=0, rows=(2, 4))
  second.set_state(json.loads(json.dumps(whole.get_state())))
  _assert_same(_take(second, 1), [{k: v[2:4] for k, v in b.items()} for b in _take(whole, 1)])


def test_a_run_continued_from_another_reads_every_document_once_even_with_another_batch(corpus, tokenizer):
  """Slots stop at different documents; the next run starts at the first unread one and skips those
  some slot already read, so across runs (and batch sizes) no document repeats and none is left out."""
  first = pipeline.train_iterator(_cfg(corpus, epochs=1), tokenizer, 4, seed=0)
  _take(first, 5)
  state = json.loads(json.dumps(first.get_state()))
  start, skip = pipeline.stream_position(state)
  assert skip  # the slots did stop at different places
  second = pipeline.train_iterator(_cfg(corpus, epochs=1, start_document=start, skip_documents=",".join(map(str, skip))),
                                   tokenizer, 2, seed=0)
  _take(second, 6)
  a, b = pipeline.read_positions(state), pipeline.read_positions(second.get_state())
  assert a.isdisjoint(b) and set(range(second.get_state()["next_document"])) <= a | b


def test_state_from_a_different_pipeline_is_refused(corpus, tokenizer):
  it = pipeline.train_iterator(_cfg(corpus), tokenizer, 2, seed=0)
  other = pipeline.train_iterator(_cfg(corpus, seq_len=32), tokenizer, 2, seed=0)
  with pytest.raises(ValueError, match="seq_len"):
    other.set_state(it.get_state())


# ----------------------------------------------------------------------------- sources


def test_builtin_corpus_has_a_fixed_disjoint_split():
  keyed = sources.builtin_entries()
  keys = [k for k, _ in keyed]
  assert keys == [k for k, _ in sources.builtin_entries()]
  assert "argparse.py" in keys and any(k.startswith("pydoc_data/topics.py:") for k in keys)
  assert not any(part in ("test", "tests", "site-packages") for k in keys for part in k.split("/")[:-1])
  by_key = [(k, k) for k in keys]
  train, eval_ = sources.split_entries(by_key, "train"), sources.split_entries(by_key, "eval")
  assert set(train).isdisjoint(eval_) and len(train) + len(eval_) == len(keys)
  assert 0 < len(eval_) < 0.05 * len(keys)
  cfg = pipeline.data_config()
  assert len(pipeline.documents(cfg, "train")) == len(train)
  first_eval = sources.split_entries(keyed, "eval")[0]
  assert pipeline.documents(cfg, "eval")[0] == (first_eval if isinstance(first_eval, str) else first_eval.read())


def test_spm_tokenizer_is_trained_once_cached_and_round_trips(tmp_path):
  cfg = pipeline.data_config()
  cfg.max_documents = 30
  cfg.spm_vocab_size = 512
  tok = pipeline.build_tokenizer(cfg, str(tmp_path / "run1"))
  assert tok.path.parent == tmp_path / "run1" / "tokenizer" and tok.vocab_size == 512
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  mtime = tok.path.stat().st_mtime_ns
  again = pipeline.build_tokenizer(cfg, str(tmp_path / "run1"))
  assert again.path == tok.path and again.path.stat().st_mtime_ns == mtime
  assert [p.name for p in (tmp_path / "run1" / "tokenizer").iterdir()] == [tok.path.name]
  elsewhere = pipeline.build_tokenizer(cfg, str(tmp_path / "run2"))
  assert elsewhere.path.read_bytes() == tok.path.read_bytes()  # deterministic training
  text = "def f(x):\n    return {'é': x}  # ∑ 2024\n\n\tdone\n"
  assert tok.decode(tok.encode(text)) == text


def test_text_globs_split_into_paragraphs_lines_or_files(tmp_path):
  (tmp_path / "one.txt").write_text("first para\nstill first\n\n\nsecond para\n")
  (tmp_path / "two.txt").write_text("third\n")
  (tmp_path / "notes.md").write_text("ignored by the glob\n")
  count = lambda unit: len(sources.file_entries(str(tmp_path / "*.txt"), jsonl_field=None, text_unit=unit))
  assert (count("paragraph"), count("line"), count("file")) == (3, 4, 2)
  texts = [e.read() for _, e in sources.file_entries(str(tmp_path / "*.txt"), jsonl_field=None)]
  assert texts == ["first para\nstill first", "second para", "third"]
  both = sources.file_entries(f"{tmp_path}/one.txt, {tmp_path}/*.md", jsonl_field=None, text_unit="file")
  assert [k for k, _ in both] == ["notes.md", "one.txt"]


def test_jsonl_eval_paths_replace_the_hold_out(corpus, tokenizer):
  cfg = _cfg(corpus, paths=str(corpus / "part_a.jsonl"), eval_paths=str(corpus / "part_b.jsonl"))
  assert len(pipeline.documents(cfg, "train")) == 25
  assert [pipeline.documents(cfg, "eval")[i] for i in range(15)] == [_doc(i) for i in range(25, 40)]
  held_out = pipeline.documents(_cfg(corpus), "eval")
  assert 0 < len(held_out) < len(pipeline.documents(_cfg(corpus), "train"))


def _build_tiny_tfds(data_dir: pathlib.Path) -> None:
  """A two-split text dataset written as array_record by TFDS itself (no TensorFlow needed)."""
  import tensorflow_datasets as tfds

  class TinyDocs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(range(30)), "validation": self._generate_examples(range(30, 36))}

    def _generate_examples(self, ids):
      for i in ids:
        yield i, {"text": _doc(i)}

  TinyDocs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_source_reads_a_locally_built_dataset(tmp_path, corpus, tokenizer):
  _build_tiny_tfds(tmp_path)
  cfg = _cfg(corpus, source="tfds", tfds_name="tiny_docs", tfds_data_dir=str(tmp_path))
  train = pipeline.documents(cfg, "train")
  assert sorted(train[i] for i in range(len(train))) == sorted(_doc(i) for i in range(30))
  it = pipeline.train_iterator(cfg, tokenizer, 2, seed=0)
  assert set(_training_documents(_take(it, 80), tokenizer)) == {_doc(i) for i in range(30)}
  evals = list(pipeline.eval_batches(cfg, tokenizer, batch_size=4))
  assert sorted(_stream_documents(evals, tokenizer)) == sorted(_doc(i) for i in range(30, 36))
  with pytest.raises(ValueError, match="no_such_dataset"):
    pipeline.documents(_cfg(corpus, source="tfds", tfds_name="no_such_dataset", tfds_data_dir=str(tmp_path)), "train")
  cfg.tfds_field = "body"
  with pytest.raises(ValueError, match="tfds_field"):
    pipeline.documents(cfg, "train")


# ----------------------------------------------------------------------------- errors


def test_glob_matching_nothing_is_an_error_naming_the_pattern(tmp_path, tokenizer):
  cfg = _cfg(tmp_path, paths=str(tmp_path / "missing-*.jsonl"))
  with pytest.raises(ValueError, match="missing-\\*.jsonl.*matches no files"):
    pipeline.train_iterator(cfg, tokenizer, 2, seed=0)


def test_empty_file_is_an_error(tmp_path, tokenizer):
  (tmp_path / "empty.txt").write_text("\n  \n")
  cfg = _cfg(tmp_path, source="text", paths=str(tmp_path / "empty.txt"))
  with pytest.raises(ValueError, match="empty.txt is empty"):
    pipeline.train_iterator(cfg, tokenizer, 2, seed=0)
  with pytest.raises(ValueError, match="empty.txt is empty"):
    pipeline.eval_batches_from_file(str(tmp_path / "empty.txt"), cfg, tokenizer, 2)


def test_unknown_source_and_bad_records_are_errors(tmp_path, tokenizer):
  with pytest.raises(ValueError, match="unknown data source 'csv'"):
    pipeline.train_iterator(_cfg(tmp_path, source="csv"), tokenizer, 2, seed=0)
  (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
  with pytest.raises(ValueError, match="record 1 has no string field 'text'"):
    pipeline.documents(_cfg(tmp_path, paths=str(tmp_path / "bad.jsonl")), "train")
  (tmp_path / "one.jsonl").write_text('{"text": "only one"}\n')
  with pytest.raises(ValueError, match="no documents"):
    pipeline.documents(_cfg(tmp_path, paths=str(tmp_path / "one.jsonl")), "eval")
  with pytest.raises(ValueError, match="spm_vocab_size=100 is too small"):
    spm_train.train_or_load(["some text"], 100, tmp_path)
