"""Variable-length sequences: padding, packing, attention masks and the
byte-level text source, against hand-written rows and files read whole."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import pipeline, sequence, text_convert
from trainer.data.readers import text, token_records
from trainer.errors import UserError
from trainer.task import Task

pytestmark = pytest.mark.timeout(120)

P = 99  # a pad id in the pure-function tests


# ---- pure functions ---------------------------------------------------------


def test_pack_rows_is_next_fit_in_order():
  # 3+2 fit in 6, 4 does not; 4+1 fit, 5 does not; 5 alone.
  np.testing.assert_array_equal(sequence.pack_rows([3, 2, 4, 1, 5], 6),
                                [0, 2, 4, 5])
  np.testing.assert_array_equal(sequence.pack_rows([6, 6, 1], 6), [0, 1, 2, 3])
  np.testing.assert_array_equal(sequence.pack_rows([], 6), [0])
  with pytest.raises(ValueError, match="1..6 prediction slots"):
    sequence.pack_rows([7], 6)


def test_packed_batch_matches_hand_written_rows():
  a, b, c = [10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36]
  got = sequence.packed_batch([[a, b], [c]], 6, P)
  want = {
      "tokens": [[10, 11, 12, 20, 21, P], [30, 31, 32, 33, 34, 35]],
      "targets": [[11, 12, 13, 21, 22, P], [31, 32, 33, 34, 35, 36]],
      "weights": [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]],
      "segment_ids": [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]],
      "positions": [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]],
  }
  for key in sequence.KEYS:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert got["weights"].dtype == np.float32 and got["tokens"].dtype == np.int32


def test_no_target_crosses_a_document():
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 50, rng.integers(2, 10)) for _ in range(40)]
  first = sequence.pack_rows([len(d) - 1 for d in docs], 12)
  rows = [docs[first[r]:first[r + 1]] for r in range(len(first) - 1)]
  got = sequence.packed_batch(rows, 12, P)
  for r, row_docs in enumerate(rows):
    seg, real = got["segment_ids"][r], got["weights"][r] > 0
    assert len(set(seg[real])) == len(row_docs)
    for s, doc in enumerate(row_docs, start=1):
      here = seg == s
      # A document's slots are its own tokens and next tokens, nothing else.
      np.testing.assert_array_equal(got["tokens"][r][here], doc[:-1])
      np.testing.assert_array_equal(got["targets"][r][here], doc[1:])
      np.testing.assert_array_equal(got["positions"][r][here],
                                    np.arange(len(doc) - 1))
    np.testing.assert_array_equal(got["weights"][r], seg > 0)


def test_padded_lengths_come_from_a_small_fixed_set():
  rng = np.random.default_rng(1)
  seen, buckets_seen = set(), set()
  for _ in range(60):
    docs = [np.arange(n + 1) for n in rng.integers(1, 101, 5)]
    batch = sequence.pad_batch(docs, P, multiple=16)
    longest = max(len(d) - 1 for d in docs)
    length = batch["tokens"].shape[1]
    assert length >= longest and length - longest < 16 and length % 16 == 0
    seen.add(length)
    buckets_seen.add(sequence.pad_batch(docs, P, buckets=(32, 64, 100))
                     ["tokens"].shape[1])
    for row, doc in enumerate(docs):
      n = len(doc) - 1
      np.testing.assert_array_equal(batch["tokens"][row, :n], doc[:-1])
      np.testing.assert_array_equal(batch["targets"][row, :n], doc[1:])
      assert batch["weights"][row].sum() == n
      assert (batch["tokens"][row, n:] == P).all()
  assert seen <= {16, 32, 48, 64, 80, 96, 112}
  assert buckets_seen <= {32, 64, 100}
  with pytest.raises(ValueError, match="largest bucket"):
    sequence.padded_length(101, buckets=(32, 100))


def test_attention_mask_blocks_other_segments():
  seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1],
                  [1, 1, 2, 2, 0, 0]], np.int32)
  want = np.zeros([3, 6, 6], bool)
  for b in range(3):
    for i in range(6):
      for j in range(i + 1):
        want[b, i, j] = seg[b, i] == seg[b, j]
  np.testing.assert_array_equal(
      np.asarray(sequence.attention_mask(tf.constant(seg))), want)
  np.testing.assert_array_equal(
      np.asarray(sequence.attention_mask(tf.constant(seg), causal=False)),
      seg[:, :, None] == seg[:, None, :])
  # On a functional model's symbolic input of unknown length.
  symbolic = keras.Input((None,), dtype="int32")
  model = keras.Model(symbolic, sequence.attention_mask(symbolic))
  np.testing.assert_array_equal(np.asarray(model(seg)), want)
  # Through a real attention layer: changing segment 1 leaves segment 2's
  # outputs exactly as they were.
  layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, seed=0)
  x = tf.random.stateless_normal([1, 6, 8], seed=[1, 2])
  y = x + tf.constant([[[5.0]] * 2 + [[0.0]] * 4]) * tf.ones([1, 6, 8])
  mask = sequence.attention_mask(tf.constant(seg[:1]))
  out_x = layer(x, x, attention_mask=mask).numpy()
  out_y = layer(y, y, attention_mask=mask).numpy()
  np.testing.assert_array_equal(out_x[0, 2:5], out_y[0, 2:5])
  assert np.abs(out_x[0, :2] - out_y[0, :2]).max() > 1e-3


def test_a_packed_document_reads_as_it_would_alone():
  """A small transformer fed tokens, positions and the mask: a document's
  outputs in a packed row equal its outputs alone in a padded row."""
  tokens = keras.Input((None,), dtype="int32")
  positions = keras.Input((None,), dtype="int32")
  segments = keras.Input((None,), dtype="int32")
  x = (keras.layers.Embedding(40, 8)(tokens)
       + keras.layers.Embedding(16, 8)(positions))
  x = x + keras.layers.MultiHeadAttention(2, 4, seed=1)(
      x, x, attention_mask=sequence.attention_mask(segments))
  model = keras.Model([tokens, positions, segments], keras.layers.Dense(40)(x))
  a, b = [1, 2, 3, 4, 5], [6, 7, 8, 9]
  packed = sequence.packed_batch([[a, b]], 8, 0)
  alone = sequence.pad_batch([b], 0, multiple=8)
  run = lambda t: model([t["tokens"], t["positions"],  # noqa: E731
                         t["segment_ids"]]).numpy()[0]
  np.testing.assert_allclose(run(packed)[4:7], run(alone)[:3], atol=1e-6)


# ---- the text source --------------------------------------------------------


def _corpus(tmp_path, count=30):
  """Files of different lengths (some longer than several pieces), an empty
  one, a non-matching one and one in a skipped folder."""
  rng = np.random.default_rng(7)
  contents = {}
  for i in range(count):
    sub = "pkg/" if i % 3 == 0 else ""
    data = bytes(rng.integers(0, 256, int(rng.integers(1, 40)), np.uint8))
    contents[f"{sub}f{i:02d}.py"] = data
  for rel, data in contents.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(data)
  (tmp_path / "empty.py").write_bytes(b"")
  (tmp_path / "notes.txt").write_bytes(b"not python")
  (tmp_path / "site-packages").mkdir(parents=True)
  (tmp_path / "site-packages" / "skip.py").write_bytes(b"skipped")
  return contents


def _all_rows(source) -> dict:
  features, labels = source.gather(tf.range(source.num_examples,
                                            dtype=tf.int64))
  return {k: v.numpy() for k, v in {**features, **labels}.items()}


def _pairs(rows) -> list:
  """Every real (input, target) pair of the rows, sorted."""
  real = rows["weights"] > 0
  return sorted(zip(rows["tokens"][real].tolist(),
                    rows["targets"][real].tolist()))


def test_text_split_is_disjoint_stable_and_complete(tmp_path):
  contents = _corpus(tmp_path)
  corpus = text.list_corpus(str(tmp_path))
  assert set(corpus.paths) == set(contents)   # empty, .txt, skipped: out
  held = {p for p in corpus.paths if text.is_heldout(p, 0.3)}
  assert 0 < len(held) < len(contents)
  # A hash of the path, not Python's salted hash(): the same on every run.
  assert [text.is_heldout(f"f{i:02d}.py", 0.5) for i in range(1, 9)] == [
      True, True, False, True, True, False, True, False]
  sources = {s: text.text_source(str(tmp_path), s, 8, packed=False,
                                 heldout_fraction=0.3) for s in text.SPLITS}
  # Every file's bytes are predicted exactly once, in the split it hashes to.
  for split, source in sources.items():
    files = [d for p, d in contents.items() if (p in held) == (split == "test")]
    want = sorted(pair for d in files
                  for pair in zip([text.BOS, *d], [*d, text.EOS]))
    assert _pairs(_all_rows(source)) == want, split
  # A new file elsewhere changes no other file's split.
  (tmp_path / "new.py").write_bytes(b"x = 1\n")
  text.list_corpus.cache_clear()
  again = text.list_corpus(str(tmp_path))
  again = {p for p in again.paths if text.is_heldout(p, 0.3)}
  assert again - {"new.py"} == held


def test_text_pieces_match_hand_written_tokens(tmp_path):
  (tmp_path / "a.py").write_bytes(b"abcdefghij")   # 11 slots: 4 + 4 + 3
  (tmp_path / "b.py").write_bytes(b"xy")          # 3 slots
  B, E = text.BOS, text.EOS
  a = [B, *b"abcdefghij", E]
  # Pieces overlap by one token: every prediction is made exactly once.
  want = [a[0:5], a[4:9], a[8:12], [B, *b"xy", E]]
  split = "test" if text.is_heldout("a.py", 0.5) else "train"
  source = text.text_source(str(tmp_path), split, 4, packed=False,
                            heldout_fraction=0.5, pad_multiple=4)
  same = text.is_heldout("a.py", 0.5) == text.is_heldout("b.py", 0.5)
  assert source.num_examples == 3 + same
  got = _all_rows(source)
  assert got["tokens"].shape == (source.num_examples, 4)
  for row, doc in enumerate(want[:3 + same]):
    n = len(doc) - 1
    np.testing.assert_array_equal(got["tokens"][row, :n], doc[:-1])
    np.testing.assert_array_equal(got["targets"][row, :n], doc[1:])
    assert got["weights"][row].sum() == n
  assert source.describe(2).endswith("a.py tokens 8-12")


def test_text_packed_rows_cover_each_file_once(tmp_path):
  contents = _corpus(tmp_path)
  source = text.text_source(str(tmp_path), "train", 16, packed=True,
                            heldout_fraction=0.3, seed=3)
  rows = _all_rows(source)
  assert rows["tokens"].shape == (source.num_examples, 16)
  files = [d for p, d in contents.items() if not text.is_heldout(p, 0.3)]
  want = sorted(pair for d in files
                for pair in zip([text.BOS, *d], [*d, text.EOS]))
  assert _pairs(rows) == want
  # Several documents share rows, and their positions restart.
  assert rows["segment_ids"].max() >= 2
  two = rows["segment_ids"] == 2
  assert (rows["positions"][two] == 0).any()
  # Padding only ever fills a row's end.
  real = rows["weights"] > 0
  assert (np.diff(real.astype(int), axis=1) <= 0).all()


def test_text_rows_do_not_depend_on_how_many_are_asked(tmp_path):
  _corpus(tmp_path)
  make = lambda: text.text_source(str(tmp_path), "train", 16,  # noqa: E731
                                  heldout_fraction=0.3, seed=5)
  whole = _all_rows(make())
  source = make()
  order = np.random.default_rng(0).permutation(source.num_examples)
  for chunk in np.array_split(order, 5):
    features, labels = source.gather(tf.constant(chunk, tf.int64))
    for key, value in {**features, **labels}.items():
      np.testing.assert_array_equal(value.numpy(), whole[key][chunk])


class _Task(Task):
  """The two hooks the pipeline calls."""

  def __init__(self, source):
    self._source = source

  def source(self, split):
    del split
    return self._source

  def preprocess(self, features, labels, meta, training):
    del meta, training
    return features, labels


def test_pipeline_rows_same_for_every_topology_and_resume(tmp_path):
  _corpus(tmp_path)
  task = _Task(text.text_source(str(tmp_path), "train", 16,
                                heldout_fraction=0.3, seed=5))
  take = lambda ds, n: [b for _, b in zip(range(n), ds)]  # noqa: E731
  one = take(pipeline.train_dataset(task, "train", 4, seed=9,
                                    start_position=0), 4)
  resumed = take(pipeline.train_dataset(task, "train", 4, seed=9,
                                        start_position=8), 2)
  # Two workers of one replica each: worker w builds rows [2w, 2w + 2).
  shares = [take(pipeline.worker_train_dataset(
      task, "train", 4, seed=9, start_position=0, num_replicas=2,
      first_replica=w, local_replicas=1), 4) for w in range(2)]
  for b, (features, labels, _) in enumerate(one):
    for key in ("tokens", "segment_ids", "positions"):
      whole = features[key].numpy()
      if b >= 2:
        np.testing.assert_array_equal(resumed[b - 2][0][key].numpy(), whole)
      np.testing.assert_array_equal(
          np.concatenate([s[b][0][key].numpy() for s in shares]), whole)
    np.testing.assert_array_equal(
        np.concatenate([s[b][1]["targets"].numpy() for s in shares]),
        labels["targets"].numpy())


def test_text_source_errors(tmp_path):
  with pytest.raises(UserError, match="is not a folder"):
    text.text_source(str(tmp_path / "missing"), "train", 16)
  (tmp_path / "a.txt").write_bytes(b"abc")
  with pytest.raises(UserError, match="no non-empty file matching"):
    text.text_source(str(tmp_path), "train", 16)
  contents = _corpus(tmp_path)
  with pytest.raises(UserError, match="names 'valid'; the corpus has"):
    text.text_source(str(tmp_path), "valid", 16)
  source = text.text_source(str(tmp_path), "train", 16, packed=False)
  for rel, data in contents.items():
    (tmp_path / rel).write_bytes(data + b"!")
  with pytest.raises((ValueError, tf.errors.OpError),
                     match="corpus changed under the run"):
    source.gather(tf.range(source.num_examples, dtype=tf.int64))


def test_python_library_sources_list_without_reading(monkeypatch):
  root = os.path.dirname(os.__file__)
  opened = []
  real_open = os.open
  monkeypatch.setattr(os, "open",
                      lambda *a, **k: opened.append(a) or real_open(*a, **k))
  source = text.text_source(root, "test", 128)
  assert source.num_examples > 1000 and not opened
  features, labels = source.gather(tf.constant([0, 5], tf.int64))
  assert features["tokens"].shape == (2, 128) and len(opened) >= 2


# ---- token ids in ArrayRecord files -----------------------------------------


def test_cut_overlaps_by_one_token():
  got = token_records.cut(np.arange(10), 4)
  assert [g.tolist() for g in got] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8],
                                       [8, 9]]
  assert [g.tolist() for g in token_records.cut(np.arange(2), 4)] == [[0, 1]]


def test_token_records_read_back_as_the_text_source(tmp_path):
  contents = _corpus(tmp_path / "corpus")
  written = text_convert.convert_text(str(tmp_path / "corpus"),
                                      str(tmp_path / "out"), shards=2,
                                      heldout_fraction=0.3)
  for split in text.SPLITS:
    from_text = _all_rows(text.text_source(
        str(tmp_path / "corpus"), split, 16, packed=False,
        heldout_fraction=0.3))
    from_records = _all_rows(token_records.token_source(
        written[split], 16, text.PAD, packed=False))
    for key in sequence.KEYS:   # the same documents in the same order
      np.testing.assert_array_equal(from_records[key], from_text[key])
    packed = token_records.token_source(written[split], 16, text.PAD,
                                        seed=2)
    assert _pairs(_all_rows(packed)) == _pairs(from_text)
  assert len(contents) > 0


def test_token_records_cut_long_documents(tmp_path):
  rng = np.random.default_rng(3)
  docs = [rng.integers(0, 1000, n) for n in (2, 9, 30, 5)]
  path = str(tmp_path / "t.array_record")
  # Records of at most 8 slots (9 tokens): 29 slots take four.
  assert token_records.write_shard(docs, path, record_slots=8) == 1 + 1 + 4 + 1
  rows = _all_rows(token_records.token_source([path], 6, -1, packed=True))
  want = sorted(pair for d in docs for pair in zip(d[:-1].tolist(),
                                                   d[1:].tolist()))
  assert _pairs(rows) == want
  half = token_records.token_source([path], 6, -1, part="all[:50%]")
  whole = token_records.token_source([path], 6, -1)
  assert half.num_examples == whole.num_examples // 2
  (tmp_path / "bad.array_record").write_bytes(b"not an array record")
  with pytest.raises(UserError, match="bad.array_record"):
    token_records.token_source([str(tmp_path / "bad.array_record")], 6, -1)
