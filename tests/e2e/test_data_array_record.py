"""ArrayRecord: trainer.convert writes it, --dataset=array_record reads it by
random access; training from it equals training from the original data."""

import numpy as np
import pytest

from conftest import (assert_weights_close, checkpoint_weights, last_json,
                      run_trainer)
from conftest import write_photo_folder
from trainer import convert
from trainer.data import registry
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(300)
pytest.importorskip("array_record")


def _all(source, indices=None):
  if indices is None:
    indices = np.arange(source.num_examples, dtype=np.int64)
  images, labels = source.gather(np.asarray(indices, np.int64))
  return images.numpy(), labels.numpy()


@pytest.mark.parametrize("fmt", ["png", "raw"])
def test_round_trip_random_access_and_slices(tmp_path, fmt):
  convert.convert("digits", registry.DataArgs(), "train,test", str(tmp_path),
                  shards=3, fmt=fmt, container="array_record")
  args = registry.DataArgs(data_dir=str(tmp_path))
  split = "train[100:140]+test[:-290]"
  got = registry.get("array_record")(split, args)
  want = registry.get("digits")(split, registry.DataArgs())
  assert got.num_examples == want.num_examples == 47
  assert got.num_classes == 10
  order = np.random.default_rng(0).permutation(47)   # random access
  for a, b in zip(_all(got, order), _all(want, order)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(UserError, match="no files match"):
    registry.get("array_record")("validation", args)


def test_training_from_array_record_equals_training_from_digits(tmp_path):
  out = tmp_path / "ar"
  convert.convert("digits", registry.DataArgs(), "train,test", str(out),
                  shards=2, fmt="png", container="array_record")
  common = ["--model=cnn", "--optimizer=sgd", "--learning_rate=0.05",
            "--global_batch_size=32", "--train_steps=20", "--eval_every=0",
            "--steps_per_loop=10", "--checkpoint_every=20", "--seed=9",
            "--augment"]
  a = last_json(run_trainer(*common, "--dataset=digits",
                            f"--model_dir={tmp_path / 'a'}"))
  b = last_json(run_trainer(*common, "--dataset=array_record",
                            f"--data_dir={out}", f"--model_dir={tmp_path / 'b'}"))
  assert a["eval_examples"] == b["eval_examples"] == 297
  assert_weights_close(checkpoint_weights(tmp_path / "b" / "ckpt-20"),
                       checkpoint_weights(tmp_path / "a" / "ckpt-20"),
                       rtol=1e-6, atol=1e-7)


def test_photos_of_any_size_copied_unchanged_train_like_the_folder(tmp_path):
  photos = tmp_path / "photos"
  write_photo_folder(photos / "train", 12, "train", 0)
  write_photo_folder(photos / "test", 6, "test", 1)
  out = tmp_path / "ar"
  with pytest.raises(UserError, match="array_record"):
    convert.convert("image_folder", registry.DataArgs(
        data_dir=str(photos), any_size=True), "train", str(tmp_path / "x"),
        shards=1, fmt="png", container="tfrecord")
  convert.convert("image_folder", registry.DataArgs(
      data_dir=str(photos), any_size=True), "train,test", str(out),
      shards=2, fmt="png", container="array_record")
  folder = registry.get("image_folder")("train", registry.DataArgs(
      data_dir=str(photos), any_size=True))
  records = registry.get("array_record")("train", registry.DataArgs(
      data_dir=str(out), any_size=True))
  for a, b in zip(_all(records), _all(folder)):
    np.testing.assert_array_equal(a, b)    # the same bytes, in order
  # Without --image_size the reader says what is missing.
  with pytest.raises(UserError, match="--image_size"):
    registry.get("array_record")("train", registry.DataArgs(data_dir=str(out)))
  common = ["--global_batch_size=8", "--train_steps=6", "--eval_every=0",
            "--steps_per_loop=3", "--checkpoint_every=6", "--seed=2",
            "--image_size=24,20", "--augment", "--optimizer=sgd"]
  run_trainer(*common, "--dataset=image_folder", f"--data_dir={photos}",
              f"--model_dir={tmp_path / 'a'}")
  run_trainer(*common, "--dataset=array_record", f"--data_dir={out}",
              f"--model_dir={tmp_path / 'b'}")
  assert_weights_close(checkpoint_weights(tmp_path / "b" / "ckpt-6"),
                       checkpoint_weights(tmp_path / "a" / "ckpt-6"),
                       rtol=1e-6, atol=1e-7)


def test_tfrecord_too_large_for_memory_is_refused_with_the_convert_path(
    tmp_path):
  from trainer.data.readers import tfrecord
  tfr, ar = tmp_path / "tfr", tmp_path / "ar"
  convert.convert("digits", registry.DataArgs(), "train,test", str(tfr),
                  shards=2, fmt="png")
  files = sorted(str(p) for p in tfr.glob("train-*"))
  size = sum(p.stat().st_size for p in tfr.glob("train-*"))
  tfrecord.check_fits_in_memory(files, available=int(size / 0.3))
  with pytest.raises(UserError, match="--container=array_record"):
    tfrecord.check_fits_in_memory(files, available=int(size / 0.5))
  # The way out streams the files (no reader that loads the split), keeps
  # the order and the records, and adds the class count.
  convert.convert("tfrecord", registry.DataArgs(data_dir=str(tfr)),
                  "train,test", str(ar), shards=3, fmt="png",
                  container="array_record")
  with pytest.raises(UserError, match="whole splits"):
    convert.convert("tfrecord", registry.DataArgs(data_dir=str(tfr)),
                    "x=train[:10]", str(tmp_path / "y"), shards=1, fmt="png",
                    container="array_record")
  split = "train[5:60]+test"
  got = registry.get("array_record")(split, registry.DataArgs(
      data_dir=str(ar)))
  want = registry.get("tfrecord")(split, registry.DataArgs(data_dir=str(tfr)))
  assert got.num_examples == want.num_examples and got.num_classes == 10
  for a, b in zip(_all(got), _all(want)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt", ["png", "raw"])
def test_encoded_images_stored_uncompressed_and_damage_still_found(tmp_path,
                                                                  fmt):
  """PNG/JPEG bytes are written without zstd (it saved nothing and cost
  CPU on every read), raw pixels with it; either way a flipped byte in a
  record is found when that record is read (riegeli checksums every
  chunk), and a file with a damaged index is refused, not read as empty."""
  from array_record.python import array_record_module
  from trainer.data.readers import array_record
  convert.convert("digits", registry.DataArgs(), "train", str(tmp_path),
                  shards=1, fmt=fmt, container="array_record")
  path = str(next(tmp_path.glob("train-*")))
  options = array_record_module.ArrayRecordReader(
      path).writer_options_string()
  assert ("uncompressed" in options) == (fmt == "png"), options
  records = array_record._Records([path])  # noqa: SLF001
  k = 700
  want = records[k]
  data = bytearray(open(path, "rb").read())
  if fmt == "png":   # stored as is: find the record's bytes in the file
    at = data.index(want[-200:]) + 100
    data[at] ^= 0xFF
    damaged = tmp_path / "damaged.array_record"
    damaged.write_bytes(bytes(data))
    reader = array_record._Records([str(damaged)])  # noqa: SLF001
    with pytest.raises(RuntimeError):
      reader[k]
    assert reader[k - 1] == records[k - 1]
    assert reader[k + 1] == records[k + 1]
  # The footer damaged (the file ends in zero padding; the footer is just
  # before it): the reader opens in a failed state with 0 records.
  data = bytearray(open(path, "rb").read())
  data[len(data.rstrip(b"\0")) - 50] ^= 0xFF
  broken = tmp_path / f"broken-{fmt}.array_record"
  broken.write_bytes(bytes(data))
  assert not array_record_module.ArrayRecordReader(str(broken)).ok()
  with pytest.raises(UserError, match=f"cannot open {broken}"):
    array_record._Records([str(broken)])  # noqa: SLF001
