"""--strategy=parameter_server: the coordinator's loop (ClusterCoordinator).

The process running trainer.main is the TF_CONFIG `chief`: the coordinator.
Workers and parameter servers are plain `tf.distribute.Server`s in their own
processes (launch.server; launch.local --workers=N --ps=M starts them all).
Variables live on the ps tasks; the large ones are sharded over them
(MinSizePartitioner(--ps_shard_min_bytes, max_shards=#ps)). The coordinator
schedules functions of up to --steps_per_loop updates on whichever worker is
free and calls coordinator.join() only at summary, checkpoint and evaluation
boundaries (a "round"; a round shorter than workers x --steps_per_loop is
split evenly so that every worker gets a function). What follows from that:

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
  int64 vector `progress` and first reads how many of its updates already
  ran; every update bumps its slot BEFORE its atomic global_step.assign_add.
  A function re-run after a worker failure (ClusterCoordinator re-schedules
  it) therefore runs only the updates the dead worker did not start, and an
  update cut off between the two increments is not counted (the coordinator
  tops the round up). So global_step == --train_steps at the end, always;
  a worker killed in the middle of an update may leave that update applied
  in part without being counted.
* Evaluation runs inline on the coordinator: the weights are copied from the
  ps tasks into a local copy of the model once per evaluation, and the
  ordinary eval loop runs on it (no worker takes part).
* A lost worker is tolerated (the coordinator re-schedules its functions and
  re-creates its dataset when it is back); a lost parameter server is fatal:
  the coordinator raises ParameterServerLost (an UnavailableError: exit 4
  with one line) and a relaunch resumes from the last checkpoint. Servers
  that do not answer at startup end the wait after --peer_timeout_s (exit
  4). If every worker is lost, the coordinator waits for one to return,
  at most --peer_timeout_s (trainer/worker_watch.py: then exit 4).
* SIGTERM/SIGINT to the coordinator saves at the end of the round and exits
  75, as in the other strategies (the servers must still be up to save).
* Not available here: --profile_steps (the work runs on the workers),
  input_wait_share, gradient histograms (weights only).
"""

import math
import os
import re
import socket
import time

from absl import logging
import tensorflow as tf

from trainer import cluster
from trainer import loop
from trainer import step as step_lib
from trainer import summary
from trainer import worker_watch
from trainer.accumulators import Sums
from trainer.data import pipeline
from trainer.errors import UserError
from trainer.strategy import Role

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


class ClusterNotReady(tf.errors.UnavailableError):
  """Worker/ps servers did not answer within --peer_timeout_s at startup."""

  def __init__(self, message: str):
    super().__init__(None, None, message)


def _answers(address: str) -> bool:
  host, _, port = address.rpartition(":")
  try:
    socket.create_connection((host.strip("[]"), int(port)), 1.0).close()
    return True
  except (OSError, ValueError):
    return False


def wait_for_servers(tf_config: dict, timeout_s: float) -> None:
  """Waits until every worker and ps task accepts connections: connecting
  the strategy to a task that is not up blocks without a deadline."""
  servers = [(f"{job} {i}", address) for job in ("worker", "ps")
             for i, address in enumerate(tf_config["cluster"][job])]
  deadline = time.monotonic() + timeout_s
  silent = [s for s in servers if not _answers(s[1])]
  if silent:
    logging.info("waiting up to --peer_timeout_s=%g for %s", timeout_s,
                 ", ".join(f"{n} ({a})" for n, a in silent))
  while silent:
    if time.monotonic() >= deadline:
      raise ClusterNotReady(
          f"no answer from {', '.join(f'{n} ({a})' for n, a in silent)} "
          f"within --peer_timeout_s={timeout_s:g}; start every worker and "
          "ps task (python -m launch.server) with the same TF_CONFIG "
          "cluster")
    time.sleep(0.5)
    silent = [s for s in silent if not _answers(s[1])]


def build_strategy(config):
  """ParameterServerStrategy from TF_CONFIG; returns (strategy, Role)."""
  tf_config = cluster.env_tf_config(need_ps=True)
  if tf_config is None:
    raise UserError(
        "--strategy=parameter_server needs TF_CONFIG describing the chief, "
        "worker and ps tasks; start the cluster with python -m launch.local "
        "--workers=N --ps=M -- --strategy=parameter_server ...")
  task = tf_config["task"]
  if task["type"] != "chief":
    raise UserError(
        f"--strategy=parameter_server: trainer.main runs only as the "
        f"coordinator (TF_CONFIG task type 'chief'), not as "
        f"{task['type']!r}; run worker and ps tasks with python -m "
        "launch.server.")
  if config.ps_shard_min_bytes <= 0:
    raise UserError(f"--ps_shard_min_bytes={config.ps_shard_min_bytes} must "
                    "be positive.")
  # RPCs to a dead task fail at once instead of waiting for it to return:
  # the coordinator's worker-failure handling relies on it (see tf-traps).
  os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
  wait_for_servers(tf_config, config.peer_timeout_s)
  num_ps = len(tf_config["cluster"]["ps"])
  resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
      min_shard_bytes=config.ps_shard_min_bytes, max_shards=num_ps)
  strategy = tf.distribute.ParameterServerStrategy(
      resolver, variable_partitioner=partitioner)
  # The coordinator is the one process that runs the loop, saves and writes.
  return strategy, Role(is_chief=True, worker_index=0, num_workers=1)


class _Sums(Sums):
  """Sums on the ps tasks (workers add atomically), read by the coordinator
  directly: strategy.run outside ClusterCoordinator.schedule is not meant
  for the coordinator."""

  def _read_and_reset(self):
    return self._local_read_and_reset()


class Steps(step_lib.Steps):
  """The scheduled function: up to --steps_per_loop updates on one worker,
  made idempotent per slot (see the module doc: exact global step)."""

  sums_class = _Sums
  # Workers update the ps-hosted variables concurrently: a shadow copy of
  # them could not be restored per worker. The guard stays per update.
  chunk_guard = False

  def __init__(self, strategy, task, model, optimizer, state, config):
    super().__init__(strategy, task, model, optimizer, state, config)
    with strategy.scope(), strategy.extended.colocate_vars_with(
        state.global_step):
      # Next to the global step (colocated variables are never sharded).
      self.progress = tf.Variable(tf.zeros([_SLOTS], tf.int64),
                                  trainable=False, name="ps_chunk_progress")
    self.train_chunk = tf.function(self._train_chunk)

  def _make_buffers(self, variables):
    # ps-hosted buffers would be shared by all workers: micro-batch
    # gradients are summed in tensors instead (_reduced_gradients).
    del variables
    return None

  def _train_chunk(self, iterator, num_updates, slot):
    slot = tf.reshape(slot, [1])
    done = tf.gather(self.progress, slot)[0]
    for _ in tf.range(num_updates - done):
      tick = tf.raw_ops.ResourceScatterAdd(
          resource=self.progress.handle, indices=slot,
          updates=tf.ones([1], tf.int64))
      with tf.control_dependencies([tick]):
        self._one_update(iterator)

  def reset_progress(self):
    self.progress.assign(tf.zeros([_SLOTS], tf.int64))

  # K > 1 micro-batches: worker-local sums in tensors (unrolled K times).
  def _micro_first(self, batch):
    features, labels, meta = batch
    grads, loss, stats = self._compute_fn(features, labels, meta)
    self.train_sums.add(stats)
    return list(grads) + [loss]

  def _micro_add(self, batch, totals):
    values = self._micro_first(batch)
    return [a + b for a, b in zip(totals, values)]

  def _reduced_gradients(self, iterator):
    if self.accum_steps == 1:
      return super()._reduced_gradients(iterator)
    strategy = self.strategy
    totals = strategy.run(self._micro_first, args=(next(iterator),))
    for _ in range(self.accum_steps - 1):
      totals = strategy.run(self._micro_add, args=(next(iterator), totals))
    return strategy.run(lambda t: self._reduce(t[:-1], t[-1]), args=(totals,))


class _ShardedUpdates:
  """Optimizer mixin: Keras 3 updates each variable through
  strategy.extended.update(var), which cannot colocate with a
  ShardedVariable; those (and only those) are updated directly: their
  assign ops go to each shard's ps task."""

  def _distributed_tf_update_step(self, distribution, grads_and_vars,
                                  learning_rate):
    sharded = tf.__internal__.distribute.ShardedVariable
    pairs = list(grads_and_vars)
    super()._distributed_tf_update_step(
        distribution, [(g, v) for g, v in pairs if not isinstance(v, sharded)],
        learning_rate)
    for grad, var in pairs:
      if isinstance(var, sharded):
        self.update_step(grad, var, learning_rate)

  def _apply_weight_decay(self, variables):
    sharded = tf.__internal__.distribute.ShardedVariable

    def is_sharded(variable):
      return isinstance(getattr(variable, "value", variable), sharded)

    super()._apply_weight_decay([v for v in variables if not is_sharded(v)])
    if self.weight_decay is None:
      return
    for variable in variables:
      if is_sharded(variable) and self._use_weight_decay(variable):
        value = variable.value
        lr = tf.cast(self.learning_rate, value.dtype)
        wd = tf.cast(self.weight_decay, value.dtype)
        value.assign_sub(tf.convert_to_tensor(value) * wd * lr)


def _with_sharded_updates(optimizer):
  """Gives `optimizer` the _ShardedUpdates behaviour (same state)."""
  cls = type(optimizer)
  optimizer.__class__ = type(f"Sharded{cls.__name__}", (_ShardedUpdates, cls),
                             {})
  return optimizer


def _save_sharded_whole(variables) -> int:
  """Keras 3 variables held as ShardedVariables cannot be saved as they are
  (the saver wants one device per value). Each such variable saves its
  whole value instead (read from all shards by the coordinator) and
  restores by assigning it (split over the shards): the checkpoint is the
  one any other strategy writes and reads. Returns how many are sharded."""
  sharded = tf.__internal__.distribute.ShardedVariable
  count = 0
  for variable in variables:
    if not isinstance(getattr(variable, "value", None), sharded):
      continue
    count += 1
    # Instance attributes: the saver honours obj.__dict__ first.
    variable._serialize_to_tensors = (
        lambda v=variable: {"VARIABLE_VALUE": tf.convert_to_tensor(v.value)})
    variable._restore_from_tensors = (
        lambda tensors, v=variable: v.value.assign(
            tf.reshape(tensors["VARIABLE_VALUE"], v.shape)))
  return count


def _chunk_sizes(todo: int, steps_per_loop: int, workers: int) -> list[int]:
  """`todo` updates as scheduled functions of at most steps_per_loop each;
  at least one per worker (if there are enough updates) so none idles."""
  count = max(math.ceil(todo / steps_per_loop), min(workers, todo))
  return [todo // count + (1 if i < todo % count else 0)
          for i in range(count)]


_PS_TASK = re.compile(r"/job:ps/replica:\d+/task:(\d+)")
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError,
                tf.errors.CancelledError, tf.errors.DeadlineExceededError)


def _translate(error):
  """The exception to raise for an error out of the coordinator: a lost
  parameter server becomes ParameterServerLost (one clear line, exit 4)."""
  original = getattr(error, "original_exception", None)
  if isinstance(original, Exception):
    error = original   # ClosureInputError / ClosureAbortedError wrappers
  if isinstance(error, ParameterServerLost):
    return error
  text = str(error)
  is_ps = type(error).__name__ == "PSUnavailableError" or _PS_TASK.search(text)
  if not (isinstance(error, _PEER_ERRORS) and is_ps):
    return error
  match = _PS_TASK.search(text)
  where = f"ps {match.group(1)}" if match else "a ps task"
  return ParameterServerLost(
      f"parameter server {where} is unreachable ({type(error).__name__}); "
      "the variables it held are lost, so training stops")


class Runner(loop.Runner):
  """loop.Runner whose loop schedules functions through ClusterCoordinator."""

  steps_class = Steps

  def __init__(self, config, task=None):
    super().__init__(config, task)
    _with_sharded_updates(self.optimizer)
    sharded = _save_sharded_whole(
        list(self.model.weights) + list(self.optimizer.variables))
    if sharded:
      logging.info("parameter_server: %d variables sharded over the ps tasks "
                   "(--ps_shard_min_bytes=%d)", sharded,
                   config.ps_shard_min_bytes)
    self.num_workers = len(cluster.env_tf_config(need_ps=True)["cluster"]
                           ["worker"])
    self.coordinator = tf.distribute.coordinator.ClusterCoordinator(
        self.strategy)
    self._local = None   # (model, Steps, eval data) on the coordinator
    if config.profile_steps:
      logging.warning("--profile_steps: not supported with "
                      "--strategy=parameter_server (the work runs on the "
                      "workers); ignored.")

  # ---- errors -----------------------------------------------------------
  def train(self, evaluate: bool = True) -> dict:
    try:
      return super().train(evaluate)
    except Exception as e:   # noqa: BLE001 - translated, re-raised
      translated = _translate(e)
      if translated is e:
        raise
      raise translated from None

  def evaluate_checkpoint(self, path=None) -> dict:
    try:
      return super().evaluate_checkpoint(path)
    except tf.errors.OpError as e:
      translated = _translate(e)
      if translated is e:
        raise
      raise translated from None

  def _join(self):
    self.coordinator.join()

  # ---- data -----------------------------------------------------------
  def _per_worker_iterator(self):
    config = self.config
    task, split, seed = self.task, config.train_split, config.seed
    micro = config.micro_batch_size
    position = int(self.state.position.numpy())
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
      return self.strategy.distribute_datasets_from_function(dataset_fn)

    dataset = self.coordinator.create_per_worker_dataset(per_worker_dataset_fn)
    return iter(dataset)

  def _train_iterator(self):
    return self._per_worker_iterator()

  # ---- the coordinator's loop -----------------------------------------
  def _round(self, iterator, todo: int) -> None:
    """Schedules `todo` updates and joins; re-run functions are idempotent."""
    steps = self.steps
    sizes = _chunk_sizes(todo, self.config.steps_per_loop, self.num_workers)
    for i, size in enumerate(sizes):
      slot = i % _SLOTS
      if i and slot == 0:
        self._join()
        steps.reset_progress()
      self.coordinator.schedule(
          steps.train_chunk,
          args=(iterator, tf.constant(size, tf.int64),
                tf.constant(slot, tf.int32)))
    self._join()
    steps.reset_progress()

  def _next_boundary(self, step: int) -> int:
    config = self.config
    target = config.train_steps
    for every in (config.summary_every, config.checkpoint_every,
                  config.eval_every, config.histograms_every):
      if every > 0:
        target = min(target, (step // every + 1) * every)
    return target

  def _start_training(self):
    self.steps.reset_progress()
    worker_watch.watch(cluster.env_tf_config(need_ps=True),
                       self.config.peer_timeout_s)
    return self._per_worker_iterator()

  def _run_chunk(self, iterator, step: int):
    self._round(iterator, self._next_boundary(step) - step)
    return iterator

  def _iterator_after_rollback(self, iterator):
    # The workers' streams go on past the bad batch by themselves.
    return iterator

  # ---- evaluation on the coordinator ----------------------------------
  def _local_copy(self):
    """A coordinator-local model (same architecture, same variable order),
    its eval Steps under the default strategy, and the eval data."""
    if self._local is None:
      config = self.config
      default = tf.distribute.get_strategy()
      spec = pipeline.input_spec(self.task, config.train_split)
      model = self.task.build_model(spec)
      names = [(v.path, tuple(v.shape)) for v in model.weights]
      theirs = [(v.path, tuple(v.shape)) for v in self.model.weights]
      if [s for _, s in names] != [s for _, s in theirs]:
        raise RuntimeError("parameter_server: the coordinator's eval copy of "
                           "the model does not match the trained model.")
      steps = step_lib.Steps(default, self.task, model, None, self.state,
                             config.replace(grad_accum_steps=1))
      ds, batches, _ = pipeline.eval_dataset(
          self.task, config.eval_split, config.effective_eval_batch_size)
      self._local = (model, steps, ds, batches)
    return self._local

  def evaluate(self) -> dict:
    config = self.config
    model, steps, ds, batches = self._local_copy()
    # One read of every weight from the ps tasks per evaluation.
    for mine, theirs in zip(model.weights, self.model.weights):
      mine.assign(tf.convert_to_tensor(theirs))
    steps.eval_loop(iter(ds), tf.constant(batches, tf.int64))
    sums = steps.eval_sums.read_and_reset()
    weight = max(sums.pop("weight"), 1.0)
    metrics = {name: value / weight for name, value in sums.items()}
    step = self.global_step
    self._open_outputs()
    self.writers.scalars(self.writers.eval, step, metrics)
    logging.info("%s", summary.progress_line("eval", step, config.train_steps,
                                             metrics))
    return {**metrics, "examples": int(weight)}
