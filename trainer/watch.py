"""Instruments of the loop that cost nothing between their steps: the input
wait probe, the profiler window and weight/gradient histograms.

Each one may shorten a chunk so that its window starts and ends on a chunk
boundary. Chunk boundaries are a pure function of the step and the config,
so every worker cuts its chunks identically (the loop runs a collective
between chunks); only the chief writes anything.
"""

import os

from absl import logging
import tensorflow as tf

from trainer.data import pipeline
from trainer.reduce import reduce_per_replica
from trainer.step import sparse


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every


class InputWaitProbe:
  """`input_wait_share`: the share of step time spent blocked on input.

  Prefetching hides the input pipeline's cost as long as it keeps ahead of
  the steps; what matters is whether a step ever waits for its batch. So the
  probe measures exactly that, inside the graph: the last N updates before
  each summary run through a second trace of the same train loop whose
  iterator is wrapped to read tf.timestamp() just before and just after each
  `next(iterator)` (the step's IteratorGetNext), summing the blocked time.
    share = time blocked in next() / time between the first and last next()
  over those updates (the span covers complete fetch+compute cycles; host
  work between chunks and tracing are outside it). All other updates run the
  plain trace: zero per-step overhead. The last N updates of an interval are
  used because the pause at a summary (eval, checkpoint) lets the prefetch
  buffer fill, which would hide a slow pipeline from the first updates after
  it. The value is the chief's own; other workers are not reduced in.

  What it counts: the whole IteratorGetNext on the step's critical path,
  i.e. waiting for the producer plus the dequeue itself. On this 2-core CPU
  the dequeue alone is ~0.15 ms per batch on one device and ~0.4 ms with 2
  logical CPU replicas (the split across replicas), so a step of a few ms
  shows a floor of some per cent even with an instant pipeline; a pipeline
  that cannot keep up shows as a share near 1 - compute/step time. A
  pipeline competing for the same cores also slows the compute; that
  slowdown is not input wait and is not counted. The timed updates fetch
  each batch when they start; with one local replica the untimed chunks
  fetch the next batch while an update runs (trainer.step.steps), so for
  them the share is an upper bound.
  """

  def __init__(self, num_updates: int, summary_every: int, train_steps: int):
    self.num_updates = num_updates
    self.summary_every = summary_every
    self.train_steps = train_steps
    self._wrapped = None
    self._wait = self._span = 0.0
    if num_updates > 0:
      self._vars = {name: tf.Variable(value, dtype=tf.float64,
                                      trainable=False, name=f"wait_{name}")
                    for name, value in (("wait", 0.0), ("last_wait", 0.0),
                                        ("first_t0", -1.0), ("last_t0", -1.0))}

  def plan(self, step: int, todo: int) -> tuple[int, bool]:
    """(updates in the next chunk, whether they are timed)."""
    if self.num_updates <= 0:
      return todo, False
    boundary = min(_next_multiple(step, self.summary_every), self.train_steps)
    start = boundary - self.num_updates
    if step < start:
      return min(todo, start - step), False
    return todo, True

  def wrap(self, iterator):
    """The timed view of `iterator` (cached: a new one retraces)."""
    if self._wrapped is None or self._wrapped.iterator is not iterator:
      self._wrapped = _TimedIterator(iterator, self._vars)
    return self._wrapped

  def after_chunk(self) -> None:
    """Folds one timed chunk into the interval's totals."""
    v = {k: float(var.numpy()) for k, var in self._vars.items()}
    span = v["last_t0"] - v["first_t0"]
    if v["first_t0"] >= 0 and span > 0:
      self._span += span
      self._wait += v["wait"] - v["last_wait"]
    for name, var in self._vars.items():
      var.assign(-1.0 if name.endswith("t0") else 0.0)

  def read_and_reset(self) -> float | None:
    """The share over the timed updates since the last call (None: none)."""
    if self._span <= 0:
      return None
    share = min(max(self._wait / self._span, 0.0), 1.0)
    self._wait = self._span = 0.0
    return share


class _TimedIterator:
  """Wraps a (distributed) iterator; `next` in a tf.function is timed."""

  # The untimed chunks fetch each batch while the update before it runs;
  # timing such a fetch would count overlapped time as waiting. The timed
  # chunks fetch each batch when its update starts (the probe's doc).
  fetch_ahead = False

  def __init__(self, iterator, variables):
    self.iterator = iterator
    self._v = variables

  def __iter__(self):
    return self

  def __next__(self):
    v = self._v
    t0 = tf.timestamp()
    with tf.control_dependencies([t0]):
      batch = next(self.iterator)
    flat = [t for t in tf.nest.flatten(batch, expand_composites=True)
            if isinstance(t, tf.Tensor)]
    with tf.control_dependencies(flat):
      t1 = tf.timestamp()
    waited = t1 - t0
    v["wait"].assign_add(waited)
    v["last_wait"].assign(waited)
    v["first_t0"].assign(tf.where(v["first_t0"] < 0, t0, v["first_t0"]))
    v["last_t0"].assign(t0)
    return batch


class Profiler:
  """--profile_steps=A,B: a trace of updates A..B in MODEL_DIR/train."""

  def __init__(self, profile_range, logdir: str, is_chief: bool):
    self.range = profile_range
    self.logdir = logdir
    self.is_chief = is_chief
    self.active = False
    self._done = profile_range is None

  def limit(self, step: int, todo: int) -> int:
    """Ends chunks at A-1 (the trace starts before update A) and at B."""
    if self.range is None:
      return todo
    for boundary in (self.range[0] - 1, self.range[1]):
      if step < boundary:
        todo = min(todo, boundary - step)
    return todo

  def before_chunk(self, step: int) -> None:
    if self._done or self.active or not self.is_chief:
      return
    first, last = self.range
    if first - 1 <= step < last:
      try:
        tf.profiler.experimental.start(self.logdir)
      except (tf.errors.AlreadyExistsError, tf.errors.UnavailableError) as e:
        logging.warning("--profile_steps: cannot start the profiler (%s).", e)
        self._done = True
        return
      self.active = True
      logging.info("profiling updates %d..%d into %s", step + 1, last,
                   self.logdir)

  def after_chunk(self, step: int) -> None:
    if self.active and step >= self.range[1]:
      self.stop()

  def stop(self) -> None:
    if self.active:
      tf.profiler.experimental.stop()
      self.active = False
      self._done = True
      logging.info("profile written under %s",
                   os.path.join(self.logdir, "plugins", "profile"))


class Histograms:
  """--histograms_every: weights and gradients as train/ histograms.

  The gradient is the all-reduced gradient of the NEXT update's first
  micro-batch at the current weights (for --grad_accum_steps=1: exactly the
  gradient the next update applies, before clipping): a separate tf.function
  reads that batch from a fresh pipeline at the current stream position, so
  the training stream is not disturbed, and runs one strategy.run with one
  all_reduce. It is traced and run only at histogram steps; the train step
  gains no reduction and no op.
  """

  def __init__(self, parts, train_split: str, micro_batch_size: int,
               seed: int, grad_accum_steps: int, gradients: bool):
    """`parts`: the run's (strategy, task, models, state, steps);
    gradients: False where no synchronous step exists (weights only)."""
    self._runner = parts
    self._data = (train_split, micro_batch_size, seed)
    self._accum = float(grad_accum_steps)
    self._fn = None
    self._supported = gradients

  def values(self, step: int) -> dict:
    """name -> tensor. Every worker calls it at the same step."""
    runner = self._runner
    out = {f"weights/{v.path}": tf.convert_to_tensor(v)
           for m in runner.models.values() for v in m.trainable_variables}
    if self._supported:
      grads = self._gradients()
      variables = runner.steps.optimizer_variables
      for name, values in grads.items():
        for v, g in zip(variables[name], values):
          out[f"gradients/{v.path}"] = g
    return out

  def _gradients(self):
    runner = self._runner
    strategy = runner.strategy
    split, micro_batch_size, seed = self._data
    ds = pipeline.train_dataset(runner.task, split, micro_batch_size, seed,
                                int(runner.state.position.numpy())).take(1)
    iterator = iter(strategy.experimental_distribute_dataset(ds))
    if self._fn is None:
      self._fn = tf.function(self._all_reduced_gradients)
    return self._fn(iterator)

  def _all_reduced_gradients(self, iterator):
    runner = self._runner
    strategy, steps = runner.strategy, runner.steps
    accum = self._accum

    def replica(batch):
      features, labels, meta = batch
      # The step's own loss scaling: divided by the update's global batch
      # (x K: this is one micro-batch). mean_over="weights" parts and their
      # totals scale alike, so combine's quotient is the micro-batch's.
      handed, _ = steps._micro_fn(features, labels, meta)  # noqa: SLF001
      context = tf.distribute.get_replica_context()
      reduced = context.all_reduce(
          tf.distribute.ReduceOp.SUM,
          {name: [sparse.scale(g, accum) for g in grads]
           for name, (grads, _) in handed.items()
           if name in steps.optimizers})
      unscale = 1.0 / steps.state.loss_scale if steps.fp16 else 1.0
      return {name: [sparse.scale(g, unscale)
                     for g in steps.combine(name, values)]
              for name, values in reduced.items()}

    per_replica = strategy.run(replica, args=(next(iterator),))
    return {name: [tf.convert_to_tensor(g) for g in grads]
            for name, grads in reduce_per_replica(per_replica, strategy,
                                                  "first").items()}
