"""`--dataset=cifar10`: the CIFAR-10 python (pickled) or binary batches.

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

from trainer.data import registry
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


def _read_python(path: str) -> Arrays:
  # Pickle runs code from the file: these are the user's own dataset files,
  # read from a directory they named, as Keras itself does.
  try:
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")
    data, labels = batch[b"data"], batch[b"labels"]
  except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError,
          ValueError) as e:
    raise UserError(f"cannot read CIFAR-10 batch {path} ({type(e).__name__}: "
                    f"{e}): expected a pickled dict with b'data' and "
                    "b'labels'; download it again.") from None
  data = np.asarray(data, dtype=np.uint8)
  if data.ndim != 2 or data.shape[1] != _PIXELS:
    raise UserError(f"{path}: b'data' has shape {data.shape}, expected "
                    f"[N, {_PIXELS}].")
  return data, np.asarray(labels, dtype=np.int64)


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


def _parts(split: str, args: registry.DataArgs) -> dict[str, Arrays]:
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


@registry.register("cifar10")
def cifar10(split: str, args: registry.DataArgs) -> Source:
  return choose.select("cifar10", _parts(split, args), split, _NUM_CLASSES)
