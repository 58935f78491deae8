"""`python -m bench.paired`: the framework's step against the raw loop in ONE
process, interleaved chunk by chunk.

  python -m bench.paired --model=cnn --batch=32 --rounds=60

On a noisy machine two runs of the same row in `bench.run` differ by up to
25%; the cost of the framework is a few per cent. Here every round runs one
chunk (--interval updates) of each contender back to back, so machine drift
hits all of them alike, and the figure is the median over rounds of the
per-round ratio raw time / contender time (with its quartiles).

Contenders, all on the same model, batch and Adam:
  raw          bench.workers' hand-written loop, Keras' Adam
  raw_fused    the same loop with the framework's optimizer (fused kernels)
  framework    trainer Steps.fast_loop: the chunk the trainer runs (per-chunk
               non-finite guard), on the framework's own input pipeline
  framework_guarded  Steps.train_loop: the per-update guard (tf.cond)
Summaries, checkpoints and the input-wait probe run between chunks in the
trainer and are not part of a chunk; bench.run's rows include them.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import common  # noqa: E402


def _raw(args, fused: bool):
  """bench.workers' raw loop, as a callable running one chunk."""
  import numpy as np
  import tensorflow as tf
  from bench import workers
  worker_args = argparse.Namespace(
      model=args.model, batch=args.batch, examples=4096, precision="float32",
      jit_compile=False, fused_optimizer=fused)
  model = workers._model(worker_args)  # noqa: SLF001
  optimizer = workers.make_optimizer(worker_args, model)
  step = workers.make_step(model, optimizer)
  return workers.make_loop(
      step, iter(workers._data(worker_args, tf, np)))  # noqa: SLF001


def _framework(args, guarded: bool, model_dir: str):
  import tensorflow as tf
  from trainer import loop
  from trainer.config import Config
  shape = ",".join(str(d) for d in common.SHAPES[args.model])
  config = Config(model=args.model, dataset="synthetic",
                  synthetic_shape=shape, global_batch_size=args.batch,
                  optimizer="adam", model_dir=model_dir)
  runner = loop.Runner(config)
  iterator = runner._train_iterator()  # noqa: SLF001
  steps = runner.steps
  fn = steps.train_loop if guarded else steps.fast_loop
  return lambda n: fn(iterator, tf.cast(n, tf.int64))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="bench.paired")
  p.add_argument("--model", default="cnn", choices=sorted(common.SHAPES))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--interval", type=int, default=50)
  p.add_argument("--rounds", type=int, default=60)
  args = p.parse_args(argv)
  from absl import logging
  # Quiet while the runners are built; restored after (tests call main()).
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    # Nothing is written there (no training outputs); removed even so.
    with tempfile.TemporaryDirectory(prefix="bench_paired_") as tmp:
      return _measure(args, tmp)
  finally:
    logging.set_verbosity(previous)


def _measure(args, tmp: str) -> int:
  import tensorflow as tf
  contenders = {
      "raw": _raw(args, fused=False),
      "raw_fused": _raw(args, fused=True),
      "framework": _framework(args, False, os.path.join(tmp, "fast")),
      "framework_guarded": _framework(args, True,
                                      os.path.join(tmp, "guarded")),
  }
  n = tf.constant(args.interval)
  for run in contenders.values():   # trace and warm up
    run(n)
    run(n)
  times = {name: [] for name in contenders}
  for _ in range(args.rounds):
    for name, run in contenders.items():
      began = time.perf_counter()
      run(n)   # an eager call of a tf.function returns when it has run
      times[name].append(time.perf_counter() - began)
  print(f"{args.model} batch {args.batch}: {args.rounds} rounds of "
        f"{args.interval} updates each; x raw = median over rounds of "
        "raw time / contender time [quartiles]")
  for name, ts in times.items():
    ratios = [r / t for r, t in zip(times["raw"], ts)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"  {name:18s} {1000 * statistics.median(ts) / args.interval:6.3f} "
          f"ms/update  x raw {statistics.median(ratios):.3f} "
          f"[{q1:.3f}, {q3:.3f}]")
  return 0


if __name__ == "__main__":
  sys.exit(main())
