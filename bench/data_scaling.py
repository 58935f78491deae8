"""Start-up time and peak memory of the data pipeline against the number of
examples: the lazy readers must stay flat in N.

  python -m bench.data_scaling write --kind=array_record --n=50000 --out=DIR
  python -m bench.data_scaling measure --kind=array_record --data_dir=DIR
  python -m bench.data_scaling table --sizes=50000,200000,400000 [--kinds=...]
  python -m bench.data_scaling compare --kind=array_record --sizes=4000,32000
  python -m bench.data_scaling count --kind=array_record --data_dir=DIR,DIR
  python -m bench.data_scaling decode     # microseconds per image

`write` makes N small JPEG examples (one 32x32 photo crop, the label varies)
as an image folder or as ArrayRecord shards. `measure` runs in its own
process: it imports TensorFlow first (not timed), then times building the
Source and the training pipeline and pulling the first batch, and prints one
JSON line with that time and the process's peak RSS. `table` writes each
size once into a temporary directory and measures it in a fresh process.
`compare` times two sizes against each other in one process (alternating,
so that a busy host's slow spells fall on both) and reports the per-round
ratio with its quartiles: how noisy the figure is, not a pass or a fail.

`count` (what tests/e2e/test_data_scaling.py asserts) times nothing: it
counts what building each directory's Source does, the work that could
grow with N: folder listings, data files opened, records or image files
read, bytes and read calls of the process (/proc/self/io), and the bytes
still allocated afterwards (tracemalloc: what the Source and the readers'
caches hold). Counts do not depend on how busy the machine is.
"""

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc

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


def _clear_reader_caches() -> None:
  """The readers' in-process caches (the on-disk folder listing stays)."""
  from trainer.data.readers import array_record, image_folder, tfrecord
  for cached in (array_record._open_file, image_folder._lazy,  # noqa: SLF001
                 image_folder._scan, tfrecord._load_split):  # noqa: SLF001
    cached.cache_clear()


def _replace(module, name: str, new, saved: list) -> None:
  """module.name = new, the old value kept in `saved` to put back. A name
  the module no longer has is an error: a counter that wraps nothing
  would count 0 and let a check pass without looking."""
  if not hasattr(module, name):
    raise AttributeError(f"{module.__name__}.{name} is gone: update "
                         "bench.data_scaling's counters")
  saved.append((module, name, getattr(module, name)))
  setattr(module, name, new)


class _CountingReader:
  """An ArrayRecordReader that adds the records each read returns."""

  def __init__(self, reader, add):
    self._reader, self._add = reader, add

  def __getattr__(self, name):
    found = getattr(self._reader, name)
    if not name.startswith("read"):
      return found

    def counted(*args, **kwargs):
      records = found(*args, **kwargs)
      self._add("records_read", len(records))
      return records
    return counted


COUNTS = ("listings", "files_opened", "records_read")


@contextlib.contextmanager
def counting_readers():
  """Counts what the lazy readers do, through their own entry points:
  folder listings (image_folder), ArrayRecord files opened (each open
  reads the file's index) and records read, image files read or decoded.
  Yields a one-item list holding the dict that is being added to: put a
  fresh one there (new_counts()) to count one build alone."""
  from array_record.python import array_record_module
  from trainer.data.readers import image_folder, images
  box = [new_counts()]

  def add(name: str, n: int = 1) -> None:
    box[0][name] += n

  saved = []
  list_folder = image_folder._listing  # noqa: SLF001
  open_reader = array_record_module.ArrayRecordReader
  read_files, probe_shapes = image_folder.read_files, images.probe_shapes

  def listing(root):
    add("listings")
    return list_folder(root)

  def opened(*args, **kwargs):
    add("files_opened")
    return _CountingReader(open_reader(*args, **kwargs), add)

  def read(paths):
    paths = list(paths)
    add("records_read", len(paths))
    return read_files(paths)

  def probe(items, from_paths):
    add("records_read", len(items))
    return probe_shapes(items, from_paths)

  try:
    _replace(image_folder, "_listing", listing, saved)
    _replace(array_record_module, "ArrayRecordReader", opened, saved)
    _replace(image_folder, "read_files", read, saved)
    _replace(images, "probe_shapes", probe, saved)
    yield box
  finally:   # the readers' own again: a second call would wrap the wrapper
    for module, name, value in reversed(saved):
      setattr(module, name, value)


def new_counts() -> dict:
  return {name: 0 for name in COUNTS}


def _process_io() -> dict | None:
  """Bytes and read calls of this process so far (Linux), else None."""
  try:
    with open("/proc/self/io", encoding="ascii") as f:
      fields = dict(line.split(":") for line in f.read().splitlines())
  except OSError:
    return None
  return {"bytes_read": int(fields["rchar"]),
          "read_calls": int(fields["syscr"])}


def _task(kind: str, data_dir: str):
  from trainer.config import Config
  from trainer.task import ClassificationTask
  import layers
  lazy = kind in ("image_folder", "array_record")
  config = Config(dataset=kind.replace("_eager", ""), data_dir=data_dir,
                  image_size="32" if lazy else "", global_batch_size=64)
  return ClassificationTask(config, layers.get("cnn"))


def count(kind: str, data_dir: str, builds: int = 2) -> list[dict]:
  """What building each directory's training Source does, counted.

  `data_dir`: one directory or several (comma-separated), built in turn,
  `builds` rounds, each with the readers' in-process caches cleared (the
  on-disk folder listing kept: the first build lists a folder, the later
  ones read the listing back). Per build: COUNTS, plus bytes_read and
  read_calls of the whole process while it built (None off Linux) and
  held_bytes and held_blocks, what the build left allocated and in how
  many allocations (Python objects and NumPy arrays: the Source's arrays
  and the readers' caches; tracemalloc; an object per example is a block
  per example, an array of N keys one block). Only the Source is built:
  the pipeline reads batches on demand, and how many it has in flight by
  the first batch depends on thread scheduling."""
  import tensorflow as tf  # noqa: F401 - its import reads files: not counted
  dirs = data_dir.split(",")
  rows = {d: {"kind": kind, "data_bytes": _tree_bytes(d), "builds": []}
          for d in dirs}
  with counting_readers() as box:
    for _ in range(builds):
      for d in dirs:
        _clear_reader_caches()
        task = _task(kind, d)
        gc.collect()
        box[0] = new_counts()
        tracemalloc.start()
        held_before = tracemalloc.get_traced_memory()[0]
        io_before = _process_io()
        source = task.source("train")
        io_after = _process_io()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - held_before
        blocks = sum(stat.count for stat in
                     tracemalloc.take_snapshot().statistics("filename"))
        tracemalloc.stop()
        build = dict(box[0], held_bytes=held, held_blocks=blocks)
        for key in ("bytes_read", "read_calls"):
          build[key] = (io_after[key] - io_before[key]
                        if io_before and io_after else None)
        rows[d]["examples"] = source.num_examples
        rows[d]["builds"].append(build)
        del source, task
  return [rows[d] for d in dirs]


def _tree_bytes(top: str) -> int:
  return sum(os.path.getsize(os.path.join(parent, name))
             for parent, _, names in os.walk(top) for name in names)


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
  from trainer.data import pipeline
  dirs = data_dir.split(",")
  times = {d: [] for d in dirs}
  examples = {}
  # How many builds listed each image folder (file by file): with the
  # listing cache, only the first.
  listings = {d: 0 for d in dirs}
  with counting_readers() as box:
    for _ in range(repeats):
      for d in dirs:
        _clear_reader_caches()
        task = _task(kind, d)   # its sources are built on first use
        box[0] = new_counts()
        start = time.perf_counter()
        ds = pipeline.train_dataset(task, "train", 64, seed=0, start_position=0)
        batch = next(iter(ds))
        times[d].append(time.perf_counter() - start)
        listings[d] += box[0]["listings"]
        examples[d] = task.source("train").num_examples
        assert batch[0].shape[0] == 64
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
  return _in_subprocess("measure", kind, data_dir, f"--repeats={repeats}",
                        timeout=timeout)


def count_in_subprocess(kind: str, data_dir: str, builds: int = 2,
                        timeout: float = 600) -> list[dict]:
  """count() in a fresh Python process, with a listing cache of its own."""
  return _in_subprocess("count", kind, data_dir, f"--repeats={builds}",
                        timeout=timeout)


def _in_subprocess(command: str, kind: str, data_dir: str, *flags,
                   timeout: float):
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
        [sys.executable, "-m", "bench.data_scaling", command,
         f"--kind={kind}", f"--data_dir={data_dir}", *flags],
        cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f"{command} {kind} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(kind: str, sizes, repeats: int = 7) -> dict:
  """Two sizes (or more) of `kind`: peak RSS each in its own process, and
  start-up times from one process that builds them in alternation. The
  ratio of each size's time to the first's, per round (the cold first
  round left out), as median and quartiles: a busy host's slow spell falls
  on both builds of a round, and the spread says how much noise is left."""
  tmp = tempfile.mkdtemp(prefix="data_scaling_")
  try:
    dirs = [os.path.join(tmp, str(n)) for n in sizes]
    rss = []
    for n, d in zip(sizes, dirs):
      write(kind, n, d)
      rss.append(measure_in_subprocess(kind, d, repeats=1)["peak_rss_mb"])
    rows = measure_in_subprocess(kind, ",".join(dirs), repeats=repeats)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  first = rows[0]["times"][1:]
  out = {"kind": kind, "sizes": list(sizes), "rows": []}
  for row, peak in zip(rows, rss):
    ratios = [b / a for a, b in zip(first, row["times"][1:])]
    q1, median, q3 = (statistics.quantiles(ratios, n=4) if len(ratios) > 1
                      else [ratios[0]] * 3)
    out["rows"].append({"examples": row["examples"], "warm_s": row["warm_s"],
                        "time_ratio": [q1, median, q3],
                        "peak_rss_mb": peak,
                        "rss_ratio": peak / rss[0]})
  return out


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
                                          "compare", "count", "decode"))
  parser.add_argument("--kind", choices=KINDS, default="array_record")
  parser.add_argument("--kinds", default="image_folder,array_record")
  parser.add_argument("--n", type=int, default=50000)
  parser.add_argument("--sizes", default=None,
                      help="sizes to write (table: 50000,200000,400000; "
                           "compare: 4000,32000)")
  parser.add_argument("--out", default="")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--repeats", type=int, default=None,
                      help="rounds of builds (measure: 3, count: 2, "
                           "compare: 7)")
  args = parser.parse_args(argv)
  if args.command == "write":
    write(args.kind, args.n, args.out)
  elif args.command == "decode":
    print(json.dumps({**decode_cost(), "machine": machine.info()}))
  elif args.command == "measure":
    print(json.dumps(measure(args.kind, args.data_dir, args.repeats or 3)))
  elif args.command == "count":
    print(json.dumps(count(args.kind, args.data_dir, args.repeats or 2)))
  elif args.command == "compare":
    sizes = [int(x) for x in (args.sizes or "4000,32000").split(",")]
    result = compare(args.kind, sizes, args.repeats or 7)
    print(machine.header(machine.info()))
    print(f"| {args.kind} examples | warm start-up (s) | time / first size "
          "[quartiles over rounds] | peak RSS (MB) | RSS / first size |")
    print("|---|---|---|---|---|")
    for r in result["rows"]:
      q1, median, q3 = r["time_ratio"]
      print(f"| {r['examples']} | {r['warm_s']:.3f} | {median:.3f} "
            f"[{q1:.3f}, {q3:.3f}] | {r['peak_rss_mb']:.0f} | "
            f"{r['rss_ratio']:.3f} |")
  else:
    rows = table(args.kinds.split(","), [
        int(x) for x in (args.sizes or "50000,200000,400000").split(",")])
    print(machine.header(machine.info()))
    print("| reader | examples | start-up to first batch, cold (s) | warm (s) "
          "| peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['kind']} | {r['examples']} | {r['startup_s']:.2f} | "
            f"{r['warm_s']:.2f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
  main()
