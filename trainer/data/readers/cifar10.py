"""`--dataset=cifar10`: the CIFAR-10 python (pickled) or binary batches.

The python batches are read by a restricted unpickler that admits only what
the format holds: a hostile file is refused before any of it runs.

--data_dir may be `cifar-10-batches-py/` (data_batch_1..5, test_batch),
`cifar-10-batches-bin/` (data_batch_1.bin..5.bin, test_batch.bin) or a parent
of either; without it the Keras cache is searched, then a Keras download is
tried. "train" is the five data batches in order, "test" the test batch.
Images uint8 [N,32,32,3] (the files store each image channel-major, CHW),
labels int32 [N], 10 classes.
"""

import functools
import os
import pickle

import numpy as np

from trainer.data.args import DataArgs
from trainer.data.readers import choose, keras_cache
from trainer.data.source import Source
from trainer.errors import UserError

_PIXELS = 3 * 32 * 32
_NUM_CLASSES = 10
_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)],
            "test": ["test_batch"]}
# (directory name, file suffix) of the two formats, python preferred.
_FORMATS = (("cifar-10-batches-py", ""), ("cifar-10-batches-bin", ".bin"))

Arrays = tuple[np.ndarray, np.ndarray]


# What a CIFAR-10 python batch holds besides dict, list, bytes, str and int
# (which need no global): NumPy's array reconstruction (numpy.core before
# NumPy 2, numpy._core since) and the latin-1 codec protocol 2 uses for bytes.
_SAFE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _UnsafePickle(Exception):
  pass


class _BatchUnpickler(pickle.Unpickler):
  """Unpickles only what the CIFAR-10 format holds. A plain pickle.load runs
  whatever callable the file names (a crafted data_batch_1 ran os.system):
  any other global is refused here, before it is even looked up."""

  def find_class(self, module, name):
    if (module, name) in _SAFE_GLOBALS:
      return super().find_class(module, name)
    raise _UnsafePickle(f"{module}.{name}")


def _read_python(path: str) -> Arrays:
  # The files come from --data_dir, often a shared or downloaded mount that
  # every worker loads: they are data, never code (see _BatchUnpickler).
  try:
    with open(path, "rb") as f:
      batch = _BatchUnpickler(f, encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
  except _UnsafePickle as e:
    raise UserError(
        f"refusing CIFAR-10 batch {path}: its pickle calls {str(e)[:100]}, "
        "which a CIFAR-10 batch never holds (only dict, list, bytes, str, int "
        "and NumPy arrays), so it may be crafted to run code; download it "
        "again, or use the binary format (cifar-10-batches-bin).") from None
  except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError,
          ValueError, AttributeError, IndexError, OverflowError) as e:
    raise UserError(f"cannot read CIFAR-10 batch {path} ({type(e).__name__}: "
                    f"{e}): expected a pickled dict with b'data' and "
                    "b'labels'; download it again.") from None
  if data.ndim != 2 or data.shape[1] != _PIXELS or labels.ndim != 1:
    raise UserError(f"{path}: b'data' has shape {data.shape} and b'labels' "
                    f"{labels.shape}, expected [N, {_PIXELS}] and [N].")
  return data, labels


def _read_binary(path: str) -> Arrays:
  raw = np.fromfile(path, dtype=np.uint8)
  if raw.size % (1 + _PIXELS):
    raise UserError(f"{path}: {raw.size} bytes is not a whole number of "
                    f"{1 + _PIXELS}-byte records (1 label + {_PIXELS} pixels); "
                    "it is truncated, download it again.")
  records = raw.reshape(-1, 1 + _PIXELS)
  return records[:, 1:], records[:, 0].astype(np.int64)


@functools.lru_cache(maxsize=4)
def _load(paths: tuple[str, ...], stamps: tuple[int, ...]) -> Arrays:
  """The batches at `paths`, concatenated in order, as HWC images."""
  del stamps  # cache key only: re-read replaced files
  datas, labels = [], []
  for path in paths:
    read = _read_binary if path.endswith(".bin") else _read_python
    data, label = read(path)
    if len(data) != len(label):
      raise UserError(f"{path}: {len(data)} images but {len(label)} labels.")
    if label.size and (label.min() < 0 or label.max() >= _NUM_CLASSES):
      raise UserError(f"{path}: labels outside 0..{_NUM_CLASSES - 1}; is it "
                      "a CIFAR-100 file?")
    datas.append(data)
    labels.append(label)
  images = np.concatenate(datas).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), np.concatenate(labels).astype(np.int32)


def _batch_dir(directory: str) -> tuple[str, str] | None:
  """(directory holding the batches, file suffix), or None."""
  for name, suffix in _FORMATS:
    for d in (directory, os.path.join(directory, name)):
      if any(os.path.isfile(os.path.join(d, b + suffix))
             for files in _BATCHES.values() for b in files):
        return d, suffix
  return None


def _candidates(data_dir: str | None) -> list[str]:
  if data_dir:
    return [data_dir]
  # Keras 3 extracts into cifar-10-batches-py-target/, Keras 2 did not.
  return [os.path.join(base, *sub) for base in keras_cache.dataset_dirs()
          for sub in (("cifar-10-batches-py-target", "cifar-10-batches-py"),
                      ("cifar-10-batches-py",))]


def _expected() -> str:
  return ("cifar-10-batches-py/{data_batch_1..5, test_batch} or "
          "cifar-10-batches-bin/{data_batch_1..5, test_batch}.bin")


@functools.lru_cache(maxsize=1)
def _downloaded():
  return keras_cache.download("cifar10")


def _parts(split: str, args: DataArgs) -> dict[str, Arrays]:
  if args.data_dir and not os.path.isdir(args.data_dir):
    raise UserError(f"--data_dir={args.data_dir} is not a directory; pass the "
                    f"one holding {_expected()} (or their parent).")
  found = None
  for candidate in _candidates(args.data_dir):
    found = _batch_dir(candidate)
    if found:
      break
  if not found and not args.data_dir:
    result, why = _downloaded()
    if result is not None:
      (x_train, y_train), (x_test, y_test) = result
      return {"train": (x_train, y_train.reshape(-1).astype(np.int32)),
              "test": (x_test, y_test.reshape(-1).astype(np.int32))}
    raise UserError(f"--dataset=cifar10: no data found; put {_expected()} in "
                    "a directory and pass --data_dir=DIR (tried: "
                    f"{', '.join(_candidates(None))}, Keras download: {why}).")
  if not found:
    raise UserError(f"--dataset=cifar10: no CIFAR-10 batches in "
                    f"--data_dir={args.data_dir}; expected {_expected()} "
                    "(the directory itself or its parent).")
  directory, suffix = found
  paths = {s: [os.path.join(directory, b + suffix) for b in files]
           for s, files in _BATCHES.items()}
  complete = [s for s, ps in paths.items() if all(map(os.path.isfile, ps))]
  missing = {s: ", ".join(os.path.basename(p) for p in ps
                          if not os.path.isfile(p)) + f" in {directory}"
             for s, ps in paths.items()}
  choose.require("cifar10", split, complete, missing)
  parts = {}
  for s in dict.fromkeys(choose.names("cifar10", split)):
    if s in complete:
      stamps = tuple(os.stat(p).st_mtime_ns for p in paths[s])
      parts[s] = _load(tuple(paths[s]), stamps)
  return parts


def cifar10(split: str, args: DataArgs) -> Source:
  return choose.select("cifar10", _parts(split, args), split, _NUM_CLASSES)
