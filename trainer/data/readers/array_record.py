"""`--dataset=array_record`: ArrayRecord files, read lazily by random access.

ArrayRecord (the `array-record` package that TFDS and Grain read) stores an
index of its records in each file, so a record is looked up by number
without reading the others: start-up opens the files' indexes only, and
memory does not grow with the number of examples (an int64 key per example
of the split, nothing decoded). `python -m trainer.convert
--container=array_record` writes them (records.array_record_options: one
record per chunk, which is what makes a single look-up cheap).

Files of a split: the globs given for it in --file_patterns, else
DATA_DIR/SPLIT-*.array_record and DATA_DIR/SPLIT.array_record*; sorted by
path, records in file order. Records are tf.train.Examples with the fields
of trainer/data/records.py; `num_classes` must be in the first record (the
class count is not found by scanning every label).

Images: without --image_size, every record must have the first record's
shape (read from its height/width/channels); with it, encoded images of any
size are handed to the task's preprocess, which decodes and resizes them.
Raw (--format=raw) records need one shape and no --image_size resizing of
the bytes (they are pixels, not an encoded image).
"""

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf

from trainer.data import splits
from trainer.data.args import DataArgs
from trainer.data.readers import choose
from trainer.data.records import FEATURES
from trainer.data.source import Source, host_source
from trainer.errors import UserError

NAME = "array_record"
SUFFIX = ".array_record"


@functools.lru_cache(maxsize=256)
def _open_file(path: str, stamp: tuple):
  """One file's reader (cached: the splits of one set share them)."""
  del stamp  # cache key only: re-open a replaced file
  # Imported here: array_record's modules define absl flags of their own,
  # which must not appear in trainer.main's --helpfull.
  from array_record.python import array_record_module
  try:
    # No read-ahead: records are looked up at random.
    reader = array_record_module.ArrayRecordReader(path,
                                                   "readahead_buffer_size:0")
    if not reader.ok():
      # A damaged index or footer: the reader opens in a failed state and
      # would report 0 records, silently dropping the file from the split.
      raise ValueError("the reader opened in a failed state (damaged index "
                       "or footer?)")
    return reader
  except Exception as e:  # noqa: BLE001 - the C++ reader raises several types
    raise UserError(f"--dataset={NAME}: cannot open {path} as an ArrayRecord "
                    f"file ({type(e).__name__}: {e}); write it with python -m "
                    "trainer.convert --container=array_record.") from None


class _Records:
  """The records of several files as one sequence, numbered file after
  file. Each file's index is read once (at open) and its reader shared;
  ArrayRecordDataSource would read the indexes again for every file set
  and start a thread pool per look-up (measured: 10 vs 7 us a record)."""

  def __init__(self, files):
    self.readers = [_open_file(f, _stamp(f)) for f in files]
    self.starts = np.cumsum([0] + [r.num_records() for r in self.readers])

  def __len__(self) -> int:
    return int(self.starts[-1])

  def file_of(self, keys):
    return np.searchsorted(self.starts, keys, side="right") - 1

  def __getitem__(self, key: int) -> bytes:
    return self.__getitems__([key])[0]

  def __getitems__(self, keys) -> list:
    keys = np.asarray(keys, np.int64)
    which = self.file_of(keys)
    local = (keys - self.starts[which]).tolist()
    # One range read per record: the reader's look-up by a LIST of numbers
    # hands every batch to its thread pool and cost 17 us of CPU a record
    # here, a range of one 4 us (bench.paired --on_disk, array_record row).
    return [_one(self.readers[f], k) for f, k in zip(which.tolist(), local)]


def _one(reader, key: int) -> bytes:
  found = reader.read(key, key + 1)
  if len(found) != 1:   # a reader in a failed state returns nothing
    raise RuntimeError(f"record {key}: nothing read")
  return found[0]


def _first(source, where: str) -> dict:
  """The parsed first record: shape, encoding and class count of the split."""
  try:
    record = source[0]
    f = tf.io.parse_single_example(record, FEATURES)
  except Exception as e:  # noqa: BLE001
    raise UserError(f"--dataset={NAME}: the first record of {where} is not a "
                    f"tf.train.Example with 'image' and 'label' ({e}).") from None
  return {k: v.numpy() for k, v in f.items()}


def array_record(split: str, args: DataArgs) -> Source:
  names = list(dict.fromkeys(choose.names(NAME, split)))
  found = {name: choose.split_files(NAME, SUFFIX, name, args)
           for name in names}
  files = [f for name in names for f in found[name]]
  # One reader set for the whole split: each file's index is read once.
  source = _Records(files)
  # Each name's files are consecutive: its records are keys
  # [offsets[name], offsets[name] + sizes[name]) of the split.
  bounds = np.cumsum([0] + [len(found[name]) for name in names])
  offsets = {name: int(source.starts[a]) for name, a in zip(names, bounds)}
  sizes = {name: int(source.starts[b]) - offsets[name]
           for name, b in zip(names, bounds[1:])}
  first = _first(source, files[0])
  num_classes = int(first["num_classes"])
  if num_classes <= 0:
    raise UserError(f"--dataset={NAME}: {files[0]} records carry no "
                    "'num_classes' (int64) feature; write them with python -m "
                    "trainer.convert --container=array_record, or add it.")
  try:
    chosen = splits.select(split, sizes)
  except ValueError as e:
    raise UserError(f"--dataset={NAME}: {e}") from None
  keys = np.concatenate([offsets[n] + idx for n, idx in chosen]).astype(
      np.int64)
  raw = bool(first["image_raw_shape"].any())
  shape = tuple(int(x) for x in (first["image_raw_shape"] if raw else
                                 (first["height"], first["width"],
                                  first["channels"])))
  if not args.any_size and not all(shape):
    raise UserError(f"--dataset={NAME}: {files[0]} does not record one image "
                    "shape (height/width/channels are 0: images of any "
                    "size); pass --image_size=N or H,W.")
  if raw and args.any_size:
    raise UserError(f"--dataset={NAME}: {files[0]} holds raw pixels of one "
                    f"shape {shape}; --image_size resizes encoded images of "
                    "any size: drop it or convert with --format=png.")
  def where(key: int) -> str:
    """A damaged record's file and number in it."""
    i = int(source.file_of(key))
    return f"{files[i]} record {key - source.starts[i]}"

  result = lazy_records_source(f"{NAME}:{split}", source, keys, num_classes,
                               shape, raw, args.any_size)
  return dataclasses.replace(result, describe=lambda i: where(keys[i]))


def _stamp(path: str) -> tuple:
  stat = os.stat(path)
  return (stat.st_mtime_ns, stat.st_size)


def _read_one(reader, key: int) -> bytes:
  try:
    return reader[key]
  except Exception:  # noqa: BLE001
    return b""


def _image_and_label(record: bytes) -> tuple[bytes, int]:
  """A record's image bytes and label, parsed here on the host (the record
  is parsed once: a tf.io.parse_example of the batch as well cost 7 us a
  record); (b"", 0) for a record that is not such an Example: its image
  does not decode, so it gets weight 0 (or stops the run) where used."""
  try:
    example = tf.train.Example.FromString(record)
  except Exception:  # noqa: BLE001 - protobuf's DecodeError
    return b"", 0
  feature = example.features.feature
  if "image" not in feature or "label" not in feature:
    return b"", 0
  images = feature["image"].bytes_list.value
  labels = feature["label"].int64_list.value
  if len(images) != 1 or len(labels) != 1:
    return b"", 0
  return images[0], labels[0]


def lazy_records_source(name: str, reader, keys: np.ndarray,
                        num_classes: int, shape, raw: bool,
                        any_size: bool) -> Source:
  """A Source whose `gather` looks its records up in `reader` (anything with
  `__getitems__(list of keys) -> list of bytes`) inside the tf.data map; the
  keys stay on the host (source.host_source), not in the graph."""
  def fetch(batch_keys):
    try:
      found = reader.__getitems__(batch_keys.tolist())
    except Exception:  # noqa: BLE001 - a damaged chunk: find which, one by one
      found = [_read_one(reader, k) for k in batch_keys.tolist()]
    parsed = [_image_and_label(r) for r in found]
    return [p[0] for p in parsed], [p[1] for p in parsed]
  labels = np.zeros(len(keys), np.int32)   # the records carry the labels
  records = host_source(name, keys, labels, num_classes, fetch=fetch,
                        fetch_labels=True)

  def gather(indices):
    encoded, labels = records.gather(indices)
    if any_size:
      return encoded, labels
    if raw:
      images = tf.io.decode_raw(encoded, tf.uint8)
      return tf.reshape(images, [-1, *shape]), labels
    spec = tf.TensorSpec(shape, tf.uint8)
    images = tf.map_fn(
        lambda data: tf.ensure_shape(tf.io.decode_image(
            data, channels=shape[-1], dtype=tf.uint8,
            expand_animations=False), shape),
        encoded, fn_output_signature=spec)
    return images, labels

  if any_size:
    spec = tf.TensorSpec([], tf.string)
    channels = 1 if 0 < shape[-1] < 3 else 3
  else:
    spec, channels = tf.TensorSpec(shape, tf.uint8), 0
  return dataclasses.replace(records, gather=gather, feature_spec=spec,
                             decode_channels=channels)
