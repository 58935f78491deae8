"""--strategy=parameter_server: the executor on the coordinator (ClusterCoordinator).

The process running trainer.main is the TF_CONFIG `chief`: the coordinator.
Workers and parameter servers are plain `tf.distribute.Server`s in their own
processes (launch.server; launch.local --workers=N --ps=M starts them all).
Variables live on the ps tasks; the large ones are sharded over them
(MinSizePartitioner(--ps_shard_min_bytes, max_shards=#ps)); each shard
is checkpointed by the ps that holds it (compat.save_sharded_by_shard).
The coordinator schedules functions of up to --steps_per_loop updates on
whichever worker is free and calls coordinator.join() only at summary,
checkpoint and evaluation boundaries (a "round"; a round shorter than
workers x --steps_per_loop is split evenly so that every worker gets a
function). What follows from that:

* Each worker's update is computed from its OWN batch at the weights it read
  at the start of that update (possibly stale) and applied to the ps
  variables without any all-reduce: --global_batch_size is the batch of ONE
  worker's update, and compute_average_loss divides by it.
* Data: worker w reads the framework's deterministic stream
  (pipeline.train_dataset) starting at position w * 2**40 + P/W, P the
  checkpointed stream position (examples consumed by all workers together).
  Every worker thus reads its own seeded, epoch-shuffled sequence and no two
  read the same sequence; which worker's update lands first is not defined,
  so the global order is not reproducible. A restarted worker, or a resume,
  starts its stream afresh from there (examples may repeat or be skipped
  across a failure).
* Exact global step: each scheduled function gets a slot in a ps-hosted
  int64 vector `progress` and, before each update, reads how many of its
  updates already ran; every update bumps its slot BEFORE its atomic
  global_step.assign_add. A function re-run after a worker failure
  (ClusterCoordinator re-schedules it) therefore runs only the updates the
  lost worker did not start, and an update cut off between the two
  increments is not counted (the coordinator tops the round up). So
  global_step == --train_steps at the end; a worker killed in the middle of
  an update may leave that update applied in part without being counted.
* Frozen workers (stopped, hung): the coordinator's RPCs fail within
  --peer_timeout_s (keepalive pings: ps_strategy.grpc_options) and the
  worker counts as lost, as above; worker_watch logs a line naming it. If
  it wakes up, the function it was running goes on: before each update it
  also checks a ps-hosted round number (bumped at each join), so a function
  of a past round stops, and one of the current round stops when its slot
  is full. Only the update it was frozen in may still land, counted: if
  that happens in the last round, global_step ends one past --train_steps.
* Evaluation runs inline on the coordinator, on the trained model itself
  (no worker takes part, no copy of the model): each eval batch reads the
  weights it uses from the ps tasks, of a sharded table only the rows it
  looks up.
* A lost worker is tolerated (the coordinator re-schedules its functions and
  re-creates its dataset when it is back); a lost parameter server is fatal:
  the coordinator raises ParameterServerLost (an UnavailableError: exit 4
  with one line) and a relaunch resumes from the last checkpoint. A ps
  that is stopped or hung ends the run the same way, through worker_watch
  (silent for 2/3 of --peer_timeout_s; the workers' functions would wait
  on it without a deadline). Servers
  that do not answer at startup end the wait after --peer_timeout_s (exit
  4). If every worker is lost, the coordinator waits for one to return,
  at most --peer_timeout_s (trainer/distribute/worker_watch.py: then exit 4).
* SIGTERM/SIGINT to the coordinator saves at the end of the round and exits
  75, as in the other strategies (the servers must still be up to save).
* Not available here: --profile_steps (the work runs on the workers),
  input_wait_share, gradient histograms (weights only).
"""

import math
import re

from absl import logging
import tensorflow as tf

from trainer import compat
from trainer.distribute import cluster, worker_watch
from trainer.data import pipeline
from trainer.step import sparse
from trainer.step.metric_sums import MetricSums
from trainer.step.steps import Steps

# Worker w's stream starts at w * _WORKER_STRIDE: disjoint stream regions
# (positions are int64: a worker can read 2**40 examples before the next one's region).
_WORKER_STRIDE = 1 << 40
# Scheduled functions between two joins share a ps vector of this many
# progress slots; the coordinator joins when they are used up.
_SLOTS = 256


class ParameterServerLost(tf.errors.UnavailableError):
  """A parameter server stopped answering: training cannot continue."""

  def __init__(self, message: str):
    super().__init__(None, None, message)


class _Sums(MetricSums):
  """Sums on the ps tasks (workers add atomically), read by the coordinator
  directly: strategy.run outside ClusterCoordinator.schedule is not meant
  for the coordinator."""

  def _read_and_reset(self):
    return self._local_read_and_reset()


class PSSteps(Steps):
  """The scheduled function: up to --steps_per_loop updates on one worker,
  made idempotent per slot (see the module doc: exact global step)."""

  sums_class = _Sums
  # Workers update the ps-hosted variables concurrently: a shadow copy of
  # them could not be restored per worker. The guard stays per update.
  chunk_guard = False

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    strategy, state = self.strategy, self.state
    with strategy.scope(), strategy.extended.colocate_vars_with(
        state.global_step):
      # Next to the global step (colocated variables are never sharded).
      self.progress = tf.Variable(tf.zeros([_SLOTS], tf.int64),
                                  trainable=False, name="ps_chunk_progress")
      # The current round (the joins between them): a function of an older
      # round still running on a worker that was dropped stops.
      self.round = tf.Variable(tf.zeros([], tf.int64), trainable=False,
                               name="ps_round")
    self.rounds = 0
    self.train_chunk = tf.function(self._train_chunk)

  def _make_buffers(self):
    # ps-hosted buffers would be shared by all workers: micro-batch
    # gradients are summed in tensors instead (_reduced_gradients).
    return None

  def _train_chunk(self, iterator, num_updates, slot, round_):
    self.noting_trace(True)
    slot = tf.reshape(slot, [1])
    # Read before every update: the function may run twice at once (its
    # worker froze, was dropped, and came back while the re-run goes on).
    while tf.logical_and(tf.gather(self.progress, slot)[0] < num_updates,
                         tf.equal(self.round.read_value(), round_)):
      tick = compat.scatter_add(self.progress, slot, tf.ones([1], tf.int64))
      with tf.control_dependencies([tick]):
        self._one_update(iterator)
    self.noting_trace(False)

  def reset_progress(self):
    """Ends a round: fresh slots, and functions of older rounds stop."""
    self.rounds += 1
    self.round.assign(self.rounds)   # first: a stale function sees it
    self.progress.assign(tf.zeros([_SLOTS], tf.int64))

  # K > 1 micro-batches: worker-local sums in tensors (unrolled K times).
  def _micro_first(self, batch):
    handed, stats = self._micro_fn(*batch)
    self.train_sums.add(stats)
    return {name: list(grads) + [loss]
            for name, (grads, loss) in handed.items()}

  def _micro_add(self, batch, totals):
    values = self._micro_first(batch)
    return {name: [sparse.add(a, b) for a, b in zip(totals[name],
                                                    values[name])]
            for name in totals}

  def _reduced_gradients(self, iterator):
    if self.accum_steps == 1:
      return super()._reduced_gradients(iterator)
    strategy = self.strategy
    totals = strategy.run(self._micro_first, args=(next(iterator),))
    for _ in range(self.accum_steps - 1):
      totals = strategy.run(self._micro_add, args=(next(iterator), totals))
    return strategy.run(
        lambda t: self._reduce({n: (v[:-1], v[-1]) for n, v in t.items()}),
        args=(totals,))


def _chunk_sizes(todo: int, steps_per_loop: int, workers: int) -> list[int]:
  """`todo` updates as scheduled functions of at most steps_per_loop each;
  at least one per worker (if there are enough updates) so none idles."""
  count = max(math.ceil(todo / steps_per_loop), min(workers, todo))
  return [todo // count + (1 if i < todo % count else 0)
          for i in range(count)]


_PS_TASK = re.compile(r"/job:ps/replica:\d+/task:(\d+)")
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError,
                tf.errors.CancelledError, tf.errors.DeadlineExceededError)


def shard_line(path, shape, rows) -> str:
  """How one variable is split: `rows` is [(device, rows)] in row order.

  >>> shard_line("user/embeddings", (5, 2), [
  ...     ("/job:ps/replica:0/task:1/device:CPU:0", 3),
  ...     ("/job:ps/replica:0/task:0/device:CPU:0", 2)])
  'user/embeddings [5, 2] sharded over 2 ps: rows 0-2 on ps 1, rows 3-4 on ps 0'
  """
  parts, start = [], 0
  for device, count in rows:
    match = _PS_TASK.search(device)
    where = f"ps {match.group(1)}" if match else device
    parts.append(f"rows {start}-{start + count - 1} on {where}")
    start += count
  return (f"{path} {list(shape)} sharded over {len(rows)} ps: "
          + ", ".join(parts))


def _translate(error):
  """The exception to raise for an error out of the coordinator: a lost
  parameter server becomes ParameterServerLost (one clear line, exit 4)."""
  original = getattr(error, "original_exception", None)
  if isinstance(original, Exception):
    error = original   # ClosureInputError / ClosureAbortedError wrappers
  if isinstance(error, ParameterServerLost):
    return error
  text = str(error)
  is_ps = compat.is_ps_unavailable(error) or _PS_TASK.search(text)
  if not (isinstance(error, _PEER_ERRORS) and is_ps):
    return error
  match = _PS_TASK.search(text)
  where = f"ps {match.group(1)}" if match else "a ps task"
  return ParameterServerLost(
      f"parameter server {where} is unreachable ({type(error).__name__}); "
      "the variables it held are lost, so training stops")


class PSExecutor:
  """Schedules rounds of functions through ClusterCoordinator."""

  def __init__(self, parts, settings, make_eval_steps):
    self.parts = parts
    self.settings = settings
    # (strategy, models) -> Steps that evaluate `models` on `strategy`.
    self._make_eval_steps = make_eval_steps
    for optimizer in parts.optimizers.values():
      compat.with_sharded_updates(optimizer)
    sharded = compat.save_sharded_by_shard(
        [v for m in parts.models.values() for v in m.weights] +
        [v for o in parts.optimizers.values() for v in o.variables])
    for variable in sharded:
      logging.info("parameter_server: %s (--ps_shard_min_bytes=%d)",
                   shard_line(variable.path, variable.shape,
                              compat.shard_rows(variable)),
                   settings.ps_shard_min_bytes)
    self.num_workers = len(cluster.env_tf_config(need_ps=True)["cluster"]
                           ["worker"])
    self.coordinator = tf.distribute.coordinator.ClusterCoordinator(
        parts.strategy)
    self._local = None   # (models, Steps, eval data) on the coordinator
    self.probe = self.profiler = None
    if settings.profile_steps:
      logging.warning("--profile_steps: not supported with "
                      "--strategy=parameter_server (the work runs on the "
                      "workers); ignored.")

  def translate(self, error):
    return _translate(error)

  def agree(self, flag: bool) -> bool:
    return flag   # one coordinator decides

  def gather(self, values: list) -> list[list]:
    """The coordinator's own `values` (its workers run scheduled functions,
    not a loop of their own)."""
    return [list(values)]

  def _join(self):
    self.coordinator.join()

  # ---- data -----------------------------------------------------------
  def _per_worker_iterator(self):
    settings, parts = self.settings, self.parts
    task, split, seed = parts.task, settings.train_split, settings.seed
    micro = settings.micro_batch_size
    position = int(parts.state.position.numpy())
    # Each worker resumes at the mean per-worker position (micro-batch
    # aligned): in asynchronous training no worker's own count is recorded.
    base = position // self.num_workers // micro * micro
    logging.info("parameter_server: %d workers; worker w reads its stream "
                 "from position w * 2**40 + %d", self.num_workers, base)

    def dataset_fn(context):
      worker = tf.distribute.coordinator.experimental_get_current_worker_index()
      start = tf.cast(worker, tf.int64) * _WORKER_STRIDE + base
      return pipeline.train_dataset(
          task, split, context.get_per_replica_batch_size(micro), seed, start)

    @tf.function
    def per_worker_dataset_fn():
      return parts.strategy.distribute_datasets_from_function(dataset_fn)

    dataset = self.coordinator.create_per_worker_dataset(per_worker_dataset_fn)
    return iter(dataset)

  def train_iterator(self):
    return self._per_worker_iterator()

  # ---- the coordinator's loop -----------------------------------------
  def _round(self, iterator, todo: int) -> None:
    """Schedules `todo` updates and joins; re-run functions are idempotent."""
    steps = self.parts.steps
    sizes = _chunk_sizes(todo, self.settings.steps_per_loop, self.num_workers)
    for i, size in enumerate(sizes):
      slot = i % _SLOTS
      if i and slot == 0:
        self._join()
        steps.reset_progress()
      self.coordinator.schedule(
          steps.train_chunk,
          args=(iterator, tf.constant(size, tf.int64),
                tf.constant(slot, tf.int32),
                tf.constant(steps.rounds, tf.int64)))
    self._join()
    steps.reset_progress()

  def start(self):
    self.parts.steps.reset_progress()
    worker_watch.watch(cluster.env_tf_config(need_ps=True),
                       self.settings.peer_timeout_s)
    return self._per_worker_iterator()

  def run(self, iterator, step: int, todo: int):
    """A round: `todo` updates up to the next boundary, then a join."""
    del step
    self._round(iterator, todo)
    return iterator

  def after_rollback(self, iterator):
    # The workers' streams go on past the bad batch by themselves.
    return iterator

  # ---- evaluation on the coordinator ----------------------------------
  def _local_copy(self):
    """Eval Steps under the default strategy over the trained models
    themselves, and the eval data."""
    if self._local is None:
      parts, settings = self.parts, self.settings
      steps = self._make_eval_steps(tf.distribute.get_strategy(),
                                    parts.models)
      ds, batches, _ = pipeline.eval_dataset(
          parts.task, settings.eval_split, settings.eval_batch_size)
      self._local = (steps, ds, batches)
    return self._local

  def eval_sums(self) -> dict:
    # No copy of the model: each batch reads the weights it uses from the
    # ps tasks (a sharded table: only the looked-up rows), so the
    # coordinator never holds a table.
    steps, ds, batches = self._local_copy()
    steps.eval_loop(iter(ds), tf.constant(batches, tf.int64))
    return steps.eval_sums.read_and_reset()
