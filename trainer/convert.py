"""Writes registered dataset splits as sharded TFRecords for --dataset=tfrecord.

  python -m trainer.convert --dataset=mnist --data_dir=DIR
      --split=train=test[:8000],test=test[8000:] --out=OUT --shards=4
      [--format=png|raw]

writes OUT/{name}-{i:05d}-of-{N:05d}.tfrecord. Each item of --split is SPLIT
(written under its own name) or NAME=SPLIT (any split string). Shards hold
contiguous runs of examples in source order, so reading them in sorted file
order (as the tfrecord reader does) yields the source order again: training
from the shards sees the same batches as training from the original files.
Record features: image (PNG bytes, or raw uint8 bytes with image_raw_shape),
label, height, width, channels (int64).
"""

import glob
import os
import re
import sys

# TF's C++ INFO lines (oneDNN notices) would bury the progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402


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


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"trainer.convert: error: {e}. See --helpfull.", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  # Flags first, before TensorFlow's import and the C++ log lines it prints
  # whatever TF_CPP_MIN_LOG_LEVEL says: a bad flag is ONE line, exit 2.
  _define_flags()
  app.define_help_flags()
  _parse_flags(sys.argv)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer.data import registry, splits  # noqa: E402
from trainer.errors import UserError  # noqa: E402

FORMATS = ("png", "raw")
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


def shard_paths(out_dir: str, name: str, shards: int) -> list[str]:
  # Zero-padded numbers: sorted names are shard order.
  return [os.path.join(out_dir, f"{name}-{i:05d}-of-{shards:05d}.tfrecord")
          for i in range(shards)]


def _example(data: bytes, label: int, shape, raw: bool) -> bytes:
  ints = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=v))
  feature = {
      "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
      "label": ints([label]),
      "height": ints([shape[0]]),
      "width": ints([shape[1]]),
      "channels": ints([shape[2]]),
  }
  if raw:
    feature["image_raw_shape"] = ints(list(shape))
  return tf.train.Example(
      features=tf.train.Features(feature=feature)).SerializeToString()


def _check_spec(source) -> tuple[int, int, int]:
  spec, label = source.feature_spec, source.label_spec
  if (not isinstance(spec, tf.TensorSpec) or spec.dtype != tf.uint8
      or spec.shape.rank != 3 or not spec.shape.is_fully_defined()
      or not isinstance(label, tf.TensorSpec) or label.shape.rank != 0
      or not label.dtype.is_integer):
    raise UserError(f"{source.name}: trainer.convert writes uint8 HxWxC "
                    f"images with integer labels, not {spec} / {label}.")
  return tuple(spec.shape.as_list())


def write_split(source, out_dir: str, name: str, shards: int,
                fmt: str) -> list[str]:
  """Writes `source` in order as `shards` contiguous shards; returns paths."""
  shape = _check_spec(source)
  n = source.num_examples
  if not 1 <= shards <= n:
    raise UserError(f"--shards={shards}: must be between 1 and the "
                    f"{n} examples of {source.name}.")
  paths = shard_paths(out_dir, name, shards)
  pattern = os.path.join(out_dir, f"{name}-*.tfrecord")
  stale = set(glob.glob(pattern)) - set(paths)
  if stale:
    # The reader globs NAME-*.tfrecord: old shards would be read as well.
    raise UserError(f"{out_dir} already holds {sorted(stale)[0]} (another "
                    f"shard set of {name!r}); delete it or use another --out.")
  raw = fmt == "raw"

  def encode(images, labels):
    data = images if raw else tf.map_fn(tf.io.encode_png, images,
                                        fn_output_signature=tf.string)
    return data, labels

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
        writer = tf.io.TFRecordWriter(paths[shard] + ".tmp")
      payload = np.ascontiguousarray(item).tobytes() if raw else item
      writer.write(_example(payload, int(label), shape, raw))
      written += 1
  writer.close()
  os.replace(paths[shard] + ".tmp", paths[shard])
  return paths


def convert(dataset: str, args: registry.DataArgs, split_flag: str,
            out_dir: str, shards: int, fmt: str) -> dict[str, list[str]]:
  """Converts each --split item; returns {output name: shard paths}."""
  if fmt not in FORMATS:
    raise UserError(f"--format={fmt!r}: use one of {', '.join(FORMATS)}.")
  try:
    reader = registry.get(dataset)
  except KeyError:
    raise UserError(f"--dataset={dataset!r} has no reader; known: "
                    f"{', '.join(registry.names())}.") from None
  items = parse_split_flag(split_flag)
  os.makedirs(out_dir, exist_ok=True)
  written = {}
  for name, spec in items:
    try:
      source = reader(spec, args)
    except ValueError as e:
      raise UserError(f"--dataset={dataset}: {e}") from None
    written[name] = write_split(source, out_dir, name, shards, fmt)
    print(f"{source.name}: {source.num_examples} examples -> "
          f"{os.path.join(out_dir, name)}-*-of-{shards:05d}.tfrecord"
          f" (skipped as corrupt: {source.skipped})", flush=True)
  return written


def main(argv):
  if len(argv) > 1:
    print(f"trainer.convert: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  f = flags.FLAGS
  try:
    for required in ("dataset", "split", "out"):
      if not getattr(f, required):
        raise UserError(f"--{required} is required.")
    args = registry.DataArgs(data_dir=f.data_dir or None,
                             skip_corrupt=f.skip_corrupt)
    convert(f.dataset, args, f.split, f.out, f.shards, f.format)
  except UserError as e:
    print(f"trainer.convert: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
