"""`--dataset=image_folder`: DIR/<class>/<image> (image_dataset_from_directory).

Splits: when DIR has a `train/` or `test/` sub-directory that itself holds
class folders, every sub-directory of DIR is a split (DIR/train/<class>/...,
DIR/test/<class>/...); otherwise the whole of DIR is the split "train", to be
sliced: --train_split='train[:80%]' --eval_split='train[80%:]'.
Classes: the sorted class-folder names (across all splits) -> ids 0, 1, ...
Order: files sorted by (class, path), then shuffled ONCE with a fixed seed
(not --seed), so that every run sees the same order and a slice such as
train[80%:] holds all classes in about their overall proportions.
Images (.png .jpg .jpeg .gif .bmp) must share one shape; each is decoded once
at load time (an undecodable file: UserError, or skipped and counted with
--skip_corrupt), then read from disk and decoded per batch by `gather`.
"""

import functools
import os
import zlib

import numpy as np

from trainer.data import registry
from trainer.data.readers import choose, corrupt, images
from trainer.data.source import Source
from trainer.errors import UserError

NAME = "image_folder"
_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
_SPLIT_MARKERS = ("train", "test")
_ORDER_SEED = 1234  # fixed: the order must not change with --seed


def _subdirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path)
                if e.is_dir() and not e.name.startswith("."))


def _split_dirs(root: str) -> dict[str, str]:
  """split name -> directory holding that split's class folders."""
  marked = [m for m in _SPLIT_MARKERS if os.path.isdir(os.path.join(root, m))
            and _subdirs(os.path.join(root, m))]
  if not marked:
    return {"train": root}
  return {name: os.path.join(root, name) for name in _subdirs(root)}


def _image_files(class_dir: str) -> list[str]:
  """Image files below `class_dir` (sub-folders too, as Keras does), sorted."""
  found = []
  for parent, dirs, files in os.walk(class_dir, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found += [os.path.join(parent, f) for f in files
              if f.lower().endswith(_EXTENSIONS) and not f.startswith(".")]
  return sorted(found)


@functools.lru_cache(maxsize=2)
def _scan(root: str, skip_corrupt: bool, stamp: float):
  """(split -> (paths, labels), classes, shape, skipped per split)."""
  del stamp  # cache key only
  dirs = _split_dirs(root)
  classes = sorted({c for d in dirs.values() for c in _subdirs(d)})
  if not classes:
    raise UserError(f"--dataset={NAME}: {root} has no class sub-folders; "
                    "expected DIR/<class>/<image> (or DIR/train/<class>/...).")
  index = {c: i for i, c in enumerate(classes)}
  listed = {}
  for split, d in dirs.items():
    paths, labels = [], []
    for c in _subdirs(d):
      files = _image_files(os.path.join(d, c))
      paths += files
      labels += [index[c]] * len(files)
    listed[split] = (np.array(paths, dtype=object),
                     np.array(labels, dtype=np.int32))
  everything = np.concatenate([p for p, _ in listed.values()])
  if everything.size == 0:
    raise UserError(f"--dataset={NAME}: no {'/'.join(_EXTENSIONS)} files "
                    f"under {root}.")
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
    # One generator per split, so a split's order does not depend on the
    # others' sizes.
    rng = np.random.default_rng([_ORDER_SEED, zlib.crc32(split.encode())])
    order = rng.permutation(int(keep.sum()))
    parts[split] = (paths[keep][order], labels[keep][order])
  return parts, classes, shape, skipped_in


@registry.register(NAME)
def image_folder(split: str, args: registry.DataArgs) -> Source:
  root = args.data_dir
  if not root or not os.path.isdir(root):
    raise UserError(f"--dataset={NAME} needs --data_dir=DIR, a directory of "
                    f"class folders (DIR/<class>/<image>); got {root!r}.")
  parts, classes, shape, skipped_in = _scan(
      os.path.abspath(root), args.skip_corrupt, os.stat(root).st_mtime)
  wanted = list(dict.fromkeys(choose.names(NAME, split)))
  missing = {n: f"{os.path.join(root, n)}/<class>/<images>" for n in wanted}
  choose.require(NAME, split, [s for s, p in parts.items() if len(p[1])],
                 missing)
  source = choose.select(NAME, parts, split, len(classes))
  return images.decoding_source(source, shape, from_paths=True,
                                skipped=sum(skipped_in[n] for n in wanted))
