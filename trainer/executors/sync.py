"""The synchronous executor: every replica (and worker) runs each chunk
together, through tf.distribute's strategy.run (default, mirrored,
multiworker, TPU).

A chunk is up to --steps_per_loop updates inside one tf.function call,
ending at the next boundary (summary, checkpoint, evaluation, histogram,
the instruments' windows) so that every worker cuts chunks alike. It runs
unguarded when the steps allow it; a chunk in which an update went
non-finite is restored to its start and replayed with the per-update guard
from a new iterator at the chunk's first position (trainer.guard).
"""

from absl import logging
import tensorflow as tf

from trainer.data import pipeline
from trainer.reduce import reduce_per_replica


class SyncExecutor:
  """Runs chunks, evaluations and votes for one run's parts."""

  def __init__(self, parts, settings, make_eval_steps=None):
    del make_eval_steps   # evaluation runs on the training strategy here
    self.parts = parts
    self.settings = settings
    self._eval_data = None
    self._sum = None   # the summing collective of agree and gather
    # Set by the Controller: the input-wait probe and the profiler window.
    self.probe = self.profiler = None

  # ---- data -------------------------------------------------------------
  def train_iterator(self):
    """The training iterator at the current stream position."""
    parts, settings = self.parts, self.settings
    task, strategy = parts.task, parts.strategy
    position = int(parts.state.position.numpy())
    args = (task, settings.train_split, settings.micro_batch_size,
            settings.seed, position)
    if parts.role.num_workers > 1 and task.own_train_dataset() is None:
      # Each worker builds only its own rows of every global micro-batch.
      def dataset_fn(context):
        local = context.num_replicas_in_sync // context.num_input_pipelines
        return pipeline.worker_train_dataset(
            *args, num_replicas=context.num_replicas_in_sync,
            first_replica=context.input_pipeline_id * local,
            local_replicas=local)
      return iter(strategy.distribute_datasets_from_function(dataset_fn))
    ds = pipeline.train_dataset(*args)
    return iter(strategy.experimental_distribute_dataset(ds))

  def start(self):
    return self.train_iterator()

  def after_rollback(self, iterator):
    """After a rollback the data position moved past the bad batch."""
    del iterator
    return self.train_iterator()

  # ---- training -------------------------------------------------------
  def run(self, iterator, step: int, todo: int):
    """Runs at most `todo` updates (one chunk); returns the iterator to
    continue with."""
    todo = min(todo, self.settings.steps_per_loop)
    probe, profiler = self.probe, self.profiler
    # Windows of the instruments end chunks alike on every worker.
    todo = profiler.limit(step, todo)
    todo, timed = probe.plan(step, todo)
    profiler.before_chunk(step)
    iterator = self._chunk(iterator, todo, probe.wrap if timed else None)
    if timed:
      probe.after_chunk()
    profiler.after_chunk(int(self.parts.state.global_step.numpy()))
    return iterator

  def _chunk(self, iterator, todo: int, wrap=None):
    if todo < 1:   # the chunk fetches its first batch before its loop
      raise ValueError(f"a chunk of {todo} updates")
    steps, num = self.parts.steps, tf.constant(todo, tf.int64)
    wrapped = wrap(iterator) if wrap else iterator
    if not steps.chunk_guard:
      steps.guarded_loop(wrapped, num)
      return iterator
    if bool(steps.unguarded_chunk(wrapped, num)):
      return iterator
    steps.shadow.restore()
    logging.info("non-finite update in the chunk at step %d: replaying it "
                 "with the per-update guard.",
                 int(self.parts.state.global_step.numpy()))
    iterator = self.train_iterator()
    steps.guarded_loop(wrap(iterator) if wrap else iterator, num)
    return iterator

  def agree(self, flag: bool) -> bool:
    """True if any worker says so (a collective under multiworker)."""
    if self.parts.role.num_workers <= 1:
      return flag
    # ReduceOp has no MAX: a SUM of 0/1 flags is > 0 iff any is set.
    return float(self._summed(tf.constant(1.0 if flag else 0.0))) > 0

  def gather(self, values: list) -> list[list]:
    """Each worker's `values` (floats), by worker index: a collective under
    multiworker (every worker calls it alike)."""
    parts = self.parts
    workers = parts.role.num_workers
    if workers <= 1:
      return [list(values)]
    # Each worker fills its own row (divided by its replicas, all of which
    # add it); the sum is then every worker's row.
    local = parts.strategy.num_replicas_in_sync // workers
    table = [[0.0] * len(values) for _ in range(workers)]
    table[parts.role.worker_index] = [v / local for v in values]
    return self._summed(tf.constant(table, tf.float64)).numpy().tolist()

  def _summed(self, value: tf.Tensor) -> tf.Tensor:
    """`value` summed over every replica of every worker (one collective;
    every worker must call it alike)."""
    if self._sum is None:
      strategy = self.parts.strategy

      def summed(value):
        per_replica = strategy.run(lambda: tf.identity(value))
        return reduce_per_replica(per_replica, strategy, "sum")
      self._sum = tf.function(summed)
    return self._sum(value)

  # ---- evaluation -----------------------------------------------------
  def eval_sums(self) -> dict:
    """Runs the eval split through the main model(s); the summed metrics."""
    parts, settings = self.parts, self.settings
    if self._eval_data is None:
      ds, batches, _ = pipeline.eval_dataset(
          parts.task, settings.eval_split, settings.eval_batch_size)
      self._eval_data = (parts.strategy.experimental_distribute_dataset(ds),
                         batches)
    dist, batches = self._eval_data
    parts.steps.eval_loop(iter(dist), tf.constant(batches, tf.int64))
    return parts.steps.eval_sums.read_and_reset()

  def translate(self, error):
    """The exception to raise for an error out of a chunk (itself here)."""
    return error
