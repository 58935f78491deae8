"""`--dataset=image_folder`: DIR/<class>/<image> (image_dataset_from_directory).

Splits: when DIR has a `train/` or `test/` sub-directory that itself holds
class folders, every sub-directory of DIR is a split (DIR/train/<class>/...,
DIR/test/<class>/...); otherwise the whole of DIR is the split "train", to be
sliced: --train_split='train[:80%]' --eval_split='train[80%:]'.
Classes: the sorted class-folder names (across all splits) -> ids 0, 1, ...
Order: files sorted by (class, path), then shuffled ONCE with a fixed seed
(not --seed), so that every run sees the same order and a slice such as
train[80%:] holds all classes in about their overall proportions.
Images: .png .jpg .jpeg .gif .bmp.
  With --image_size (lazy): only the paths are held; `gather` reads the
  files of a batch and the task's preprocess decodes and resizes them
  (trainer.data.resize), so any size and channel count is accepted and
  start-up does not grow with the images. The model gets 1 channel when the
  first 8 images are grayscale, 3 otherwise.
  Without it (the old path, for folders of one shape): every image is
  decoded once at start-up to check that all share one shape (an
  undecodable file: UserError, or skipped and counted with --skip_corrupt),
  then read from disk and decoded per batch by `gather`.
"""

import dataclasses
import functools
import os
import zlib

import numpy as np

from trainer.data import splits
from trainer.data.args import DataArgs
from trainer.data.readers import choose, corrupt, folder_index, images
from trainer.data.source import Source, host_source
from trainer.errors import UserError

NAME = "image_folder"
_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
_SPLIT_MARKERS = ("train", "test")
_ORDER_SEED = 1234  # fixed: the order must not change with --seed


def _subdirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path)
                if e.is_dir() and not e.name.startswith("."))


def _split_dirs(root: str, walk: "_Walk") -> dict[str, str]:
  """split name -> directory holding that split's class folders."""
  names = walk.subdirs(root)
  marked = [m for m in _SPLIT_MARKERS if m in names
            and walk.subdirs(os.path.join(root, m))]
  if not marked:
    return {"train": root}
  return {name: os.path.join(root, name) for name in names}


class _Walk:
  """The directories a listing looked into, each with its mtime taken just
  before it was listed (folder_index checks them at the next start), and
  the sub-folders of each, scanned once."""

  def __init__(self):
    self.stamps: dict[str, int] = {}
    self._subdirs: dict[str, list[str]] = {}

  def subdirs(self, path: str) -> list[str]:
    if path not in self._subdirs:
      self._seen(path)
      self._subdirs[path] = _subdirs(path)
    return self._subdirs[path]

  def _seen(self, path: str) -> None:
    if path not in self.stamps:
      self.stamps[path] = folder_index.mtimes([path])[0]

  def image_files(self, class_dir: str) -> list[str]:
    """Image files below `class_dir` (sub-folders too, as Keras does),
    sorted."""
    found = []
    pending = [class_dir]
    while pending:
      parent = pending.pop()
      self._seen(parent)
      children = []
      try:
        entries = list(os.scandir(parent))
      except OSError:  # unreadable: skipped, as os.walk does
        entries = []
      for e in entries:
        if e.name.startswith("."):
          continue
        if e.is_dir():   # follows links, as os.walk(followlinks=True)
          children.append(e.path)
        elif e.name.lower().endswith(_EXTENSIONS):
          found.append(e.path)
      pending += sorted(children, reverse=True)
    return sorted(found)


def _listing(root: str):
  """(split -> (paths, labels) sorted by class then path, classes, walk)."""
  walk = _Walk()
  dirs = _split_dirs(root, walk)
  classes = sorted({c for d in dirs.values() for c in walk.subdirs(d)})
  if not classes:
    raise UserError(f"--dataset={NAME}: {root} has no class sub-folders; "
                    "expected DIR/<class>/<image> (or DIR/train/<class>/...).")
  index = {c: i for i, c in enumerate(classes)}
  listed = {}
  for split, d in dirs.items():
    paths, labels = [], []
    for c in walk.subdirs(d):
      files = walk.image_files(os.path.join(d, c))
      paths += files
      labels += [index[c]] * len(files)
    listed[split] = (np.array(paths, dtype=object),
                     np.array(labels, dtype=np.int32))
  if not any(len(p) for p, _ in listed.values()):
    raise UserError(f"--dataset={NAME}: no {'/'.join(_EXTENSIONS)} files "
                    f"under {root}.")
  return listed, classes, walk


def _shuffled(split: str, paths: np.ndarray, labels: np.ndarray):
  # One generator per split, so a split's order does not depend on the
  # others' sizes.
  rng = np.random.default_rng([_ORDER_SEED, zlib.crc32(split.encode())])
  order = rng.permutation(len(labels))
  return paths[order], labels[order]


@functools.lru_cache(maxsize=2)
def _scan(root: str, skip_corrupt: bool, stamp: float):
  """Without --image_size: every image decoded once to check that all share
  one shape. (split -> (paths, labels), classes, shape, skipped per split)."""
  del stamp  # cache key only
  listed, classes, _ = _listing(root)
  everything = np.concatenate([p for p, _ in listed.values()])
  shapes = images.probe_shapes(everything, from_paths=True)
  bad = (shapes < 0).any(axis=1)
  for path in everything[bad]:
    corrupt.report(NAME, path, "not a decodable image", 1, skip_corrupt)
  good_paths = everything[~bad].tolist()
  shape = images.common_shape(NAME, shapes[~bad], good_paths)
  good = set(good_paths)
  parts, skipped_in = {}, {}
  for split, (paths, labels) in listed.items():
    keep = np.array([p in good for p in paths], dtype=bool)
    skipped_in[split] = int((~keep).sum())
    parts[split] = _shuffled(split, paths[keep], labels[keep])
  return parts, classes, shape, skipped_in


@functools.lru_cache(maxsize=2)
def _lazy(root: str, stamp: float, cache_dir: str | None):
  """With --image_size: paths only, nothing decoded (start-up and memory do
  not grow with the images' size; a damaged file is found when read).
  (split -> (paths, labels), classes, channels). The listing is kept in
  `cache_dir` (folder_index) and read back while the folder is unchanged:
  start-up then does not grow with the number of files either."""
  del stamp  # cache key only
  saved = folder_index.load(cache_dir, NAME, root)
  if saved is not None:
    return _unpacked(saved)
  started = folder_index.now()
  listed, classes, walk = _listing(root)
  parts = {split: _shuffled(split, _compact(root, paths), labels)
           for split, (paths, labels) in listed.items()}
  first = [p for paths, _ in listed.values() for p in paths[:_CHANNEL_PROBES]]
  channels = _model_channels(np.array(first[:_CHANNEL_PROBES], dtype=object))
  folder_index.save(cache_dir, NAME, root, list(walk.stamps),
                    np.array(list(walk.stamps.values()), np.int64), started,
                    _packed(parts, classes, channels))
  return parts, classes, channels


def _packed(parts, classes, channels) -> dict:
  """_lazy's result as plain arrays (folder_index.save)."""
  out = {"splits": np.array([os.fsencode(s) for s in parts], dtype=np.bytes_),
         "classes": np.array([os.fsencode(c) for c in classes],
                             dtype=np.bytes_),
         "channels": np.int64(channels)}
  for i, (paths, labels) in enumerate(parts.values()):
    out[f"paths_{i}"], out[f"labels_{i}"] = paths, labels
  return out


def _unpacked(saved: dict):
  parts = {os.fsdecode(s): (saved[f"paths_{i}"], saved[f"labels_{i}"])
           for i, s in enumerate(saved["splits"])}
  return (parts, [os.fsdecode(c) for c in saved["classes"]],
          int(saved["channels"]))


_CHANNEL_PROBES = 8


def _compact(root: str, paths) -> np.ndarray:
  """Paths below `root` -> their relative paths as one fixed-width bytes
  array: ~20 bytes an image instead of ~100 for a Python str or bytes
  object each (peak RSS at 400k images; bench.data_scaling table)."""
  cut = len(os.path.join(root, ""))
  return np.array([os.fsencode(p[cut:]) for p in paths], dtype=np.bytes_)


def _model_channels(paths: np.ndarray) -> int:
  """1 when the first few (sorted) images are all grayscale, else 3: a fixed
  number of files is read, whatever the size of the folder."""
  shapes = images.probe_shapes(paths, from_paths=True)
  readable = shapes[(shapes >= 0).all(axis=1)]
  return 1 if len(readable) and (readable[:, 2] < 3).all() else 3


def image_folder(split: str, args: DataArgs) -> Source:
  root = args.data_dir
  if not root or not os.path.isdir(root):
    raise UserError(f"--dataset={NAME} needs --data_dir=DIR, a directory of "
                    f"class folders (DIR/<class>/<image>); got {root!r}.")
  stamp = os.stat(root).st_mtime
  if args.any_size:
    parts, classes, channels = _lazy(
        os.path.abspath(root), stamp, folder_index.location(args.cache_dir))
    _require(root, parts, split)
    try:
      chosen = splits.select(split, {k: len(v[1]) for k, v in parts.items()})
    except ValueError as e:
      raise UserError(f"--dataset={NAME}: {e}") from None
    paths = np.concatenate([parts[k][0][i] for k, i in chosen])
    labels = np.concatenate([parts[k][1][i] for k, i in chosen])
    top = os.fsencode(os.path.abspath(root))
    source = host_source(f"{NAME}:{split}", paths, labels, len(classes),
                         fetch=lambda rel: read_files(
                             [os.path.join(top, p) for p in rel]))
    return dataclasses.replace(
        source, decode_channels=channels,
        describe=lambda i: os.fsdecode(os.path.join(top, paths[i])))
  parts, classes, shape, skipped_in = _scan(
      os.path.abspath(root), args.skip_corrupt, stamp)
  wanted = list(dict.fromkeys(choose.names(NAME, split)))
  source = _select(root, parts, split, len(classes))
  return images.decoding_source(source, shape, from_paths=True,
                                skipped=sum(skipped_in[n] for n in wanted))


def _require(root, parts, split):
  wanted = list(dict.fromkeys(choose.names(NAME, split)))
  missing = {n: f"{os.path.join(root, n)}/<class>/<images>" for n in wanted}
  choose.require(NAME, split, [s for s, p in parts.items() if len(p[1])],
                 missing)


def _select(root, parts, split, num_classes) -> Source:
  _require(root, parts, split)
  return choose.select(NAME, parts, split, num_classes)


def read_files(paths) -> list[bytes]:
  """The bytes of each file; b"" for one that cannot be read (vanished,
  no permission): like a damaged image, it does not decode, so it gets
  weight 0 or stops the run with its name (tf.io.read_file would fail the
  pipeline instead). Read here, in the batch's host look-up, rather than
  in a tf.map_fn of read_file per path: one call per batch, no graph loop
  (measured here: 2.7 ms of CPU per batch of 128 small files).
  os.open/os.read, not open(): Python's buffered file object cost half of
  the 10 us a small file took (5 with these calls)."""
  out = []
  for path in paths:
    try:
      out.append(_read_file(path))
    except OSError:
      out.append(b"")
  return out


def _read_file(path) -> bytes:
  fd = os.open(path, os.O_RDONLY)
  try:
    size = os.fstat(fd).st_size
    data = os.read(fd, size + 1)   # + 1: a file that grew is read whole
    if len(data) <= size:
      return data
    chunks = [data]
    while chunk := os.read(fd, 1 << 20):
      chunks.append(chunk)
    return b"".join(chunks)
  finally:
    os.close(fd)
