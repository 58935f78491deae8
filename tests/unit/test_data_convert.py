"""trainer.convert -> --dataset=tfrecord round trips; damaged TFRecord files."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer import convert
from trainer.data import registry
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def _all(source):
  images, labels = source.gather(np.arange(source.num_examples, dtype=np.int64))
  return images.numpy(), labels.numpy()


def _digits(split):
  return _all(registry.get("digits")(split, registry.DataArgs()))


def _tfrecord(split, **kw):
  return registry.get("tfrecord")(split, registry.DataArgs(**kw))


@pytest.mark.parametrize("fmt", ["png", "raw"])
def test_round_trip_same_order(tmp_path, fmt):
  written = convert.convert("digits", registry.DataArgs(), "train,test",
                            str(tmp_path), shards=3, fmt=fmt)
  assert [os.path.basename(p) for p in written["test"]] == [
      f"test-0000{i}-of-00003.tfrecord" for i in range(3)]
  for split in ("train", "test[50:]"):
    source = _tfrecord(split, data_dir=str(tmp_path))
    images, labels = _all(source)
    want_images, want_labels = _digits(split)
    assert source.feature_spec == tf.TensorSpec((8, 8, 1), tf.uint8)
    assert source.num_classes == 10 and source.skipped == 0
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
  # Random access gives the same example as the source at that index.
  idx = np.array([296, 0, 150, 150], np.int64)
  got, got_labels = _tfrecord("test", data_dir=str(tmp_path)).gather(idx)
  np.testing.assert_array_equal(got.numpy(), _digits("test")[0][idx])
  np.testing.assert_array_equal(got_labels.numpy(), _digits("test")[1][idx])


def test_named_slices_and_file_patterns(tmp_path):
  convert.convert("digits", registry.DataArgs(), "a=test[:100],b=test[100:]",
                  str(tmp_path), shards=2, fmt="png")
  patterns = (("train", str(tmp_path / "a-*.tfrecord")),
              ("test", str(tmp_path / "b-*")))
  source = _tfrecord("train+test", file_patterns=patterns)
  np.testing.assert_array_equal(_all(source)[0], _digits("test")[0])
  with pytest.raises(UserError, match="no files match"):
    _tfrecord("train", data_dir=str(tmp_path))
  with pytest.raises(UserError, match="NAME=SPLIT"):
    convert.parse_split_flag("test[:10]")
  with pytest.raises(UserError, match="--shards"):
    convert.convert("digits", registry.DataArgs(), "test", str(tmp_path / "x"),
                    shards=1000, fmt="png")


def test_truncated_file(tmp_path, caplog):
  paths = convert.convert("digits", registry.DataArgs(), "test", str(tmp_path),
                          shards=3, fmt="png")["test"]
  middle = Path(paths[1])
  middle.write_bytes(middle.read_bytes()[:-10])  # cut into its last record
  with pytest.raises(UserError, match=f"{middle.name}.*--skip_corrupt"):
    _tfrecord("test", data_dir=str(tmp_path))
  with caplog.at_level(logging.WARNING):
    source = _tfrecord("test", data_dir=str(tmp_path), skip_corrupt=True)
  assert "test-00001-of-00003.tfrecord" in caplog.text
  # Records before the break are kept; the cut record is the one skipped.
  assert (source.num_examples, source.skipped) == (296, 1)
  lost = 2 * 297 // 3 - 1  # last example of the middle shard
  want_images, want_labels = _digits("test")
  images, labels = _all(source)
  np.testing.assert_array_equal(images, np.delete(want_images, lost, axis=0))
  np.testing.assert_array_equal(labels, np.delete(want_labels, lost))


def _example(image_bytes, label, hwc=None):
  feature = {
      "image": tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[image_bytes])),
      "label": _int(label)}
  for key, value in zip(("height", "width", "channels"), hwc or ()):
    feature[key] = _int(value)
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  return example.SerializeToString()


def _int(value):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def test_bad_records(tmp_path, caplog):
  png = lambda v: tf.io.encode_png(np.full((4, 4, 3), v, np.uint8)).numpy()
  with tf.io.TFRecordWriter(str(tmp_path / "train-0.tfrecord")) as w:
    w.write(_example(png(1), 1))
    w.write(_example(b"garbage bytes", 2))            # undecodable image
    w.write(_example(png(3), 0, hwc=(4, 4, 3)))
  with tf.io.TFRecordWriter(str(tmp_path / "train-1.tfrecord")) as w:
    w.write(b"not an Example")                         # unparsable record
    w.write(_example(png(4), 2, hwc=(5, 4, 3)))        # disagrees with its hwc
    w.write(_example(png(5), 1))
  with pytest.raises(UserError, match=r"train-0\.tfrecord.*record\(s\) 1 "):
    _tfrecord("train", data_dir=str(tmp_path))
  with caplog.at_level(logging.WARNING):
    source = _tfrecord("train", data_dir=str(tmp_path), skip_corrupt=True)
  assert "train-0.tfrecord" in caplog.text and "train-1.tfrecord" in caplog.text
  assert (source.num_examples, source.skipped, source.num_classes) == (3, 3, 2)
  images, labels = _all(source)
  np.testing.assert_array_equal(images[:, 0, 0, 0], [1, 3, 5])
  np.testing.assert_array_equal(labels, [1, 0, 1])


def _cli(*flags):
  return subprocess.run([sys.executable, "-m", "trainer.convert", *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=100)


def test_command_line(tmp_path):
  ok = _cli("--dataset=digits", "--split=test", f"--out={tmp_path}",
            "--shards=2", "--format=raw")
  assert ok.returncode == 0, ok.stderr
  assert sorted(os.listdir(tmp_path)) == ["test-00000-of-00002.tfrecord",
                                          "test-00001-of-00002.tfrecord"]
  bad = _cli("--dataset=digits", "--split=test", f"--out={tmp_path}/o",
             "--shards=0")
  assert bad.returncode == 2
  last = bad.stderr.strip().splitlines()[-1]
  assert last.startswith("trainer.convert: error: --shards=0")


@pytest.mark.parametrize("flag", ["--helpshort", "--helpfull"])
def test_help_exits_0(flag):
  """Flags are parsed before TensorFlow loads: a cheap process. Asked-for
  help is a success (absl's own help flags exit 1)."""
  proc = _cli(flag)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--text_corpus" in proc.stdout
