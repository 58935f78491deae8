"""Writes registered dataset splits as sharded record files.

  python -m trainer.convert --dataset=mnist --data_dir=DIR
      --split=train=test[:8000],test=test[8000:] --out=OUT --shards=4
      [--format=png|raw] [--container=tfrecord|array_record] [--any_size]

writes OUT/{name}-{i:05d}-of-{N:05d}.tfrecord (or .array_record). Each item
of --split is SPLIT (written under its own name) or NAME=SPLIT (any split
string). Shards hold contiguous runs of examples in source order, so reading
them in sorted file order (as the readers do) yields the source order again:
training from the shards sees the same batches as training from the original
files. Record features (trainer/data/records.py): image (PNG bytes, or raw
uint8 bytes with image_raw_shape), label, height, width, channels,
num_classes (int64).

--container=array_record writes ArrayRecord files (`group_size:1`: one
record per chunk, so the trainer looks each example up by number without
reading the rest; --dataset=array_record reads them lazily, at any size).
--any_size reads the dataset as --image_size would (image_folder: paths
only) and copies each encoded image unchanged, whatever its size; height
and width are then written as 0 and the trainer needs --image_size.

  python -m trainer.convert --text_corpus=DIR --out=OUT [--shards=N]
      [--text_pattern=*.py] [--heldout_fraction=0.05]

writes a folder of text files as byte-level token ArrayRecord files,
OUT/{train,test}-{i:05d}-of-{N:05d}.array_record (trainer.data.text_convert:
the same documents and held-out split as the text source, read back by
trainer.data.readers.token_records).
"""

import glob
import os
import re
import sys

# TF's C++ INFO lines (oneDNN notices) would bury the progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from trainer import cli  # noqa: E402


def _define_flags():
  # Defined only when run as a program, so importing this module (tests)
  # does not clash with trainer.config's flags of the same names.
  flags.DEFINE_string("dataset", None, "Registered dataset to read.")
  flags.DEFINE_string("data_dir", None, "Directory holding its files.")
  flags.DEFINE_string("split", None, "Comma-separated SPLIT or NAME=SPLIT.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_integer("shards", 1, "Files per split.")
  flags.DEFINE_string("format", "png", "png (lossless, smaller) or raw "
                      "(uncompressed bytes, fastest to read).")
  flags.DEFINE_bool("skip_corrupt", False, "Skip corrupt input records.")
  flags.DEFINE_string("container", "tfrecord", "tfrecord (read into memory "
                      "by --dataset=tfrecord) or array_record (random "
                      "access, read lazily by --dataset=array_record).")
  flags.DEFINE_bool("any_size", False, "Read the dataset as --image_size "
                    "does (image_folder: paths only, nothing decoded) and "
                    "copy every encoded image unchanged, of any size "
                    "(needs --container=array_record).")
  flags.DEFINE_string("text_corpus", None, "A folder of text files to write "
                      "as byte-level token ArrayRecord files (train and "
                      "test splits) instead of a --dataset.")
  flags.DEFINE_string("text_pattern", "*.py", "--text_corpus: the file "
                      "names to take (fnmatch pattern).")
  flags.DEFINE_float("heldout_fraction", 0.05, "--text_corpus: the share of "
                     "files (by a hash of their path) held out as split "
                     "test.")


if __name__ == "__main__":
  # Flags first, before TensorFlow's import and the C++ log lines it prints
  # whatever TF_CPP_MIN_LOG_LEVEL says: a bad flag is ONE line, exit 2.
  _define_flags()
  app.define_help_flags()
  cli.parse("trainer.convert", sys.argv)

import numpy as np  # noqa: E402

from trainer import tfimport  # noqa: E402

tf = tfimport.import_tensorflow()

from trainer.data import records, registry, splits  # noqa: E402
from trainer.errors import UserError  # noqa: E402

FORMATS = ("png", "raw")
CONTAINERS = {"tfrecord": ".tfrecord", "array_record": ".array_record"}
_BATCH = 256


def parse_split_flag(text: str) -> list[tuple[str, str]]:
  """Parses --split: "a,x=test[:10]" -> [("a", "a"), ("x", "test[:10]")]."""
  out = []
  for item in filter(None, text.replace(" ", "").split(",")):
    name, sep, spec = item.rpartition("=")
    if not sep:
      name = spec
    if not re.fullmatch(r"[A-Za-z_][\w-]*", name):
      raise UserError(f"--split item {item!r}: {spec!r} is not a plain split "
                      "name, so it needs an output name: NAME=SPLIT, e.g. "
                      "train=test[:8000].")
    try:
      splits.parse(spec)
    except ValueError as e:
      raise UserError(f"--split: {e}") from None
    out.append((name, spec))
  if not out:
    raise UserError("--split is empty; pass e.g. --split=train,test.")
  if len({n for n, _ in out}) != len(out):
    raise UserError(f"--split={text!r} writes one name twice; name them "
                    "apart with NAME=SPLIT.")
  return out


def shard_paths(out_dir: str, name: str, shards: int,
                suffix: str = ".tfrecord") -> list[str]:
  # Zero-padded numbers: sorted names are shard order.
  return [os.path.join(out_dir, f"{name}-{i:05d}-of-{shards:05d}{suffix}")
          for i in range(shards)]


def _open_writer(container: str, path: str, raw: bool):
  """An object with write(bytes) and close() for one shard; `raw`: its
  records hold raw pixels (compressed in ArrayRecord), else encoded images
  (stored as they are)."""
  if container == "array_record":
    from array_record.python import array_record_module
    return array_record_module.ArrayRecordWriter(
        path, records.array_record_options(raw))
  return tf.io.TFRecordWriter(path)


def _check_spec(source) -> tuple[int, int, int]:
  """The one image shape of `source`, or (0, 0, channels) when it hands out
  encoded images of any size."""
  spec, label = source.feature_spec, source.label_spec
  if source.decode_channels:
    if not (isinstance(label, tf.TensorSpec) and label.shape.rank == 0
            and label.dtype.is_integer):
      raise UserError(f"{source.name}: trainer.convert writes integer "
                      f"labels, not {label}.")
    return (0, 0, source.decode_channels)
  if (not isinstance(spec, tf.TensorSpec) or spec.dtype != tf.uint8
      or spec.shape.rank != 3 or not spec.shape.is_fully_defined()
      or not isinstance(label, tf.TensorSpec) or label.shape.rank != 0
      or not label.dtype.is_integer):
    raise UserError(f"{source.name}: trainer.convert writes uint8 HxWxC "
                    f"images with integer labels, not {spec} / {label}.")
  return tuple(spec.shape.as_list())


def write_split(source, out_dir: str, name: str, shards: int,
                fmt: str, container: str = "tfrecord") -> list[str]:
  """Writes `source` in order as `shards` contiguous shards; returns paths."""
  shape = _check_spec(source)
  any_size = not shape[0]
  if any_size and (container != "array_record" or fmt != "png"):
    raise UserError(f"{source.name}: images of any size are copied as they "
                    "are only into --container=array_record (--format=png); "
                    "the tfrecord reader needs one shape.")
  n = source.num_examples
  if not 1 <= shards <= n:
    raise UserError(f"--shards={shards}: must be between 1 and the "
                    f"{n} examples of {source.name}.")
  suffix = CONTAINERS[container]
  paths = shard_paths(out_dir, name, shards, suffix)
  pattern = os.path.join(out_dir, f"{name}-*{suffix}")
  stale = set(glob.glob(pattern)) - set(paths)
  if stale:
    # The reader globs NAME-*.tfrecord: old shards would be read as well.
    raise UserError(f"{out_dir} already holds {sorted(stale)[0]} (another "
                    f"shard set of {name!r}); delete it or use another --out.")
  raw = fmt == "raw"

  def encode(images, labels):
    if raw or any_size:   # raw pixels, or encoded files copied unchanged
      return images, labels
    return tf.map_fn(tf.io.encode_png, images,
                     fn_output_signature=tf.string), labels

  # In order (deterministic map); PNG encoding of one batch runs while the
  # previous one is written.
  ds = (tf.data.Dataset.range(n).batch(_BATCH)
        .map(source.gather).map(encode, num_parallel_calls=2)
        .prefetch(2).as_numpy_iterator())
  bounds = [i * n // shards for i in range(shards + 1)]
  shard, writer, written = -1, None, 0
  for data, labels in ds:
    for item, label in zip(data, labels):
      if written == bounds[shard + 1]:
        # Write under a temporary name first: a crash never leaves a
        # truncated shard that matches the reader's pattern.
        if writer:
          writer.close()
          os.replace(paths[shard] + ".tmp", paths[shard])
        shard += 1
        writer = _open_writer(container, paths[shard] + ".tmp", raw)
      payload = np.ascontiguousarray(item).tobytes() if raw else item
      writer.write(records.encode(payload, int(label), shape, raw,
                                  source.num_classes or 0))
      written += 1
  writer.close()
  os.replace(paths[shard] + ".tmp", paths[shard])
  return paths


def _tfrecord_stream(files, skip_corrupt: bool):
  """Serialized records of `files` in order, one file at a time (bounded
  memory); a file that breaks midway: UserError, or its records before the
  break with --skip_corrupt (logged)."""
  from trainer.data.readers import corrupt, tfrecord
  for path in files:
    ds = tf.data.TFRecordDataset(path,
                                 compression_type=tfrecord._compression(path))  # noqa: SLF001
    count = 0
    try:
      for record in ds.as_numpy_iterator():
        count += 1
        yield record
    except tf.errors.DataLossError as e:
      corrupt.report("tfrecord", path, f"unreadable after {count} good "
                     f"records ({corrupt.tf_reason(e)})", 1, skip_corrupt)


def _holds_raw_pixels(example) -> bool:
  """Whether a record's image is raw pixels (records.FEATURES'
  image_raw_shape is set) rather than encoded bytes."""
  feature = example.features.feature
  # `in` first: indexing a protobuf map inserts the missing key.
  return ("image_raw_shape" in feature
          and any(feature["image_raw_shape"].int64_list.value))


def stream_tfrecord_split(args: registry.DataArgs, spec: str, out_dir: str,
                          name: str, shards: int) -> list[str]:
  """TFRecord split -> ArrayRecord shards without holding the split: one
  pass counts the records and finds the class count (labels only), a
  second copies each record, adding `num_classes`. Records keep their
  image encoding, so images of any size stay as they are."""
  from trainer.data.readers import choose
  if not re.fullmatch(r"[A-Za-z_][\w-]*", spec):
    raise UserError(f"--split item {spec!r}: converting --dataset=tfrecord "
                    "to array_record streams whole splits; slice the "
                    "result instead (--train_split='train[:80%]').")
  files = choose.split_files("tfrecord", ".tfrecord", spec, args)
  label_spec = {"label": records.FEATURES["label"]}
  n, top = 0, -1
  for record in _tfrecord_stream(files, args.skip_corrupt):
    label = int(tf.io.parse_single_example(record, label_spec)["label"])
    n, top = n + 1, max(top, label)
  if not 1 <= shards <= n:
    raise UserError(f"--shards={shards}: must be between 1 and the {n} "
                    f"records of {spec}.")
  paths = shard_paths(out_dir, name, shards, CONTAINERS["array_record"])
  bounds = [i * n // shards for i in range(shards + 1)]
  shard, writer = -1, None
  for i, record in enumerate(_tfrecord_stream(files, True)):
    example = tf.train.Example.FromString(record)
    if i == bounds[shard + 1]:
      if writer:
        writer.close()
        os.replace(paths[shard] + ".tmp", paths[shard])
      shard += 1
      writer = _open_writer("array_record", paths[shard] + ".tmp",
                            _holds_raw_pixels(example))
    example.features.feature["num_classes"].int64_list.value[:] = [top + 1]
    writer.write(example.SerializeToString())
  writer.close()
  os.replace(paths[shard] + ".tmp", paths[shard])
  print(f"tfrecord:{spec}: {n} records -> {os.path.join(out_dir, name)}-*-of-"
        f"{shards:05d}.array_record (streamed)", flush=True)
  return paths


def convert(dataset: str, args: registry.DataArgs, split_flag: str,
            out_dir: str, shards: int, fmt: str,
            container: str = "tfrecord") -> dict[str, list[str]]:
  """Converts each --split item; returns {output name: shard paths}."""
  if fmt not in FORMATS:
    raise UserError(f"--format={fmt!r}: use one of {', '.join(FORMATS)}.")
  if container not in CONTAINERS:
    raise UserError(f"--container={container!r}: use one of "
                    f"{', '.join(CONTAINERS)}.")
  try:
    reader = registry.get(dataset)
  except KeyError:
    raise UserError(f"--dataset={dataset!r} has no reader; known: "
                    f"{', '.join(registry.names())}.") from None
  items = parse_split_flag(split_flag)
  os.makedirs(out_dir, exist_ok=True)
  written = {}
  for name, spec in items:
    if dataset == "tfrecord" and container == "array_record":
      # Streamed: a TFRecord split may be too large to load.
      written[name] = stream_tfrecord_split(args, spec, out_dir, name, shards)
      continue
    try:
      source = reader(spec, args)
    except ValueError as e:
      raise UserError(f"--dataset={dataset}: {e}") from None
    written[name] = write_split(source, out_dir, name, shards, fmt,
                                container)
    print(f"{source.name}: {source.num_examples} examples -> "
          f"{os.path.join(out_dir, name)}-*-of-{shards:05d}"
          f"{CONTAINERS[container]}"
          f" (skipped as corrupt: {source.skipped})", flush=True)
  return written


def main() -> None:
  f = flags.FLAGS
  if f.text_corpus:
    if not f.out:
      raise UserError("--out is required.")
    from trainer.data import text_convert
    written = text_convert.convert_text(f.text_corpus, f.out, f.shards,
                                        f.text_pattern, f.heldout_fraction)
    for name, paths in written.items():
      print(f"{name}: {len(paths)} shard(s) in {f.out}")
    return
  for required in ("dataset", "split", "out"):
    if not getattr(f, required):
      raise UserError(f"--{required} is required.")
  args = registry.DataArgs(data_dir=f.data_dir or None,
                           skip_corrupt=f.skip_corrupt,
                           any_size=f.any_size)
  convert(f.dataset, args, f.split, f.out, f.shards, f.format, f.container)


if __name__ == "__main__":
  cli.run("trainer.convert", main)
