"""The replica step and the cross-replica loop: strategy.run, loss scaling,
accumulation, the one cross-replica reduction per update, the finite guard.

Per update, with K = --grad_accum_steps micro-batches:
  K x strategy.run(accumulate)   gradients of the local micro-batch, summed
                                 into replica-local buffers (K = 1: none)
  1 x strategy.run(reduce)       ONE all_reduce of all gradients and the
                                 loss, unscale, finite check, user transform
  strategy.run(apply)            the optimizer update
Losses are divided by the GLOBAL batch of the whole update, so the SUM over
replicas and micro-batches is the mean gradient of the global batch.

The non-finite guard (a NaN/Inf update is dropped, counted and reported)
has two forms with the same result:
  train_loop   guard per update: tf.cond(finite, apply) in cross-replica
               context (no tf.cond around apply_gradients in replica
               context). Used for mixed_float16 (overflows are routine
               while the loss scale settles) and by parameter servers.
  fast_loop    guard per chunk: the chunk starts by copying every variable
               it changes (model, optimizer, state, metric sums) into a
               shadow, then applies every update unconditionally and stops
               at the first non-finite one. The caller then restores the
               shadow and replays the chunk through train_loop. A cond in
               the loop body costs ~2% of a small model's step on CPU
               (bench/); the copy costs one assign per variable per chunk
               and one extra copy of the weights and slots in memory.
"""

import tensorflow as tf

from layers import seeds as layer_seeds
from trainer.accumulators import Sums

_SUM = tf.distribute.ReduceOp.SUM
_LOSS_SCALE_PERIOD = 2000   # finite fp16 updates before the scale doubles


def _gradients(tape, target, variables):
  """tape.gradient; a Keras variable held as a ShardedVariable (the
  parameter-server partitioner) is differentiated shard by shard and its
  gradient concatenated: Keras 3 variables hand the tape `.handle` of their
  value, which a ShardedVariable lacks. Without one: plain tape.gradient."""
  sharded = tf.__internal__.distribute.ShardedVariable
  if not any(isinstance(getattr(v, "value", None), sharded) for v in variables):
    return tape.gradient(target, variables)
  groups = [v.value.variables if isinstance(v.value, sharded) else None
            for v in variables]
  flat = tape.gradient(target, [s for v, g in zip(variables, groups)
                                for s in (g if g is not None else [v])])
  grads = []
  for group in groups:
    if group is None:
      grads.append(flat.pop(0))
      continue
    parts = [flat.pop(0) for _ in group]
    grads.append(None if all(p is None for p in parts) else tf.concat(
        [tf.zeros(s.shape, s.dtype) if p is None else tf.convert_to_tensor(p)
         for p, s in zip(parts, group)], axis=0))
  return grads


class Steps:
  """Builds the tf.functions that train and evaluate one task."""

  sums_class = Sums   # trainer.ps swaps in a reader that needs no strategy.run
  chunk_guard = True  # fast_loop available (trainer.ps: no; see module doc)

  def __init__(self, strategy, task, model, optimizer, state, config):
    self.strategy = strategy
    self.task = task
    self.model = model
    self.optimizer = optimizer
    self.state = state
    self.config = config
    self.accum_steps = config.grad_accum_steps
    self.update_batch = config.global_batch_size
    self.micro_batch = config.micro_batch_size
    self.fp16 = config.mixed_precision == "mixed_float16"
    self._metric_fns = dict(task.metrics())
    names = ["loss", "weight", *self._metric_fns]
    self.train_sums = self.sums_class(strategy,
                                      names + ["grad_norm", "updates",
                                               "skipped_examples"])
    self.eval_sums = self.sums_class(strategy, names)
    self._buffers = None
    if self.accum_steps > 1:
      self._buffers = self._make_buffers(model.trainable_variables)
    compute = self._compute
    if config.jit_compile:
      compute = tf.function(compute, jit_compile=True)
    self._compute_fn = compute
    self.train_loop = tf.function(self._train_loop)
    self.eval_loop = tf.function(self._eval_loop)
    # Eval-only Steps (no optimizer) never train: no shadow copy.
    self.chunk_guard = (self.chunk_guard and not self.fp16
                        and optimizer is not None)
    self._shadows = None
    if self.chunk_guard:
      self._shadows = self._make_shadows()
      self.fast_loop = tf.function(self._fast_loop)
      self.restore_chunk_start = tf.function(self._restore_chunk_start)

  def _make_buffers(self, variables):
    with self.strategy.scope():
      # One buffer per replica (sync on read): micro-batch gradients stay
      # local until the single reduction of the update.
      # The last buffer holds the loss.
      return [
          tf.Variable(tf.zeros(shape, tf.float32), trainable=False,
                      name=f"accum_{i}",
                      synchronization=tf.VariableSynchronization.ON_READ,
                      aggregation=tf.VariableAggregation.SUM)
          for i, shape in enumerate([v.shape for v in variables] + [[]])]

  def _chunk_variables(self):
    """(variables written in cross-replica context, replica-local ones):
    everything an update changes. Accumulation buffers are not included:
    they are zero again after every update's reduction."""
    state = self.state
    shared = list(self.model.variables) + list(self.optimizer.variables) + [
        state.global_step, state.position, state.nonfinite_steps,
        state.last_bad_position, state.loss_scale, state.good_steps]
    return shared, list(self.train_sums.variables)

  def _make_shadows(self):
    shared, local = self._chunk_variables()

    def like(v, **kw):
      return tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                         name="shadow", **kw)
    with self.strategy.scope():
      return ([like(v, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
               for v in shared],
              [like(v, synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.SUM) for v in local])

  def _copy_chunk_variables(self, to_shadow: bool):
    shared, local = self._chunk_variables()
    shared_shadows, local_shadows = self._shadows

    def pairs(variables, shadows):
      return zip(shadows, variables) if to_shadow else zip(variables, shadows)
    # Keras variables and tf.Variables alike; a mirrored variable read in
    # cross-replica context gives its (identical) primary copy.
    for dst, src in pairs(shared, shared_shadows):
      dst.assign(tf.convert_to_tensor(src))

    def copy_local():
      for dst, src in pairs(local, local_shadows):
        dst.assign(tf.convert_to_tensor(src))
    self.strategy.run(copy_local)

  def _restore_chunk_start(self):
    self._copy_chunk_variables(to_shadow=False)

  # ---- replica context ------------------------------------------------
  def _forward(self, features, meta, training):
    offset = meta["pos"][0] - meta["start"][0]
    seeds = layer_seeds.ExampleSeeds(
        seed=tf.stack([tf.constant(self.config.seed, tf.int64),
                       meta["start"][0]]),
        offset=offset,
        # From the config: under multi-worker the local batch dimension is
        # not static. Random draws happen only in training (micro-batches).
        global_batch=self.micro_batch)
    with layer_seeds.scope(seeds):
      return self.model(features, training=training)

  def _stats(self, labels, outputs, per_example, weight, loss_sum=None):
    if loss_sum is None:
      loss_sum = tf.reduce_sum(per_example * weight)
    stats = {"loss": loss_sum, "weight": tf.reduce_sum(weight)}
    for name, fn in self._metric_fns.items():
      values = tf.cast(fn(labels, outputs), tf.float32)
      stats[name] = tf.reduce_sum(values * weight)
    return stats

  def _compute(self, features, labels, meta):
    """Local gradients of the local micro-batch, scaled for the global batch."""
    weight = meta["weight"]
    variables = self.model.trainable_variables
    with tf.GradientTape() as tape:
      outputs = self._forward(features, meta, training=True)
      per_example = tf.cast(self.task.loss(labels, outputs), tf.float32)
      # tf.nn.compute_average_loss's sum / global batch, with the sum shared
      # with the loss metric (its checks are per-step ops we do not need).
      loss_sum = tf.reduce_sum(per_example * weight)
      loss = loss_sum / self.update_batch
      if self.model.losses:
        # Regularization is added once per micro-batch: divide by K too.
        reg = tf.add_n([tf.cast(l, tf.float32) for l in self.model.losses])
        loss += tf.nn.scale_regularization_loss(reg) / self.accum_steps
      scaled = loss * self.state.loss_scale if self.fp16 else loss
    grads = _gradients(tape, scaled, variables)
    grads = [tf.zeros(v.shape, tf.float32) if g is None
             else tf.convert_to_tensor(g, tf.float32)
             for g, v in zip(grads, variables)]
    stats = self._stats(labels, outputs, per_example, weight, loss_sum)
    if "skipped" in meta:   # damaged examples (trainer/data/damage.py)
      stats["skipped_examples"] = tf.reduce_sum(meta["skipped"])
    return grads, loss, stats

  def _accumulate(self, batch):
    features, labels, meta = batch
    grads, loss, stats = self._compute_fn(features, labels, meta)
    self.train_sums.add(stats)
    for buffer, value in zip(self._buffers, list(grads) + [loss]):
      buffer.assign_add(value)

  def _reduce(self, grads, loss, stats=None):
    """The one cross-replica reduction of an update, then the guard.
    `stats`: the micro-batch's metric sums (K = 1), added with the
    update's own in one op."""
    context = tf.distribute.get_replica_context()
    reduced = context.all_reduce(_SUM, list(grads) + [loss])
    grads, loss = reduced[:-1], reduced[-1]
    if self.fp16:
      grads = [g / self.state.loss_scale for g in grads]
    # One norm serves both the guard and the grad_norm summary (the norm of
    # the reduced gradient before any transform or clipping): a NaN/Inf in
    # any gradient makes it non-finite. Measured: +2.4 points of raw-loop
    # speed at batch 32 over a per-tensor is_finite check. (A gradient so
    # large that its squares overflow float32, ~1e19, also counts as bad.)
    norm = tf.linalg.global_norm(grads)
    grads_finite = tf.math.is_finite(norm)
    loss_finite = tf.math.is_finite(loss)
    grads = self.task.transform_gradients(grads, self.model.trainable_variables)
    if self.config.clip_norm > 0:
      # Its own norm: the user's transform may have changed the gradient.
      grads, _ = tf.clip_by_global_norm(grads, self.config.clip_norm)
    ok = tf.cast(tf.logical_and(grads_finite, loss_finite), tf.float32)
    # Same value on every replica: each adds 1/R so the reduced sum is 1x.
    share = ok / self.strategy.num_replicas_in_sync
    self.train_sums.add({**(stats or {}),
                         "grad_norm": tf.where(ok > 0, norm, 0.0) * share,
                         "updates": share})
    return grads, grads_finite, loss_finite

  def _compute_and_reduce(self, batch):
    features, labels, meta = batch
    grads, loss, stats = self._compute_fn(features, labels, meta)
    return self._reduce(grads, loss, stats)

  def _reduce_buffers(self):
    values = [b.read_value() for b in self._buffers]
    with tf.control_dependencies(values):
      for b in self._buffers:
        b.assign(tf.zeros_like(b))
    values = [tf.identity(v) for v in values]
    return self._reduce(values[:-1], values[-1])

  def _apply(self, grads):
    self.optimizer.apply(grads, self.model.trainable_variables)

  # ---- cross-replica context (inside tf.function) ----------------------
  def _one_update(self, iterator):
    self._guarded_apply(self._reduced_gradients(iterator))

  def _reduced_gradients(self, iterator):
    """Consumes one update's micro-batches; returns the per-replica
    (reduced grads, grads finite, loss finite)."""
    strategy = self.strategy
    if self._buffers is None:
      return strategy.run(self._compute_and_reduce, args=(next(iterator),))
    for _ in tf.range(self.accum_steps):
      strategy.run(self._accumulate, args=(next(iterator),))
    return strategy.run(self._reduce_buffers)

  def _guarded_apply(self, result):
    """Applies the update only if it is finite; counts it either way."""
    strategy = self.strategy
    grads, grads_finite, loss_finite = result
    grads_finite, loss_finite = self._first(grads_finite), self._first(
        loss_finite)
    ok = tf.logical_and(grads_finite, loss_finite)

    def apply():
      strategy.run(self._apply, args=(grads,))
      return tf.constant(True)

    tf.cond(ok, apply, lambda: tf.constant(False))
    self._count(ok, grads_finite, loss_finite)

  def _count(self, ok, grads_finite, loss_finite):
    state = self.state
    start = state.position.read_value()
    state.global_step.assign_add(tf.cast(ok, tf.int64))
    state.position.assign_add(self.update_batch)
    if self.fp16:
      # An fp16 overflow with a finite loss is the loss scale's fault, not
      # the data's: lower the scale and drop the update without counting it.
      overflow = tf.logical_and(loss_finite, tf.logical_not(grads_finite))
      bad = tf.logical_and(tf.logical_not(ok), tf.logical_not(overflow))
      good = state.good_steps.read_value() + 1
      grow = tf.logical_and(ok, good >= _LOSS_SCALE_PERIOD)
      scale = state.loss_scale.read_value()
      state.loss_scale.assign(tf.where(
          overflow, scale / 2.0, tf.where(grow, scale * 2.0, scale)))
      state.good_steps.assign(tf.where(ok & ~grow, good, 0))
    else:
      bad = tf.logical_not(ok)
    state.nonfinite_steps.assign_add(tf.cast(bad, tf.int64))
    state.last_bad_position.assign(
        tf.where(bad, start, state.last_bad_position.read_value()))

  def _train_loop(self, iterator, num_updates):
    """`num_updates` must be a tensor: a Python int would retrace per value."""
    for _ in tf.range(num_updates):
      self._one_update(iterator)

  def _fast_loop(self, iterator, num_updates):
    """Up to `num_updates` unguarded updates; False if one was non-finite
    (then restore_chunk_start() and replay the chunk through train_loop)."""
    self._copy_chunk_variables(to_shadow=True)
    state, first = self.state, self._first

    def body(i, ok):
      del ok
      grads, grads_finite, loss_finite = self._reduced_gradients(iterator)
      self.strategy.run(self._apply, args=(grads,))
      state.global_step.assign_add(1)
      state.position.assign_add(self.update_batch)
      return i + 1, tf.logical_and(first(grads_finite), first(loss_finite))

    # The while loop's own condition stops it: no cond in the body.
    _, ok = tf.while_loop(
        lambda i, ok: tf.logical_and(ok, i < num_updates), body,
        (tf.zeros([], num_updates.dtype), tf.constant(True)))
    return ok

  def _first(self, value):
    """A reduced value (identical on every replica): the first copy."""
    return self.strategy.experimental_local_results(value)[0]

  def _eval_step(self, batch):
    features, labels, meta = batch
    outputs = self._forward(features, meta, training=False)
    per_example = tf.cast(self.task.loss(labels, outputs), tf.float32)
    self.eval_sums.add(self._stats(labels, outputs, per_example,
                                   meta["weight"]))

  def _eval_loop(self, iterator, num_batches):
    for _ in tf.range(num_batches):
      self.strategy.run(self._eval_step, args=(next(iterator),))
