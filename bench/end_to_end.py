"""`bench.paired --end_to_end`: the trainer's WHOLE loop between two
summaries against a hand-written loop on the same data, interleaved.

What users run is not the chunk alone: around it the Controller runs the
input pipeline (index shuffle, gather, uint8 cast, meta), the input-wait
probe (its own trace for the last --input_wait_steps updates of each
interval), the progress display, the non-finite check and the summary
write. Here the real `Controller.train` runs (CLI defaults: steps_per_loop
50, input_wait_steps 10, progress auto, summaries every --interval updates)
and, at each summary, the other contenders run --interval updates each;
then the trainer continues. One round = one summary interval of each:

  raw_data         a minimal hand-written loop on the SAME examples in memory
                   (the split's images cast to float32 / 255 once, labels),
                   tf.data shuffle(1024) / repeat / batch / prefetch, one
                   tf.function with a tf.range loop, GradientTape, Keras
                   Adam; the loss read once per interval (x raw = 1)
  framework        Steps.unguarded_chunk on the trainer's input pipeline
                   (what `bench.paired` times), same data
  framework_cached the same chunk on the pipeline's first 32 batches cached
                   (the per-batch pipeline work gone, IteratorGetNext kept):
                   framework_cached - framework is what the pipeline costs
                   the step when it shares the cores
  end_to_end       the trainer's loop from the end of one summary write to
                   the end of the next: chunks, probe, progress, checks and
                   the summary; below it, the share of that time spent
                   inside executor.run (the chunks) and outside (host work)

Data: --data=mnist reads ../shared/data/mnist (its only split, "test",
10,000 real digits); --data=auto (default) uses it when present, else
synthetic 28x28x1 uint8 images (10,000). Checkpoints and evaluation are not
in the rounds (one checkpoint at the very end, untimed): eval_every=0 and
checkpoint_every=train_steps.

Each timed interval, the trainer's included, is preceded by a pause of
--settle seconds (default 0.5 here): every pipeline still alive (the
trainer's, each contender's) refills its prefetch buffer while nothing is
timed, and each interval starts with its own buffer full. Without it, the
buffer the trainer had drawn on at its summary refilled inside raw_data's
timed interval (the trainer flattered, the raw loop slowed on two cores).
The table gives the process CPU in the pause after each contender.
"""

import argparse
import os
import time

from bench import framework

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_DIR = os.path.normpath(os.path.join(REPO, "..", "shared", "data",
                                          "mnist"))


def find_mnist() -> str:
  """../shared/data/mnist next to the repository, or one level up (a git
  worktree in a folder of worktrees); the first if neither has it."""
  for up in ("..", os.path.join("..", "..")):
    path = os.path.normpath(os.path.join(REPO, up, "shared", "data", "mnist"))
    if os.path.isdir(path):
      return path
  return MNIST_DIR


WARMUP_INTERVALS = 2   # tracing of the chunk and of the probe's trace
CACHED_BATCHES = 32


def data_settings(choice: str, mnist_dir: str | None = None) -> dict:
  """Config fields of the data both sides read, and a label for it."""
  mnist_dir = mnist_dir or find_mnist()
  have_mnist = os.path.isfile(os.path.join(mnist_dir,
                                           "t10k-images-idx3-ubyte.gz"))
  if choice == "mnist" and not have_mnist:
    raise SystemExit(f"bench.paired --data=mnist: no MNIST files in "
                     f"{mnist_dir}; use --data=synthetic.")
  if choice in ("mnist", "auto") and have_mnist:
    return {"fields": dict(dataset="mnist", data_dir=mnist_dir,
                           train_split="test", eval_split="test"),
            "label": f"mnist test split ({mnist_dir})"}
  return {"fields": dict(dataset="synthetic", synthetic_shape="28,28,1",
                         synthetic_examples=10000),
          "label": "synthetic 28x28x1 uint8 (10,000)"}


def _config(args, model_dir: str, train_steps: int):
  from trainer.config import Config
  return Config(model=args.model, global_batch_size=args.batch,
                optimizer="adam", model_dir=model_dir,
                summary_every=args.interval, eval_every=0,
                train_steps=train_steps, checkpoint_every=train_steps,
                **data_settings(args.data)["fields"])


def in_memory(source):
  """Every example of `source` as the model sees it: float32 images in
  [0, 1] (the built-in task's preprocessing, done once) and int32 labels."""
  import numpy as np
  import tensorflow as tf
  images, labels = source.gather(tf.range(source.num_examples,
                                          dtype=tf.int64))
  images = images.numpy().astype(np.float32) * np.float32(1.0 / 255.0)
  return images, labels.numpy().astype(np.int32)


def raw_loop(source, model_name: str, batch: int):
  """The hand-written loop on `source`'s examples in memory: a callable
  running n updates and reading the loss, as a user's loop logs it."""
  import keras
  import tensorflow as tf
  import layers
  from bench import workers
  images, labels = in_memory(source)
  keras.utils.set_random_seed(0)
  model = layers.get(model_name)(images.shape[1:], source.num_classes)
  optimizer = keras.optimizers.Adam(learning_rate=1e-3)
  optimizer.build(model.trainable_variables)
  ds = tf.data.Dataset.from_tensor_slices((images, labels))
  ds = ds.shuffle(1024, seed=0).repeat().batch(batch, drop_remainder=True)
  loop = workers.make_loop(workers.make_step(model, optimizer),
                           iter(ds.prefetch(tf.data.AUTOTUNE)))
  return lambda n: float(loop(n))


def _cached_chunk(runner):
  """The trainer's chunk on its pipeline's first batches, cached."""
  import tensorflow as tf
  from trainer.data import pipeline
  parts = runner.parts
  config = parts.config
  ds = pipeline.train_dataset(parts.task, config.train_split,
                              config.micro_batch_size, config.seed, 0)
  ds = ds.take(CACHED_BATCHES).cache().repeat().prefetch(tf.data.AUTOTUNE)
  iterator = iter(parts.strategy.experimental_distribute_dataset(ds))
  return lambda n: runner.steps.unguarded_chunk(iterator,
                                                tf.cast(n, tf.int64))


def _timed_controller(config, on_summary):
  """The trainer's own Controller with one more action: after each train
  summary it calls `on_summary(chunk seconds of the interval)`."""
  from trainer import controller

  holder = []

  def timed(tick):
    if tick.summarized:
      on_summary(holder[0].summaries.last_seconds)

  holder.append(controller.create(config, actions=[timed]))
  return holder[0]


def measure(args, tmp: str) -> tuple[dict, dict]:
  """Per-round seconds of each contender ({name: [s, ...]}) and details:
  the data label and the end_to_end seconds spent inside chunks."""
  import tensorflow as tf
  rounds, interval = args.rounds, args.interval
  train_steps = (rounds + WARMUP_INTERVALS + 1) * interval
  # on_summary (below) is looked up when the trainer first calls it.
  paired_runner = _timed_controller(
      _config(args, os.path.join(tmp, "e2e"), train_steps),
      lambda chunk_s: on_summary(chunk_s))
  chunk_runner = _timed_controller(
      _config(args, os.path.join(tmp, "chunk"), train_steps), lambda s: None)
  source = paired_runner.task.source(paired_runner.parts.config.train_split)
  others = {
      "raw_data": raw_loop(source, args.model, args.batch),
      "framework": framework.chunk(chunk_runner),
      "framework_cached": _cached_chunk(chunk_runner),
  }
  n = tf.constant(interval)
  for run in others.values():   # trace and warm up
    run(n)
    run(n)
  times = {name: [] for name in (*others, "end_to_end")}
  # Process CPU in the settle after each contender's interval: its
  # pipeline refilling the prefetch buffer it drew on, which without the
  # settle runs inside the NEXT contender's timed interval.
  after = {name: [] for name in times}
  inside = []
  clock = {"summaries": 0, "last": None}

  def settle(previous: str) -> None:
    if args.settle > 0:
      cpu = time.process_time()
      time.sleep(args.settle)
      after[previous].append(time.process_time() - cpu)

  def on_summary(chunk_s):
    now = time.perf_counter()
    clock["summaries"] += 1
    k = clock["summaries"]
    if k > WARMUP_INTERVALS + 1:   # interval k was preceded by the others
      times["end_to_end"].append(now - clock["last"])
      inside.append(chunk_s)
    if k >= WARMUP_INTERVALS + 1:
      settle("end_to_end")
    if WARMUP_INTERVALS + 1 <= k <= WARMUP_INTERVALS + rounds:
      for name, run in others.items():
        began = time.perf_counter()
        run(n)
        times[name].append(time.perf_counter() - began)
        settle(name)
    clock["last"] = time.perf_counter()

  paired_runner.train(evaluate=False)
  if len(times["end_to_end"]) != rounds:
    raise RuntimeError(f"bench.paired --end_to_end: {len(times['end_to_end'])}"
                       f" trainer intervals timed, expected {rounds} (a "
                       "summary interval did not end where expected).")
  return times, {"data": data_settings(args.data)["label"],
                 "inside_chunks": inside,
                 "after": after if args.settle > 0 else None,
                 "global_step": paired_runner.global_step}


def add_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--end_to_end", action="store_true",
                 help="the trainer's whole loop between two summaries vs a "
                      "hand-written loop on the same data (bench.end_to_end)")
  p.add_argument("--data", default="auto", choices=("auto", "mnist",
                                                    "synthetic"),
                 help="--end_to_end only: the examples both sides read")

