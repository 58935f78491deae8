"""Start-up time and peak memory of the data pipeline against the number of
examples: the lazy readers must stay flat in N.

  python -m bench.data_scaling write --kind=array_record --n=50000 --out=DIR
  python -m bench.data_scaling measure --kind=array_record --data_dir=DIR
  python -m bench.data_scaling table --sizes=50000,200000,400000 [--kinds=...]
  python -m bench.data_scaling decode     # microseconds per image

`write` makes N small JPEG examples (one 32x32 photo crop, the label varies)
as an image folder or as ArrayRecord shards. `measure` runs in its own
process: it imports TensorFlow first (not timed), then times building the
Source and the training pipeline and pulling the first batch, and prints one
JSON line with that time and the process's peak RSS. `table` writes each
size once into a temporary directory and measures it in a fresh process.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from bench import machine

KINDS = ("image_folder", "array_record", "image_folder_eager", "tfrecord")


def _jpeg(seed: int, shape=(32, 32, 3)) -> bytes:
  import numpy as np
  import tensorflow as tf
  rng = np.random.default_rng(seed)
  h, w, _ = shape
  # Smooth content (a gradient plus little noise) so JPEG stays small.
  image = (np.linspace(0, 127, w, dtype=np.float32)[None, :, None] +
           np.linspace(0, 127, h, dtype=np.float32)[:, None, None])
  image = image + rng.normal(0, 8, shape)
  return tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8)).numpy()


def write(kind: str, n: int, out: str, classes: int = 10,
          shape=(32, 32, 3)) -> None:
  """N examples in `out`: kind image_folder(_eager) or array_record/tfrecord."""
  from trainer.data import records
  os.makedirs(out, exist_ok=True)
  images = [_jpeg(i, shape) for i in range(16)]
  if kind.startswith("image_folder"):
    for c in range(classes):
      os.makedirs(os.path.join(out, f"c{c}"), exist_ok=True)
    for i in range(n):
      with open(os.path.join(out, f"c{i % classes}", f"{i:07d}.jpg"), "wb") as f:
        f.write(images[i % 16])
    return
  shards = 4
  bounds = [i * n // shards for i in range(shards + 1)]
  for s in range(shards):
    path = os.path.join(out, f"train-{s:05d}-of-{shards:05d}.{kind}")
    if kind == "array_record":
      from array_record.python import array_record_module
      writer = array_record_module.ArrayRecordWriter(
          path, records.array_record_options(raw=False))
    else:
      import tensorflow as tf
      writer = tf.io.TFRecordWriter(path)
    for i in range(bounds[s], bounds[s + 1]):
      writer.write(records.encode(images[i % 16], i % classes, shape,
                                  False, classes))
    writer.close()


def measure(kind: str, data_dir: str, repeats: int = 3) -> dict:
  """Seconds from nothing built to the first training batch, and peak RSS.

  `data_dir` may list several directories (comma-separated): they are then
  timed in alternation, `repeats` rounds, so that a busy host's slow spells
  fall on each size alike. startup_s is the first (cold) build; warm_s the
  fastest of the builds with the readers' caches cleared: the work that may
  grow with N (listing, opening indexes, key arrays, reading the first
  batch) is redone, the N-independent tracing that autograph caches is not.
  Peak RSS is only meaningful with one directory."""
  import tensorflow as tf  # noqa: F401 - imported before the clock starts
  from trainer.config import Config
  from trainer.data import pipeline
  from trainer.data.readers import array_record, image_folder, tfrecord
  from trainer.task import ClassificationTask
  import layers
  dataset = kind.replace("_eager", "")
  lazy = kind in ("image_folder", "array_record")
  dirs = data_dir.split(",")
  times = {d: [] for d in dirs}
  examples = {}
  # How many builds listed each image folder (file by file): with the
  # listing cache, only the first.
  listings = {d: 0 for d in dirs}
  list_folder = image_folder._listing  # noqa: SLF001

  def counted(root):
    listings[next(d for d in dirs if os.path.abspath(d) == root)] += 1
    return list_folder(root)

  image_folder._listing = counted  # noqa: SLF001
  try:
    for _ in range(repeats):
      for d in dirs:
        for cached in (array_record._open_file, image_folder._lazy,  # noqa: SLF001
                       image_folder._scan, tfrecord._load_split):  # noqa: SLF001
          cached.cache_clear()
        config = Config(dataset=dataset, data_dir=d,
                        image_size="32" if lazy else "", global_batch_size=64)
        start = time.perf_counter()
        task = ClassificationTask(config, layers.get("cnn"))
        ds = pipeline.train_dataset(task, "train", 64, seed=0, start_position=0)
        batch = next(iter(ds))
        times[d].append(time.perf_counter() - start)
        examples[d] = task.source("train").num_examples
        assert batch[0].shape[0] == 64
  finally:   # the reader's own again: a second call would wrap the wrapper
    image_folder._listing = list_folder  # noqa: SLF001
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  rows = [{"kind": kind, "examples": examples[d], "startup_s": times[d][0],
           "warm_s": min(times[d]), "peak_rss_mb": rss, "times": times[d],
           "listings": listings[d]}
          for d in dirs]
  return rows[0] if len(rows) == 1 else rows


def decode_cost(shape=(28, 28, 1), size=(28, 28), batch: int = 128,
                repeats: int = 20) -> dict:
  """Microseconds per image to decode a batch of JPEGs, and to decode plus
  random-resized-crop them (trainer.data.resize), fastest of `repeats`."""
  import tensorflow as tf
  from trainer.data import resize
  encoded = tf.constant([_jpeg(i, shape) for i in range(batch)])
  seed = tf.constant([0, 0], tf.int64)
  decode_only = tf.function(lambda x: tf.map_fn(
      resize.decode, x, fn_output_signature=tf.TensorSpec(None, tf.uint8)))
  full = tf.function(lambda x: resize.resize_batch(
      x, size, shape[-1], True, seed)[0])
  out = {}
  for name, fn in (("decode_us", decode_only), ("decode_crop_resize_us", full)):
    fn(encoded)   # trace
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      fn(encoded)
      best = min(best, time.perf_counter() - start)
    out[name] = 1e6 * best / batch
  return out


def measure_in_subprocess(kind: str, data_dir: str, repeats: int = 3,
                          timeout: float = 600):
  """measure() in a fresh Python process (peak RSS is per process), with a
  listing cache of its own (image_folder: the first build lists the
  folder, the later ones read the listing back; readers.folder_index)."""
  from trainer.data.readers import folder_index
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # A folder changed in the last seconds is not cached: let it settle.
  dirs = [d for top in data_dir.split(",")
          for d in [top] + [e.path for e in os.scandir(top) if e.is_dir()]]
  newest = max(os.stat(d).st_mtime for d in dirs)
  time.sleep(max(0.0, newest + folder_index.SETTLE_S + 0.1 - time.time()))
  with tempfile.TemporaryDirectory(prefix="data_scaling_cache_") as cache:
    env = dict(os.environ, PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL="2",
               XDG_CACHE_HOME=cache)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.data_scaling", "measure",
         f"--kind={kind}", f"--data_dir={data_dir}", f"--repeats={repeats}"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f"measure {kind} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def table(kinds, sizes) -> list[dict]:
  rows = []
  for kind in kinds:
    for n in sizes:
      tmp = tempfile.mkdtemp(prefix="data_scaling_")
      try:
        write(kind, n, tmp)
        rows.append(measure_in_subprocess(kind, tmp))
        print(json.dumps(rows[-1]), flush=True)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("command", choices=("write", "measure", "table",
                                          "decode"))
  parser.add_argument("--kind", choices=KINDS, default="array_record")
  parser.add_argument("--kinds", default="image_folder,array_record")
  parser.add_argument("--n", type=int, default=50000)
  parser.add_argument("--sizes", default="50000,200000,400000")
  parser.add_argument("--out", default="")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  if args.command == "write":
    write(args.kind, args.n, args.out)
  elif args.command == "decode":
    print(json.dumps({**decode_cost(), "machine": machine.info()}))
  elif args.command == "measure":
    print(json.dumps(measure(args.kind, args.data_dir, args.repeats)))
  else:
    rows = table(args.kinds.split(","), [int(x) for x in args.sizes.split(",")])
    print(machine.header(machine.info()))
    print("| reader | examples | start-up to first batch, cold (s) | warm (s) "
          "| peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['kind']} | {r['examples']} | {r['startup_s']:.2f} | "
            f"{r['warm_s']:.2f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
  main()
