"""Baseline workers, one per process: `python -m bench.workers KIND [flags]`.

  raw     the minimal hand-written loop: one tf.function with a tf.range
          inner loop over an in-memory tf.data pipeline, GradientTape,
          optimizer.apply_gradients. The practical speed limit of TF with
          Keras' optimizer; --fused_optimizer: with the framework's.
  keras   Keras Model.fit(steps_per_execution=N) on the same data.
  matmul  the machine's ceiling: GFLOP/s of a large square matmul.
  flops   forward FLOPs per example of a model (TF profiler + analytic).

Each prints one last line `BENCH_RESULT {json}` (see bench.common). Rates
are steps/sec of consecutive intervals of --interval steps; the orchestrator
drops the first WARMUP_INTERVALS (tracing, warm-up).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import common  # noqa: E402


def _threads(tf) -> dict:
  return {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
          "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
          "affinity": sorted(os.sched_getaffinity(0))}


def _data(args, tf, np):
  """In-memory random images (float32 in [0,1), already preprocessed: the
  cheapest possible input) and int32 labels, repeated and batched."""
  shape = common.SHAPES[args.model]
  rng = np.random.default_rng(0)
  images = rng.random((args.examples,) + shape, dtype=np.float32)
  labels = rng.integers(0, common.NUM_CLASSES, size=(args.examples,),
                        dtype=np.int32)
  ds = tf.data.Dataset.from_tensor_slices((images, labels))
  ds = ds.repeat().batch(args.batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def _model(args):
  import keras
  import layers
  if args.precision != "float32":
    keras.mixed_precision.set_global_policy(args.precision)
  keras.utils.set_random_seed(0)
  return layers.get(args.model)(common.SHAPES[args.model], common.NUM_CLASSES)


def _enough(rates, times, args) -> bool:
  steady_t = sum(times[common.WARMUP_INTERVALS:])
  return (len(rates) >= common.WARMUP_INTERVALS + args.min_intervals
          and steady_t >= args.min_seconds) or \
      len(rates) >= common.WARMUP_INTERVALS + args.max_intervals


def make_optimizer(args, model):
  """Keras' Adam, or with --fused_optimizer the framework's (TF's fused
  ResourceApplyAdam kernel): the raw loop with the same optimizer isolates
  the framework's own overhead."""
  import keras
  import tensorflow as tf
  if args.fused_optimizer:
    from trainer import optim
    from trainer.config import Config
    return optim.build(Config(optimizer="adam", learning_rate=1e-3),
                       tf.Variable(0, dtype=tf.int64),
                       model.trainable_variables)
  optimizer = keras.optimizers.Adam(learning_rate=1e-3)
  optimizer.build(model.trainable_variables)
  return optimizer


def make_step(model, optimizer):
  """The hand-written update: tape, mean loss, apply_gradients."""
  import keras
  import tensorflow as tf

  def step(x, y):
    with tf.GradientTape() as tape:
      logits = model(x, training=True)
      loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
          y, logits, from_logits=True))
      if model.losses:
        loss += tf.add_n([tf.cast(l, tf.float32) for l in model.losses])
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss
  return step


def make_loop(step, iterator):
  """One tf.function of `n` updates (a tensor) with a tf.range inner loop
  over `iterator`; returns the last loss."""
  import tensorflow as tf

  @tf.function
  def train_loop(n):
    loss = tf.constant(0.0)
    for _ in tf.range(n):
      x, y = next(iterator)
      loss = step(x, y)
    return loss
  return train_loop


def raw(args) -> dict:
  import numpy as np
  import tensorflow as tf
  model = _model(args)
  optimizer = make_optimizer(args, model)
  ds = _data(args, tf, np)
  step = make_step(model, optimizer)

  if args.jit_compile:
    step = tf.function(step, jit_compile=True)

  train_loop = make_loop(step, iter(ds))
  n = tf.constant(args.interval, tf.int32)
  rates, times = [], []
  while not _enough(rates, times, args):
    began = time.perf_counter()
    loss = float(train_loop(n))
    dt = time.perf_counter() - began
    rates.append(args.interval / dt)
    times.append(dt)
  return {"rates": rates, "loss": loss, "threads": _threads(tf)}


def keras_fit(args) -> dict:
  import keras
  import numpy as np
  import tensorflow as tf
  model = _model(args)
  model.compile(
      optimizer=keras.optimizers.Adam(learning_rate=1e-3),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["accuracy"], steps_per_execution=args.steps_per_execution,
      jit_compile=args.jit_compile)
  ds = _data(args, tf, np)
  rates, times = [], []

  class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.began = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      dt = time.perf_counter() - self.began
      rates.append(args.interval / dt)
      times.append(dt)
      if _enough(rates, times, args):
        self.model.stop_training = True

  model.fit(ds, epochs=10 ** 6, steps_per_epoch=args.interval, verbose=0,
            callbacks=[Timer()])
  return {"rates": rates, "threads": _threads(tf)}


def matmul(args) -> dict:
  import tensorflow as tf
  from trainer import flops as flops_lib   # one copy of the measurement
  gflops = flops_lib.matmul_gflops(args.size, args.dtype, args.matmul_reps,
                                   args.min_intervals)
  return {"gflops": gflops, "size": args.size, "dtype": args.dtype,
          "threads": _threads(tf)}


def flops(args) -> dict:
  """FLOP counts of each of --model=a,b and the library versions."""
  import platform
  import keras
  import tensorflow as tf
  from bench import flops as flops_lib
  return {"models": {m: flops_lib.count(m, args.batch)
                     for m in args.model.split(",")},
          "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                       "python": platform.python_version()},
          "threads": _threads(tf)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="bench.workers")
  p.add_argument("kind", choices=["raw", "keras", "matmul", "flops"])
  p.add_argument("--model", default="cnn")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--examples", type=int, default=4096)
  p.add_argument("--precision", default="float32")
  p.add_argument("--jit_compile", action="store_true")
  p.add_argument("--fused_optimizer", action="store_true",
                 help="raw: the framework's optimizer instead of Keras'")
  p.add_argument("--steps_per_execution", type=int, default=1)
  p.add_argument("--interval", type=int, default=50)
  p.add_argument("--min_seconds", type=float, default=5.0)
  p.add_argument("--min_intervals", type=int, default=5)
  p.add_argument("--max_intervals", type=int, default=200)
  p.add_argument("--size", type=int, default=4096)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--matmul_reps", type=int, default=4)
  args = p.parse_args(argv)
  fn = {"raw": raw, "keras": keras_fit, "matmul": matmul,
        "flops": flops}[args.kind]
  result = fn(args)
  common.emit(result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
