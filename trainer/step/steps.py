"""The replica step and the loops over it: strategy.run, accumulation, the
one cross-replica reduction per optimizer per update, the apply.

Per update, with K = --grad_accum_steps micro-batches:
  K x strategy.run(micro-batch)  Task.train_step on the local micro-batch;
                                 the gradients it hands over are summed
                                 into replica-local buffers (K = 1: none)
  1 x strategy.run(reduce)       ONE all_reduce per optimizer (its
                                 gradients and loss), unscale, one finite
                                 check over all of them, user transform
  strategy.run(apply)            every optimizer's update, in order; then
                                 the weights' moving average (--ema_decay)
Losses are divided by the GLOBAL batch of the whole update, so the SUM over
replicas and micro-batches is the mean gradient of the global batch.

Two loops run updates; the non-finite guard (trainer.guard) decides which:
  guarded_loop    guard per update: tf.cond(finite, apply) in cross-replica
                  context (no tf.cond around apply_gradients in replica
                  context). Used for mixed_float16 (overflows are routine
                  while the loss scale settles), by parameter servers, and
                  to replay a chunk that went bad.
  unguarded_chunk every update applied unconditionally; stops at the first
                  non-finite one and says so. The caller restores the
                  chunk's start (trainer.guard.ChunkShadow) and replays it
                  through guarded_loop. A cond in the loop body costs ~2% of
                  a small model's step on CPU (bench/).
                  With one local replica it fetches ahead: each
                  micro-step dequeues the NEXT micro-batch while it runs
                  (none after the chunk's last, so a chunk that runs to its
                  end leaves the iterator where it ends; one stopped by a
                  non-finite update may leave it a batch ahead, and its
                  replay starts from a new iterator). The dequeue is an
                  async op whose thread takes 0.1-0.2 ms to wake on a busy
                  2-core CPU; fetched on demand it delayed the start of
                  every update (bench.paired --gan: a GAN's noise and
                  generator wait for the batch's positions). With several
                  local replicas the carried batch is placed on the first
                  device and copied back to each replica's every micro-step
                  (measured slower under --cpu_replicas=2): no fetch ahead.
"""

import tensorflow as tf

from trainer import compat, ema as ema_lib, guard
from trainer.errors import UserError
from trainer.step.context import StepContext, seeds_scope
from trainer.step.metric_sums import MetricSums

_SUM = tf.distribute.ReduceOp.SUM


class Steps:
  """Builds the tf.functions that train and evaluate one task.

  models: name -> Keras model; optimizers: name -> (prepared) Keras
  optimizer, in the order they are applied; optimizer_variables: name ->
  the variables it updates. Eval-only Steps have no optimizers."""

  sums_class = MetricSums   # executors.ps swaps in a reader for the coordinator
  chunk_guard = True        # unguarded_chunk available (parameter servers: no)
  is_parameter_server = False

  def __init__(self, strategy, task, models: dict, optimizers: dict,
               optimizer_variables: dict, state, config, ema=None):
    self.strategy = strategy
    self.task = task
    self.models = models
    self.optimizers = optimizers
    self.optimizer_variables = optimizer_variables
    self.state = state
    self.config = config
    self.ema = ema
    self.seed = config.seed
    self.accum_steps = config.grad_accum_steps
    self.update_batch = config.global_batch_size
    self.fetch_ahead = _one_local_replica(strategy)
    self.micro_batch = config.micro_batch_size
    self.fp16 = config.mixed_precision == "mixed_float16"
    self.train_sums = self.sums_class(
        strategy, ["weight", "grad_norm", "updates", "skipped_examples"])
    self.eval_sums = self.sums_class(strategy, ["weight"])
    self._buffers = None
    if self.accum_steps > 1 and optimizers:
      self._buffers = self._make_buffers()
    micro = self._micro_step
    if config.jit_compile:
      micro = tf.function(micro, jit_compile=True)
    self._micro_fn = micro
    self.guarded_loop = tf.function(self._guarded_loop)
    self.eval_loop = tf.function(self._eval_loop)
    # Eval-only Steps never train: no shadow copy.
    self.chunk_guard = self.chunk_guard and not self.fp16 and bool(optimizers)
    self.shadow = None
    if self.chunk_guard:
      self.shadow = guard.ChunkShadow(strategy, self._chunk_variables())
      self.unguarded_chunk = tf.function(self._unguarded_chunk)

  # ---- names -------------------------------------------------------------
  def main_model(self):
    if len(self.models) == 1:
      return next(iter(self.models.values()))
    if "model" in self.models:
      return self.models["model"]
    raise UserError(
        f"the task has models {sorted(self.models)} and none is named "
        "'model': name the main one 'model' or use ctx.models[NAME].")

  def optimizer_name(self, name: str | None) -> str:
    if name is None:
      if len(self.optimizers) != 1:
        raise UserError(f"the task has optimizers {list(self.optimizers)}: "
                        "name the one these gradients are for.")
      return next(iter(self.optimizers))
    if name not in self.optimizers:
      raise UserError(f"no optimizer named {name!r}; Task.optimizers() "
                      f"gave {list(self.optimizers)}.")
    return name

  def loss_scale(self):
    return self.state.loss_scale if self.fp16 else None

  def differentiate(self, tape, loss, variables, scale=None):
    return compat.gradients(tape, loss, variables, output_gradients=scale)

  def _make_buffers(self):
    with self.strategy.scope():
      # One buffer per replica (sync on read): micro-batch gradients stay
      # local until the single reduction of the update. The last buffer
      # of each optimizer holds its loss.
      def buffer(shape, name):
        return tf.Variable(
            tf.zeros(shape, tf.float32), trainable=False, name=name,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM)
      return {name: [buffer(shape, f"accum_{name}_{i}") for i, shape in
                     enumerate([v.shape for v in variables] + [[]])]
              for name, variables in self.optimizer_variables.items()}

  def _chunk_variables(self):
    """(variables written in cross-replica context, replica-local ones):
    everything an update changes. Accumulation buffers are not included:
    they are zero again after every update's reduction."""
    shared = [v for m in self.models.values() for v in m.variables]
    shared += [v for o in self.optimizers.values() for v in o.variables]
    if self.ema is not None:
      shared += self.ema.averages
    shared += self.state.variables_of_an_update()
    return shared, list(self.train_sums.variables)

  # ---- replica context ------------------------------------------------
  def _micro_step(self, features, labels, meta):
    """The task's step on the local micro-batch: (handed gradients by
    optimizer, metric sums)."""
    ctx = StepContext(self, meta, training=True)
    with seeds_scope(self, meta):
      metrics = self.task.train_step((features, labels), ctx)
    if not ctx.handed:
      raise UserError("Task.train_step handed no gradients to the context: "
                      "call ctx.minimize(tape, loss) or ctx.apply_gradients.")
    stats = self._sums_of(metrics, meta["weight"])
    if "skipped" in meta:
      # Damaged examples the pipeline gave weight 0 (--skip_corrupt).
      stats["skipped_examples"] = tf.reduce_sum(
          tf.cast(meta["skipped"], tf.float32))
    return ctx.handed, stats

  def _sums_of(self, metrics, weight) -> dict:
    if not isinstance(metrics, dict):
      raise UserError(f"Task.train_step/eval_step must return a dict of "
                      f"per-example metrics, not {type(metrics).__name__}.")
    total = tf.reduce_sum(weight)
    stats = {"weight": total}
    for name, value in metrics.items():
      value = tf.cast(value, tf.float32)
      stats[name] = (value * total if value.shape.rank == 0
                     else tf.reduce_sum(value * weight))
    return stats

  def _order(self, handed) -> list:
    return [name for name in self.optimizers if name in handed]

  def _accumulate(self, batch):
    handed, stats = self._micro_fn(*batch)
    self.train_sums.add(stats)
    names = self._order(handed)
    for name in names:
      grads, loss = handed[name]
      for buffer, value in zip(self._buffers[name], grads + [loss]):
        buffer.assign_add(value)
    # Set while tracing: which optimizers this step hands gradients to.
    self._handed_names = tuple(names)

  def _reduce(self, handed, stats=None):
    """The one cross-replica reduction per optimizer, then the finite
    check over all of them. `stats`: the micro-batch's metric sums
    (K = 1), added with the update's own in one op."""
    context = tf.distribute.get_replica_context()
    reduced, norms = {}, []
    grads_finite = loss_finite = tf.constant(True)
    for name in self._order(handed):
      grads, loss = handed[name]
      values = context.all_reduce(_SUM, list(grads) + [loss])
      grads, loss = values[:-1], values[-1]
      if self.fp16:
        grads = [g / self.state.loss_scale for g in grads]
      # One norm serves both the guard and the grad_norm summary (before
      # any transform or clipping): a NaN/Inf in any gradient makes it
      # non-finite. Measured: +2.4 points of raw-loop speed at batch 32
      # over a per-tensor is_finite check.
      norm = tf.linalg.global_norm(grads)
      norms.append(norm)
      grads_finite = tf.logical_and(grads_finite, tf.math.is_finite(norm))
      loss_finite = tf.logical_and(loss_finite, tf.math.is_finite(loss))
      variables = self.optimizer_variables[name]
      grads = self.task.transform_gradients(grads, variables)
      if self.config.clip_norm > 0:
        # Its own norm: the user's transform may have changed the gradient.
        grads, _ = tf.clip_by_global_norm(grads, self.config.clip_norm)
      reduced[name] = grads
    norm = norms[0] if len(norms) == 1 else tf.norm(tf.stack(norms))
    ok = tf.cast(tf.logical_and(grads_finite, loss_finite), tf.float32)
    # Same value on every replica: each adds 1/R so the reduced sum is 1x.
    share = ok / self.strategy.num_replicas_in_sync
    self.train_sums.add({**(stats or {}),
                         "grad_norm": tf.where(ok > 0, norm, 0.0) * share,
                         "updates": share})
    return reduced, grads_finite, loss_finite

  def _micro_and_reduce(self, batch):
    handed, stats = self._micro_fn(*batch)
    return self._reduce(handed, stats)

  def _reduce_buffers(self, names):
    handed = {}
    for name in names:
      buffers = self._buffers[name]
      values = [b.read_value() for b in buffers]
      with tf.control_dependencies(values):
        for b in buffers:
          b.assign(tf.zeros_like(b))
      values = [tf.identity(v) for v in values]
      handed[name] = (values[:-1], values[-1])
    return self._reduce(handed)

  def _apply(self, reduced):
    for name in self._order(reduced):
      self.optimizers[name].apply(reduced[name],
                                  self.optimizer_variables[name])

  # ---- cross-replica context (inside tf.function) ----------------------
  def _reduced_gradients(self, iterator):
    """Consumes one update's micro-batches; returns the per-replica
    (reduced grads by optimizer, grads finite, loss finite)."""
    strategy = self.strategy
    if self._buffers is None:
      return strategy.run(self._micro_and_reduce, args=(next(iterator),))
    for _ in tf.range(self.accum_steps):
      strategy.run(self._accumulate, args=(next(iterator),))
    return strategy.run(self._reduce_buffers, args=(self._handed_names,))

  def _reduced_gradients_ahead(self, iterator, batch, last):
    """_reduced_gradients of the update whose first micro-batch is
    `batch` (fetched ahead); each micro-step fetches the next micro-batch
    while it runs, except the last one of the chunk (`last`: a bool tensor,
    this is the chunk's last update). Returns (result, next micro-batch)."""
    strategy = self.strategy

    def fetch(more, batch):
      # Program order sets the order of reads: the fetch comes before the
      # micro-step, which does not touch the iterator, so it runs at once.
      return tf.cond(more, lambda: next(iterator), lambda: batch)

    if self._buffers is None:
      nxt = fetch(tf.logical_not(last), batch)
      return strategy.run(self._micro_and_reduce, args=(batch,)), nxt

    def micro(k, batch):
      more = tf.logical_or(k + 1 < self.accum_steps, tf.logical_not(last))
      nxt = fetch(more, batch)
      strategy.run(self._accumulate, args=(batch,))
      return k + 1, nxt

    _, nxt = tf.while_loop(lambda k, _: k < self.accum_steps, micro,
                           (tf.constant(0), batch))
    return (strategy.run(self._reduce_buffers, args=(self._handed_names,)),
            nxt)

  def _apply_everywhere(self, reduced):
    self.strategy.run(self._apply, args=(reduced,))
    if self.ema is not None:
      self.ema.update()

  def _one_update(self, iterator):
    self._guarded_apply(self._reduced_gradients(iterator))

  def _guarded_apply(self, result):
    """Applies the update only if it is finite; counts it either way."""
    reduced, grads_finite, loss_finite = result
    grads_finite = self._first(grads_finite)
    loss_finite = self._first(loss_finite)
    ok = tf.logical_and(grads_finite, loss_finite)

    def apply():
      self._apply_everywhere(reduced)
      return tf.constant(True)

    tf.cond(ok, apply, lambda: tf.constant(False))
    guard.count(self.state, ok, grads_finite, loss_finite, self.update_batch,
                self.fp16)

  def _guarded_loop(self, iterator, num_updates):
    """`num_updates` must be a tensor: a Python int would retrace per value."""
    for _ in tf.range(num_updates):
      self._one_update(iterator)

  def _unguarded_chunk(self, iterator, num_updates):
    """Up to `num_updates` (>= 1) unguarded updates; False if one was
    non-finite (then restore the shadow and replay the chunk through
    guarded_loop, from a new iterator: this one may be a batch ahead).
    Fetches ahead (module doc) unless the iterator says not to: the
    input-wait probe's timed iterator measures the fetch on demand."""
    self.shadow.save()
    state, first = self.state, self._first
    ahead = self.fetch_ahead and getattr(iterator, "fetch_ahead", True)

    def body(i, ok, *batch):
      del ok
      if ahead:
        result, nxt = self._reduced_gradients_ahead(
            iterator, batch[0], i + 1 >= num_updates)
        batch = (nxt,)
      else:
        result = self._reduced_gradients(iterator)
      reduced, grads_finite, loss_finite = result
      self._apply_everywhere(reduced)
      state.global_step.assign_add(1)
      state.position.assign_add(self.update_batch)
      ok = tf.logical_and(first(grads_finite), first(loss_finite))
      return (i + 1, ok, *batch)

    # The while loop's own condition stops it: no cond around the update.
    _, ok, *_ = tf.while_loop(
        lambda i, ok, *_: tf.logical_and(ok, i < num_updates), body,
        (tf.zeros([], num_updates.dtype), tf.constant(True),
         *([next(iterator)] if ahead else [])))
    return ok

  def _first(self, value):
    """A reduced value (identical on every replica): the first copy."""
    return self.strategy.experimental_local_results(value)[0]

  # ---- evaluation -------------------------------------------------------
  def _eval_step(self, batch):
    features, labels, meta = batch
    ctx = StepContext(self, meta, training=False)
    metrics = self.task.eval_step((features, labels), ctx)
    self.eval_sums.add(self._sums_of(metrics, meta["weight"]))

  def _eval_loop(self, iterator, num_batches):
    for _ in tf.range(num_batches):
      self.strategy.run(self._eval_step, args=(next(iterator),))


def _one_local_replica(strategy) -> bool:
  """Whether this process runs one replica (default strategy, or one
  device per worker), so that a batch is plain tensors, not PerReplica."""
  if strategy.num_replicas_in_sync == 1:
    return True
  return len(strategy.extended.worker_devices) == 1


def make_ema(strategy, models: dict, decay: float):
  """--ema_decay's averages of every model's trainable weights, or None."""
  if not decay:
    return None
  with strategy.scope():
    return ema_lib.EMA([v for m in models.values()
                        for v in m.trainable_variables], decay)
