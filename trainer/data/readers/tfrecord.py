"""`--dataset=tfrecord`: tf.train.Example files, held in memory, random access.

The in-memory reader: for splits that fit in memory. A split whose files
exceed 40% of the available memory is refused before anything is read,
with the way out: convert once (streaming) to ArrayRecord, which
--dataset=array_record reads lazily.

Files of a split: the globs given for it in `DataArgs.file_patterns`, else
`{data_dir}/{split}-*.tfrecord` and `{data_dir}/{split}.tfrecord*`; sorted by
path, records in file order (so `trainer.convert` shards read back in source
order). `.gz` / `.zlib` files are read as GZIP / ZLIB compressed.

Features: `image` bytes (PNG/JPEG/GIF/BMP, or raw uint8 pixels in C order when
an int64 `image_raw_shape` [H,W,C] is present), `label` int64, and optional
`height`/`width`/`channels` int64, checked against the decoded image. All
images must share one shape (raw ones are held decoded, as uint8 arrays).
num_classes = the largest label in the splits read + 1.

All records are read, parsed and decoded once when the Source is built;
`gather` then decodes only the batch it is asked for. Damage found there:
  - A file TF cannot read to the end (truncated, bad CRC): TFRecord has no
    index, so nothing after the break can be located. With --skip_corrupt the
    CRC-checked records BEFORE the break are kept and the break counts as ONE
    skipped record (exact for the usual damage, a cut-off last write); the
    log line gives the number of unread trailing bytes.
  - A record that is not such an Example, or whose image does not decode or
    disagrees with its height/width/channels: skipped and counted one each.
Without --skip_corrupt any of these raises UserError naming the file.
"""

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf

from trainer.data.args import DataArgs
from trainer.data.records import FEATURES as _FEATURES
from trainer.data.readers import choose, corrupt, images
from trainer.data.source import Source
from trainer.errors import UserError

NAME = "tfrecord"


def _compression(path: str) -> str:
  if path.endswith(".gz"):
    return "GZIP"
  return "ZLIB" if path.endswith((".zlib", ".zz")) else ""


def read_records(path: str) -> tuple[list[bytes], str | None]:
  """The records of one file up to the first unreadable one, and why."""
  ds = tf.data.TFRecordDataset(path, compression_type=_compression(path))
  records = []
  try:
    # Batched: one Python step per 1024 records instead of per record.
    for batch in ds.batch(1024).as_numpy_iterator():
      records.extend(batch.tolist())
    return records, None
  except tf.errors.DataLossError:
    pass
  except tf.errors.OpError as e:
    raise UserError(f"--dataset={NAME}: cannot read {path}: "
                    f"{corrupt.tf_reason(e)}.") from None
  # The failing batch swallowed the good records just before the break:
  # re-read this (rare) damaged file one record at a time.
  records = []
  try:
    for record in ds.as_numpy_iterator():
      records.append(record)
  except tf.errors.DataLossError as e:
    return records, corrupt.tf_reason(e)
  return records, None


def _parse_all(records: list[bytes]) -> dict[str, np.ndarray]:
  """Parses every record in parallel; `ok` marks the ones that parsed."""
  n = len(records)
  out = {"ok": np.zeros(n, bool), "image": np.empty(n, object),
         "label": np.zeros(n, np.int64), "hwc": np.zeros((n, 3), np.int64),
         "raw_shape": np.zeros((n, 3), np.int64)}
  if n == 0:
    return out

  def parse(index, record):
    f = tf.io.parse_single_example(record, _FEATURES)
    hwc = tf.stack([f["height"], f["width"], f["channels"]])
    return index, f["image"], f["label"], hwc, f["image_raw_shape"]

  ds = tf.data.Dataset.from_tensor_slices(
      (tf.range(n, dtype=tf.int64), tf.constant(records, dtype=tf.string)))
  ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=False).ignore_errors().batch(1024)
  for index, image, label, hwc, raw_shape in ds.as_numpy_iterator():
    out["ok"][index] = True
    out["image"][index] = list(image)
    out["label"][index] = label
    out["hwc"][index] = hwc
    out["raw_shape"][index] = raw_shape
  return out


def _image_shapes(p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Shape [N,3] of every parsed image (-1 = bad) and whether it is raw."""
  raw = p["ok"] & (p["raw_shape"] != 0).any(axis=1)
  shapes = np.full((len(raw), 3), -1, np.int64)
  encoded = np.flatnonzero(p["ok"] & ~raw)
  shapes[encoded] = images.probe_shapes(p["image"][encoded], from_paths=False)
  for i in np.flatnonzero(raw):
    if len(p["image"][i]) == np.prod(p["raw_shape"][i]):
      shapes[i] = p["raw_shape"][i]
  # height/width/channels, when written, must match what the bytes hold.
  declared = (p["hwc"] != 0).all(axis=1)
  shapes[declared & (shapes != p["hwc"]).any(axis=1)] = -1
  return shapes, raw


@functools.lru_cache(maxsize=2)
def _load_split(files: tuple[str, ...], stamps: tuple, skip_corrupt: bool):
  """(items, labels, shape, raw, skipped) for the records of `files`.

  Cached per file set: "train[:80%]" and "train[80%:]" read the files once.
  """
  del stamps  # cache key only: re-read replaced files
  records, origin, skipped = [], [], 0
  for path in files:
    recs, broke = read_records(path)
    if broke:
      lost = ""
      if not _compression(path):
        # Each record is framed by 8 length + 4 + 4 CRC bytes.
        rest = os.path.getsize(path) - sum(len(r) + 16 for r in recs)
        lost = f"; {max(rest, 0)} trailing bytes not read"
      skipped += corrupt.report(
          NAME, path, f"unreadable after {len(recs)} good records ({broke}"
          f"{lost})", 1, skip_corrupt)
    records += recs
    origin += [(path, i) for i in range(len(recs))]
  p = _parse_all(records)
  shapes, raw = _image_shapes(p)
  bad = np.flatnonzero((shapes < 0).any(axis=1))
  by_file: dict[str, list[int]] = {}
  for i in bad:
    by_file.setdefault(origin[i][0], []).append(origin[i][1])
  for path, numbers in by_file.items():
    skipped += corrupt.report(
        NAME, path, f"record(s) {_few(numbers)} (0-based) are not "
        "tf.train.Examples with a decodable 'image' (bytes) and 'label' "
        "(int64) matching their height/width/channels", len(numbers),
        skip_corrupt)
  good = np.setdiff1d(np.arange(len(records)), bad)
  if good.size == 0:
    raise UserError(f"--dataset={NAME}: no usable records in "
                    f"{', '.join(files)}.")
  names = [f"{origin[i][0]} record {origin[i][1]}" for i in good]
  shape = images.common_shape(NAME, shapes[good], names)
  if 0 < raw[good].sum() < good.size:
    raise UserError(f"--dataset={NAME}: {', '.join(files)} mix raw and "
                    "encoded images; write them with one trainer.convert "
                    "--format.")
  labels = p["label"][good]
  if labels.min() < 0 or labels.max() > np.iinfo(np.int32).max:
    raise UserError(f"--dataset={NAME}: labels must be class ids >= 0 (found "
                    f"{labels.min()}..{labels.max()}) in {', '.join(files)}.")
  return (p["image"][good], labels.astype(np.int32), shape, bool(raw[good][0]),
          skipped)


def _few(numbers: list[int]) -> str:
  shown = ", ".join(map(str, numbers[:5]))
  return shown + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")


# A compressed file holds more than its size; a guess, erring on the side of
# refusing rather than of an out-of-memory kill.
_COMPRESSION_RATIO = 4
# Share of the available memory one split's records may take: they are held
# as Python bytes (plus parsed copies while loading) and TF needs the rest.
_MEMORY_SHARE = 0.4


def available_memory_bytes() -> int | None:
  """MemAvailable of /proc/meminfo (Linux); None where it cannot be read."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def check_fits_in_memory(files, available: int | None) -> None:
  """UserError, before anything is read, when the split cannot be held."""
  if available is None:
    return
  size = sum(os.path.getsize(f) * (_COMPRESSION_RATIO if _compression(f)
                                   else 1) for f in files)
  if size > _MEMORY_SHARE * available:
    raise UserError(
        f"--dataset={NAME}: the {len(files)} file(s) of {files[0]}... hold "
        f"~{size / 2**30:.1f} GiB and this reader keeps a split in memory "
        f"({available / 2**30:.1f} GiB available). Convert once to a "
        "random-access format read lazily: python -m trainer.convert "
        "--dataset=tfrecord --data_dir=DIR --split=SPLIT --out=OUT "
        "--container=array_record, then --dataset=array_record "
        "--data_dir=OUT.")


def tfrecord(split: str, args: DataArgs) -> Source:
  parts, skipped, shapes, raws = {}, 0, {}, set()
  for name in dict.fromkeys(choose.names(NAME, split)):
    files = tuple(choose.split_files(NAME, ".tfrecord", name, args))
    check_fits_in_memory(files, available_memory_bytes())
    stamps = tuple((os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files)
    items, labels, shape, raw, dropped = _load_split(files, stamps,
                                                     args.skip_corrupt)
    if raw:
      items = np.stack([np.frombuffer(b, np.uint8).reshape(shape)
                        for b in items])
    parts[name], shapes[name] = (items, labels), shape
    skipped += dropped
    raws.add(raw)
  if len(set(shapes.values())) > 1 or len(raws) > 1:
    raise UserError(f"--dataset={NAME}: split {split!r} joins splits with "
                    f"different image shapes or encodings {shapes}; use one.")
  # No class count is stored in the records: the largest label seen decides.
  num_classes = int(max(y.max() for _, y in parts.values())) + 1
  source = choose.select(NAME, parts, split, num_classes)
  if raws == {True}:
    return dataclasses.replace(source, skipped=skipped)
  return images.decoding_source(source, next(iter(shapes.values())),
                                from_paths=False, skipped=skipped)
