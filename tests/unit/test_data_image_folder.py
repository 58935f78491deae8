"""image_folder reader: class folders of PNGs, split sub-folders, bad files."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from trainer.data import registry
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(120)

CLASSES = ("cat", "dog", "emu")


def _write_png(path, image):
  path.parent.mkdir(parents=True, exist_ok=True)
  tf.io.write_file(str(path), tf.io.encode_png(image))


def _make(root, per_class=10, shape=(6, 5, 3)):
  """PNGs whose every pixel is 20*class_id + i, so content names the label."""
  for c, name in enumerate(CLASSES):
    for i in range(per_class):
      value = 20 * c + i
      _write_png(root / name / f"img{i:02d}.png",
                 np.full(shape, value, np.uint8))


def _read(split, root, **kw):
  args = registry.DataArgs(data_dir=str(root), **kw)
  return registry.get("image_folder")(split, args)


def _all(source):
  images, labels = source.gather(np.arange(source.num_examples, dtype=np.int64))
  return images.numpy(), labels.numpy()


def test_flat_folder_sliced(tmp_path):
  _make(tmp_path)
  train, held = _read("train[:80%]", tmp_path), _read("train[80%:]", tmp_path)
  assert (train.num_examples, held.num_examples) == (24, 6)
  assert train.num_classes == 3 and train.feature_spec.shape == (6, 5, 3)
  images, labels = _all(train)
  images2, labels2 = _all(held)
  values = np.concatenate([images, images2])[:, 0, 0, 0]
  assert sorted(values.tolist()) == [20 * c + i for c in range(3)
                                     for i in range(10)]
  np.testing.assert_array_equal(np.concatenate([labels, labels2]), values // 20)
  # Shuffled once (not class after class), the same way whatever --seed.
  assert len(set(labels2.tolist())) > 1
  again = _read("train[80%:]", tmp_path, seed=99)
  np.testing.assert_array_equal(_all(again)[1], labels2)


def test_split_directories_and_grayscale(tmp_path):
  for split, n in (("train", 4), ("test", 2)):
    for c, name in enumerate(("a", "b")):
      for i in range(n):
        _write_png(tmp_path / split / name / f"{i}.png",
                   np.full((3, 4, 1), 10 * c + i, np.uint8))
  test = _read("test", tmp_path)
  assert test.num_examples == 4 and test.num_classes == 2
  images, labels = _all(test)
  assert images.shape == (4, 3, 4, 1)
  np.testing.assert_array_equal(labels, images[:, 0, 0, 0] // 10)
  assert _read("train", tmp_path).num_examples == 8
  with pytest.raises(UserError, match="validation"):
    _read("validation", tmp_path)


def test_undecodable_image(tmp_path, caplog):
  _make(tmp_path, per_class=3)
  (tmp_path / "dog" / "x.png").write_bytes(b"this is not a png")
  with pytest.raises(UserError, match=r"dog/x\.png.*--skip_corrupt"):
    _read("train", tmp_path)
  with caplog.at_level(logging.WARNING):
    source = _read("train", tmp_path, skip_corrupt=True)
  assert source.num_examples == 9 and source.skipped == 1
  assert "x.png" in caplog.text


def test_shapes_differ(tmp_path):
  _make(tmp_path, per_class=2)
  _write_png(tmp_path / "emu" / "big.png", np.zeros((7, 5, 3), np.uint8))
  expected = r"img00\.png.*6x5x3.*big\.png.*7x5x3.*resize"
  with pytest.raises(UserError, match=expected):
    _read("train", tmp_path)


def test_no_classes(tmp_path):
  with pytest.raises(UserError, match="class sub-folders"):
    _read("train", tmp_path)
  with pytest.raises(UserError, match="--data_dir"):
    _read("train", tmp_path / "absent")


def test_lazy_gather_reads_the_files_and_a_vanished_one_as_empty(tmp_path):
  """With --image_size the batch's files are read on the host: their exact
  bytes, and b"" (an image that does not decode: weight 0 or a clean stop)
  for a file that went away after the listing, not a failed pipeline."""
  _make(tmp_path, per_class=2)
  source = _read("train", tmp_path, any_size=True)
  paths = [source.describe(i) for i in range(source.num_examples)]
  gone = paths[3]
  expected = [open(p, "rb").read() if p != gone else b"" for p in paths]
  os.remove(gone)
  images, labels = _all(source)
  assert list(images) == expected
  # Content names the class: 20 * class id + i.
  for path, label in zip(paths, labels):
    assert os.path.basename(os.path.dirname(path)) == CLASSES[label]


def test_read_files_reads_whole_files_and_unreadable_ones_as_empty(
    tmp_path, monkeypatch):
  from trainer.data.readers import image_folder
  rng = np.random.default_rng(0)
  files = {"a": rng.bytes(3000), "empty": b"", "big": rng.bytes(3 << 20)}
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  (tmp_path / "dir").mkdir()
  paths = [str(tmp_path / n) for n in (*files, "dir", "missing")]
  assert image_folder.read_files(paths) == [*files.values(), b"", b""]
  # A file that grows after its size was taken is still read whole.
  real_fstat = os.fstat
  monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result(
      (0,) * 6 + (10,) + (0,) * 3))   # st_size 10
  assert image_folder.read_files(paths[:3]) == list(files.values())
  monkeypatch.setattr(os, "fstat", real_fstat)
