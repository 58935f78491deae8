"""`python -m bench.trace`: where an update's time goes, from a TensorFlow
profiler trace, for the hand-written loop and for the trainer's chunk.

  python -m bench.trace --model=cnn --batch=32 --updates=100
  python -m bench.trace --gan --batch=64 --updates=100   # the GAN row
  python -m bench.trace --xplane=MODEL_DIR/train/plugins/profile/RUN/HOST.xplane.pb \
      --updates=100          # a trace the trainer wrote with --profile_steps

Both loops are built as in `bench.paired --end_to_end` (same examples in
memory, same model, batch and Adam), warmed up, then traced in turn for
--updates updates each (tf.profiler.experimental). Per update:

  wall                the traced call on the main thread
  forward, backward   op time of the model's forward pass and of the
                      gradient (ops under `gradient_tape`), all inter-op
                      threads summed (two ops at once count twice)
  optimizer           the update of the weights (Adam's ops, fused or not,
                      and the variable assignments of the step)
  other ops           everything else in the step's graph (loss, metric
                      sums, gradient norm, loop control, casts)
  executor overhead   TF's executor scheduling the graph's ops (self time
                      of ExecutorState::Process and friends)
  iterator get-next   the step's IteratorGetNext, as its tf.data thread
                      shows it (the dequeue; waiting for a batch included)
  input pipeline CPU  busy time of tf.data's threads (the gather, shuffle,
                      cast, meta map and the position stream), which run on
                      the same cores as the step

Op times are self times (an op event minus the events inside it). Host work
between chunks (summaries, the probe's bookkeeping, progress) is not in a
chunk's trace: `bench.paired --end_to_end` measures it.
"""

import argparse
import collections
import glob
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import machine  # noqa: E402

# Lower case: Keras names its optimizer's ops `adam/...`, TF's fused kernels
# are `ResourceApplyAdam`.
_OPTIMIZER_MARKS = ("adam", "sgd", "momentum", "resourceapply",
                    "assignvariableop", "assignaddvariableop",
                    "assignsubvariableop", "/update")
_CATEGORIES = ("forward", "backward", "optimizer", "other ops",
               "executor overhead", "iterator get-next")


def category(name: str) -> str | None:
  """Op event `graph/name:OpType` -> its category; None if not an op."""
  if name.startswith("ExecutorState::"):
    return "executor overhead"
  if ":" not in name or name.startswith(("EagerLocalExecute", "Iterator::")):
    return None
  op_name, _, op_type = name.rpartition(":")
  if "IteratorGetNext" in op_type:
    return "iterator get-next"
  if "gradient_tape" in op_name:
    return "backward"
  if any(mark in name.lower() for mark in _OPTIMIZER_MARKS):
    return "optimizer"
  if any(t in op_type for t in ("Conv2D", "MatMul", "Relu", "MaxPool",
                                "BiasAdd", "FusedBatchNorm", "AvgPool",
                                "Mean")) and "loss" not in op_name:
    return "forward"
  return "other ops"


def self_times(events):
  """[(name, start_ps, duration_ps)] of ONE thread -> [(name, self_ps)]:
  each event's duration minus that of the events directly inside it."""
  events = sorted(events, key=lambda e: (e[1], -e[2]))
  out, stack = [], []   # stack: [name, end, duration, children]

  def close(item):
    out.append((item[0], max(item[2] - item[3], 0)))

  for name, start, duration in events:
    while stack and start >= stack[-1][1]:
      close(stack.pop())
    if stack:
      stack[-1][3] += duration
    stack.append([name, start + duration, duration, 0])
  while stack:
    close(stack.pop())
  return out


def busy_ps(events) -> int:
  """Union of the events' intervals on one thread (time it was busy)."""
  total, end = 0, None
  for _, start, duration in sorted(events, key=lambda e: e[1]):
    stop = start + duration
    if end is None or start >= end:
      total += duration
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def breakdown(threads: dict, main_call_ps: int, updates: int) -> dict:
  """{thread name: [(name, start_ps, duration_ps)]} of a trace ->
  milliseconds per update by category."""
  per = collections.Counter()
  for thread, events in threads.items():
    if thread.startswith("tf_data_iterator_get_next"):
      per["iterator get-next"] += busy_ps(events)
      continue
    if thread.startswith("tf_data"):
      per["input pipeline CPU"] += busy_ps(events)
      continue
    for name, self_ps in self_times(events):
      kind = category(name)
      if kind:
        per[kind] += self_ps
  result = {"wall": main_call_ps / 1e9 / updates}
  for kind in (*_CATEGORIES, "input pipeline CPU"):
    result[kind] = per[kind] / 1e9 / updates
  return result


def read_xplane(path: str) -> tuple[dict, int]:
  """A .xplane.pb -> (host threads' events, ps of the traced calls on the
  main thread: the chunk's or the loop's tf.function call)."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  plane = next(p for p in space.planes if p.name == "/host:CPU")
  names = {k: v.name for k, v in plane.event_metadata.items()}
  threads, main_ps = {}, 0
  for line in plane.lines:
    events = [(names[e.metadata_id], e.offset_ps, e.duration_ps)
              for e in line.events]
    if line.name.startswith(("tf_Compute", "tf_data", "tf_inter")):
      threads[line.name] = events
    else:   # the Python thread: the tf.function calls themselves
      main_ps += sum(d for n, _, d in events
                     if n.startswith("EagerLocalExecute: __inference"))
  return threads, main_ps


def _trace(run, n, updates: int, logdir: str) -> tuple[dict, int]:
  import tensorflow as tf
  tf.profiler.experimental.start(logdir)
  try:
    run(n)
  finally:
    tf.profiler.experimental.stop()
  (path,) = glob.glob(os.path.join(logdir, "plugins", "profile", "*",
                                   "*.xplane.pb"))
  return read_xplane(path)


def _contenders(args, tmp: str) -> dict:
  from bench import end_to_end, framework
  if args.gan:
    from bench import gan
    return {"gan_raw": gan.raw_loop(args.batch),
            "gan_framework": framework.chunk(
                framework.gan_runner(args.batch, os.path.join(tmp, "gan")))}
  ns = argparse.Namespace(model=args.model, batch=args.batch,
                          interval=args.updates, data=args.data)
  runner = end_to_end._timed_controller(  # noqa: SLF001
      end_to_end._config(ns, os.path.join(tmp, "fw"), 10 ** 6),  # noqa: SLF001
      lambda s: None)
  source = runner.task.source(runner.parts.config.train_split)
  return {"raw_data": end_to_end.raw_loop(source, args.model, args.batch),
          "framework": framework.chunk(runner)}


def _print(results: dict, updates: int) -> None:
  names = list(results)
  print(f"ms per update over {updates} traced updates:")
  print(f"  {'':20s}" + "".join(f"{n:>12s}" for n in names))
  for kind in ("wall", *_CATEGORIES, "input pipeline CPU"):
    print(f"  {kind:20s}" + "".join(f"{results[n][kind]:12.3f}"
                                    for n in names))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="bench.trace", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="cnn")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--updates", type=int, default=100)
  p.add_argument("--data", default="auto", choices=("auto", "mnist",
                                                    "synthetic"))
  p.add_argument("--gan", action="store_true",
                 help="the GAN row's two loops (bench.paired --gan) instead "
                      "of the cnn's; --model and --data are then ignored")
  p.add_argument("--xplane", default="",
                 help="analyse this trace instead of tracing the two loops")
  args = p.parse_args(argv)
  print(machine.header(machine.info()))
  if args.xplane:
    threads, main_ps = read_xplane(args.xplane)
    _print({"trace": breakdown(threads, main_ps, args.updates)},
           args.updates)
    return 0
  from absl import logging
  # Quiet while tracing; restored after (tests call main() in-process, and
  # a verbosity left at ERROR hides the log records later tests read).
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    results = _measure(args)
  finally:
    logging.set_verbosity(previous)
  _print(results, args.updates)
  return 0


def _measure(args) -> dict:
  import tensorflow as tf
  with tempfile.TemporaryDirectory(prefix="bench_trace_") as tmp:
    contenders = _contenders(args, tmp)
    n = tf.constant(args.updates)
    for run in contenders.values():   # trace (tf.function) and warm up
      run(n)
      run(n)
    results = {}
    for name, run in contenders.items():
      threads, main_ps = _trace(run, n, args.updates,
                                os.path.join(tmp, "trace_" + name))
      results[name] = breakdown(threads, main_ps, args.updates)
  return results


if __name__ == "__main__":
  sys.exit(main())
