"""Readers of native file formats: mnist/fashion_mnist (IDX, npz) and cifar10.

Each test writes tiny files in the exact on-disk format and reads them back.
"""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import write_cifar
from trainer.data import registry
from trainer.data.readers import cifar10, keras_cache, mnist
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(120)

REAL_MNIST = (Path(__file__).resolve().parents[2].parent / "shared" / "data"
              / "mnist")


# ---- writers of the real formats -------------------------------------------


def write_idx(path, array: np.ndarray, magic: int):
  """An IDX file (gzipped when `path` ends in .gz): header, then uint8 data."""
  data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
  data += np.ascontiguousarray(array, np.uint8).tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(data)


def fake_mnist(n, seed):
  """(images uint8 [n,28,28], labels uint8 [n]) with distinct images."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  images[:, 0, 0] = np.arange(n)  # identifies each example
  return images, (np.arange(n) % 10).astype(np.uint8)


def write_mnist_idx(directory, split, images, labels, gz=True):
  prefix = "train" if split == "train" else "t10k"
  ext = ".gz" if gz else ""
  write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"),
            images, 2051)
  write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"),
            labels, 2049)


# ---- mnist / fashion_mnist ------------------------------------------------


def _all(source):
  images, labels = source.gather(np.arange(source.num_examples, dtype=np.int64))
  return images.numpy(), labels.numpy()


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_files(tmp_path, gz, name):
  train = fake_mnist(30, seed=1)
  test = fake_mnist(12, seed=2)
  write_mnist_idx(tmp_path, "train", *train, gz=gz)
  write_mnist_idx(tmp_path, "test", *test, gz=gz)
  args = registry.DataArgs(data_dir=str(tmp_path))
  source = registry.get(name)("train[10:]+test", args)
  assert source.num_examples == 20 + 12
  assert source.num_classes == 10 and source.skipped == 0
  assert source.feature_spec.shape == (28, 28, 1)
  assert source.feature_spec.dtype.name == "uint8"
  assert source.label_spec.dtype.name == "int32"
  images, labels = _all(source)
  np.testing.assert_array_equal(images[..., 0],
                                np.concatenate([train[0][10:], test[0]]))
  np.testing.assert_array_equal(labels,
                                np.concatenate([train[1][10:], test[1]]))


def test_npz(tmp_path):
  train, test = fake_mnist(8, 3), fake_mnist(5, 4)
  np.savez(tmp_path / "mnist.npz", x_train=train[0], y_train=train[1],
           x_test=test[0], y_test=test[1])
  args = registry.DataArgs(data_dir=str(tmp_path))
  source = registry.get("mnist")("test", args)
  images, labels = _all(source)
  np.testing.assert_array_equal(images[..., 0], test[0])
  np.testing.assert_array_equal(labels, test[1])


def test_only_test_files(tmp_path):
  write_mnist_idx(tmp_path, "test", *fake_mnist(20, 5))
  args = registry.DataArgs(data_dir=str(tmp_path))
  assert registry.get("mnist")("test[:15]", args).num_examples == 15
  assert registry.get("mnist")("test[15:]", args).num_examples == 5
  with pytest.raises(UserError, match="train-images-idx3-ubyte.*train-labels"):
    registry.get("mnist")("train", args)


def test_missing_and_damaged_files(tmp_path):
  with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz"):
    registry.get("mnist")("test", registry.DataArgs(data_dir=str(tmp_path)))
  images, labels = fake_mnist(4, 6)
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 2051)
  with pytest.raises(UserError, match="t10k-labels-idx1-ubyte"):
    registry.get("mnist")("test", registry.DataArgs(data_dir=str(tmp_path)))
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:3], 2049)
  with pytest.raises(UserError, match="4 images but 3 labels"):
    registry.get("mnist")("test", registry.DataArgs(data_dir=str(tmp_path)))
  # A cut-off download: header promises more bytes than there are.
  raw = tmp_path / "cut"
  raw.mkdir()
  write_mnist_idx(raw, "test", images, labels, gz=False)
  path = raw / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-7])
  with pytest.raises(UserError, match="t10k-images-idx3-ubyte.*truncated"):
    registry.get("mnist")("test", registry.DataArgs(data_dir=str(raw)))


def test_keras_cache_then_offline_error(tmp_path, monkeypatch):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
  monkeypatch.setattr(keras_cache, "download",
                      lambda name: (None, "offline (test)"))
  mnist._downloaded.cache_clear()
  with pytest.raises(UserError) as e:
    registry.get("fashion_mnist")("test", registry.DataArgs())
  assert "pass --data_dir=DIR" in str(e.value)
  assert "fashion-mnist" in str(e.value) and "offline (test)" in str(e.value)
  cache = tmp_path / "keras" / "datasets" / "fashion-mnist"
  cache.mkdir(parents=True)
  write_mnist_idx(cache, "test", *fake_mnist(6, 7))
  source = registry.get("fashion_mnist")("test", registry.DataArgs())
  assert source.num_examples == 6
  mnist._downloaded.cache_clear()


def test_real_mnist_test_set():
  if not (REAL_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
    pytest.skip(f"../shared/data/mnist absent: no {REAL_MNIST}/t10k-*.gz "
                "(the official MNIST test set) on this machine")
  args = registry.DataArgs(data_dir=str(REAL_MNIST))
  train = registry.get("mnist")("test[:8000]", args)
  held_out = registry.get("mnist")("test[8000:]", args)
  assert (train.num_examples, held_out.num_examples) == (8000, 2000)
  whole = registry.get("mnist")("test", args)
  images, labels = _all(whole)
  assert images.shape == (10000, 28, 28, 1)
  counts = np.bincount(labels, minlength=10)
  assert counts.sum() == 10000 and counts.min() > 800 and counts.max() < 1200
  with gzip.open(REAL_MNIST / "t10k-images-idx3-ubyte.gz", "rb") as f:
    direct = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
  assert int(images[0].sum()) == int(direct[0].sum(dtype=np.int64))
  first, _ = train.gather(np.array([0, 7999], np.int64))
  np.testing.assert_array_equal(first.numpy()[..., 0], direct[[0, 7999]])
  second, _ = held_out.gather(np.array([0], np.int64))
  np.testing.assert_array_equal(second.numpy()[0, ..., 0], direct[8000])


# ---- cifar10 ----------------------------------------------------------------


@pytest.mark.parametrize("fmt,pass_parent", [("py", True), ("py", False),
                                             ("bin", True), ("bin", False)])
def test_cifar10(tmp_path, fmt, pass_parent):
  directory, expected = write_cifar(tmp_path, fmt)
  args = registry.DataArgs(data_dir=str(tmp_path if pass_parent else directory))
  for split in ("train", "test"):
    source = registry.get("cifar10")(split, args)
    data, labels = expected[split]
    assert source.num_examples == len(labels) and source.num_classes == 10
    assert source.feature_spec.shape == (32, 32, 3)
    images, got = _all(source)
    assert images.dtype == np.uint8 and got.dtype == np.int32
    np.testing.assert_array_equal(got, labels)
    # Channel-major in the file: pixel (h, w) of channel c is at c*1024+h*32+w.
    for n, h, w, c in [(0, 0, 0, 0), (0, 0, 1, 2), (1, 5, 7, 1),
                       (-1, 31, 30, 2)]:
      assert images[n, h, w, c] == data[n, c * 1024 + h * 32 + w]


def test_cifar10_missing_batch(tmp_path):
  directory, expected = write_cifar(tmp_path, "py", skip=("data_batch_3",))
  args = registry.DataArgs(data_dir=str(tmp_path))
  with pytest.raises(UserError, match="data_batch_3"):
    registry.get("cifar10")("train", args)
  assert registry.get("cifar10")("test", args).num_examples == 3
  with pytest.raises(UserError, match="cifar-10-batches-py"):
    registry.get("cifar10")(
        "test", registry.DataArgs(data_dir=str(directory / "x")))


def test_cifar10_truncated_binary(tmp_path):
  directory, _ = write_cifar(tmp_path, "bin")
  path = directory / "test_batch.bin"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(UserError, match="test_batch.bin.*truncated"):
    registry.get("cifar10")("test", registry.DataArgs(data_dir=str(directory)))


def test_cifar10_keras_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path))
  monkeypatch.setattr(keras_cache, "download", lambda name: (None, "offline"))
  cifar10._downloaded.cache_clear()
  with pytest.raises(UserError, match="no data found.*--data_dir=DIR"):
    registry.get("cifar10")("test", registry.DataArgs())
  target = tmp_path / "datasets" / "cifar-10-batches-py-target"
  target.mkdir(parents=True)
  write_cifar(target, "py")
  assert registry.get("cifar10")("test", registry.DataArgs()).num_examples == 3
  cifar10._downloaded.cache_clear()
