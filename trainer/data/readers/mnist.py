"""`--dataset=mnist` and `--dataset=fashion_mnist`: IDX files or mnist.npz.

Where the data comes from, first match wins:
  --data_dir=DIR  per split, the IDX pair in DIR (`train-images-idx3-ubyte`,
                  `train-labels-idx1-ubyte`, `t10k-...` for "test"; `.gz` or
                  not), else `mnist.npz` in DIR (mnist only; DIR may also be
                  the .npz file itself). A split may exist without the other:
                  a DIR with only the t10k files serves "test[:8000]" etc.
  no --data_dir   the Keras cache ($KERAS_HOME or ~/.keras: datasets/mnist.npz,
                  datasets/fashion-mnist/*.gz), then a Keras download.
Images uint8 [N,28,28,1], labels int32 [N], 10 classes.
"""

import functools
import os

import numpy as np

from trainer.data.args import DataArgs
from trainer.data.readers import choose, idx, keras_cache
from trainer.data.source import Source
from trainer.errors import UserError

_IDX = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_NPZ_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
_NUM_CLASSES = 10

# Per dataset name: the npz it may come as, its Keras cache entry, its
# keras.datasets loader.
_KINDS = {
    "mnist": dict(npz="mnist.npz", cache="mnist.npz", keras="mnist"),
    "fashion_mnist": dict(npz=None, cache="fashion-mnist",
                          keras="fashion_mnist"),
}

Arrays = tuple[np.ndarray, np.ndarray]


def _idx_pair(directory: str, split: str) -> tuple[str, str] | None:
  """(images, labels) paths of `split` in `directory` (.gz first), or None."""
  found = []
  for base in _IDX[split]:
    paths = [os.path.join(directory, base + ext) for ext in (".gz", "")]
    found.append(next((p for p in paths if os.path.isfile(p)), None))
  if found == [None, None]:
    return None
  if None in found:
    # Half a pair is a broken download, not an absent split: say which half.
    have = found[0] or found[1]
    lack = _IDX[split][found.index(None)]
    raise UserError(f"{have} is there but {lack}(.gz) is not, in {directory}; "
                    "add it (images and labels come in pairs).")
  return found[0], found[1]


def _from_idx(images_path: str, labels_path: str) -> Arrays:
  images = idx.read(images_path, idx.IMAGES_MAGIC)
  labels = idx.read(labels_path, idx.LABELS_MAGIC)
  if images.ndim != 3 or labels.ndim != 1:
    raise UserError(f"{images_path} / {labels_path}: expected images N x H x W "
                    f"and labels N, got {images.shape} and {labels.shape}.")
  return _checked(images, labels, f"{images_path} and {labels_path}")


@functools.lru_cache(maxsize=4)
def _npz(path: str, mtime_ns: int) -> dict[str, Arrays]:
  del mtime_ns  # cache key only: re-read a replaced file
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError) as e:
    raise UserError(f"cannot read {path}: {e}; download it again.") from None
  parts = {}
  for split, (xk, yk) in _NPZ_KEYS.items():
    if xk in data and yk in data:
      parts[split] = _checked(data[xk], data[yk], f"{path} ({xk}, {yk})")
  if not parts:
    raise UserError(f"{path} holds {sorted(data)}, not x_train/y_train or "
                    "x_test/y_test arrays as Keras' mnist.npz does.")
  return parts


def _checked(images: np.ndarray, labels: np.ndarray, where: str) -> Arrays:
  if len(images) != len(labels):
    raise UserError(f"{where}: {len(images)} images but {len(labels)} labels; "
                    "the files do not belong together, download them again.")
  if images.dtype != np.uint8 or images.ndim != 3:
    raise UserError(f"{where}: expected uint8 images N x H x W, got "
                    f"{images.dtype} {images.shape}.")
  if labels.size and int(labels.max()) >= _NUM_CLASSES:
    raise UserError(f"{where}: label {int(labels.max())} is not a digit class "
                    f"0..{_NUM_CLASSES - 1}.")
  return images[..., None], labels.astype(np.int32)


def _local_loaders(name: str, directory: str) -> dict:
  """split -> zero-argument loader, for each split found in `directory`."""
  loaders = {}
  npz = _KINDS[name]["npz"]
  npz_path = os.path.join(directory, npz) if npz else None
  if npz and directory.endswith(".npz") and os.path.isfile(directory):
    npz_path, directory = directory, os.path.dirname(directory)
  for split in _IDX:
    pair = _idx_pair(directory, split)
    if pair:
      loaders[split] = functools.partial(_from_idx, *pair)
  if npz_path and os.path.isfile(npz_path):
    st = os.stat(npz_path)
    for split in _npz(npz_path, st.st_mtime_ns):
      loaders.setdefault(
          split, lambda s=split, p=npz_path, m=st.st_mtime_ns: _npz(p, m)[s])
  return loaders


def _expected(name: str) -> str:
  files = ", ".join(f"{base}.gz" for pair in _IDX.values() for base in pair)
  npz = _KINDS[name]["npz"]
  return files + (f" (or {npz})" if npz else "")


@functools.lru_cache(maxsize=2)
def _downloaded(name: str):
  # Cached so that the eval split does not download (or fail) a second time.
  return keras_cache.download(_KINDS[name]["keras"])


def _loaders(name: str, data_dir: str | None) -> dict:
  if data_dir:
    if not os.path.exists(data_dir):
      raise UserError(f"--data_dir={data_dir} does not exist; pass the "
                      f"directory holding {_expected(name)}.")
    loaders = _local_loaders(name, data_dir)
    if not loaders:
      raise UserError(f"--dataset={name}: no data in --data_dir={data_dir}; "
                      f"expected {_expected(name)} (gzipped or not).")
    return loaders
  tried = []
  for base in keras_cache.dataset_dirs():
    path = os.path.join(base, _KINDS[name]["cache"])
    tried.append(path)
    if os.path.exists(path):
      loaders = _local_loaders(name, path)
      if loaders:
        return loaders
  result, why = _downloaded(name)
  if result is None:
    raise UserError(
        f"--dataset={name}: no data found; put {_expected(name)} in a "
        f"directory and pass --data_dir=DIR (tried: {', '.join(tried)}, "
        f"Keras download: {why}).")
  (x_train, y_train), (x_test, y_test) = result
  arrays = {"train": _checked(x_train, y_train, "Keras download (train)"),
            "test": _checked(x_test, y_test, "Keras download (test)")}
  return {split: (lambda a=a: a) for split, a in arrays.items()}


def _read(name: str, split: str, args: DataArgs) -> Source:
  loaders = _loaders(name, args.data_dir)
  where = args.data_dir or "the data directory"
  npz = _KINDS[name]["npz"]
  missing = {s: f"{pair[0]}(.gz) and {pair[1]}(.gz)"
                f"{f' (or {npz})' if npz else ''} in {where}"
             for s, pair in _IDX.items()}
  choose.require(name, split, loaders, missing)
  # Only the splits the split string reads are parsed (lazily, cached).
  parts = {s: loaders[s]() for s in dict.fromkeys(choose.names(name, split))
           if s in loaders}
  return choose.select(name, parts, split, _NUM_CLASSES)


def mnist(split: str, args: DataArgs) -> Source:
  return _read("mnist", split, args)


def fashion_mnist(split: str, args: DataArgs) -> Source:
  return _read("fashion_mnist", split, args)
