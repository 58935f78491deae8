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
An optimizer with Task.update_every(name) = N > 1 applies on the N-th,
2N-th, ... update only (1-based count of applied updates: the global step
+ 1, so a dropped non-finite update or a resume keeps the count). Off its
turn its gradients are still reduced but dropped (they neither stop the
update nor count in grad_norm), and its apply runs but is undone by a
select in cross-replica context: its variables, its own state (iterations,
slots) and their --ema_decay averages are written back bit for bit (no
tf.cond around the apply; any optimizer class, whatever state it keeps).
Decided at trace time: with every N = 1 the graph is today's.
Losses are divided by the GLOBAL batch of the whole update, so the SUM over
replicas and micro-batches is the mean gradient of the global batch.
A mean_over="weights" term (StepContext.scale_loss) is handed over
unnormalised, beside its micro-batch's sum of weights, in the same list
(StepContext.layouts says where): both are summed over micro-batches and
replicas by the same buffers and the same all_reduce, then combine()
divides the term's gradient by the update's total. Embedding gradients
(tf.IndexedSlices) stay sparse: K micro-batches of n rows are written side
by side into K x n rows (when n is static; else scatter-added into a dense
buffer), all-reduced by gathering rows, their repeated indices summed
before the norm, the finite check and the optimizer. Buffers for such
layouts are made when the first trace meets them (_Retraced); a step that
hands over only dense per-example gradients traces exactly today's graph.

Two loops run updates; the non-finite guard (trainer.guard) decides which:
  guarded_loop    guard per update: tf.cond(finite, apply) in cross-replica
                  context (no tf.cond around apply_gradients in replica
                  context). Used for mixed_float16 (overflows are routine
                  while the loss scale settles), by parameter servers, by
                  row-wise optimizers (no shadow of their tables:
                  guard.shadow_pays), and to replay a chunk that went bad.
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

import dataclasses
import numbers

import tensorflow as tf

from trainer import compat, ema as ema_lib, guard
from trainer.errors import UserError
from trainer.reduce import reduce_per_replica
from trainer.step.context import StepContext, seeds_scope
from trainer.step import exact, sparse
from trainer.step import metric_sums
from trainer.step.metric_sums import WEIGHTS_SUFFIX, MetricSums

_SUM = tf.distribute.ReduceOp.SUM
# --deterministic=topology: the handed-over entry (not an optimizer's) that
# carries the values a shard's step left in the models' moving statistics.
MOVED = "#moved"


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the step reads (field names are the flags')."""
  seed: int = 0
  grad_accum_steps: int = 1
  global_batch_size: int = 64
  mixed_precision: str = "float32"
  clip_norm: float = 0.0
  jit_compile: bool = False
  # What the backend can do (trainer.build's table): ctx.all_gather's kind
  # ("collective", "by_sum" or "" for none), and whether every replica
  # steps together on one shared update count (not under parameter servers).
  all_gather: str = "collective"
  synchronous: bool = True
  # --deterministic=topology's --virtual_shards (0: off). Then
  # grad_accum_steps is virtual_shards / replicas: each replica's
  # micro-batch is one shard (trainer.build.effective_accum_steps).
  virtual_shards: int = 0

  @property
  def micro_batch_size(self) -> int:
    return self.global_batch_size // self.grad_accum_steps


class Steps:
  """Builds the tf.functions that train and evaluate one task.

  models: name -> Keras model; optimizers: name -> (prepared) Keras
  optimizer, in the order they are applied; optimizer_variables: name ->
  the variables it updates. Eval-only Steps have no optimizers."""

  sums_class = MetricSums   # executors.ps swaps in a reader for the coordinator
  chunk_guard = True        # unguarded_chunk available (parameter servers: no)
  # on_trace(True) when a training function's trace begins, on_trace(False)
  # when its Python body ends: the hang watch does not count tracing as a
  # stalled step (trainer.hang).
  on_trace = None

  def __init__(self, strategy, task, models: dict, optimizers: dict,
               optimizer_variables: dict, state, settings: StepSettings,
               ema=None):
    self.strategy = strategy
    self.task = task
    self.models = models
    self.optimizers = optimizers
    self.optimizer_variables = optimizer_variables
    # name -> N of the optimizers that apply every N-th update only.
    self.every = _schedules(task, optimizers, not settings.synchronous)
    self.all_gather_kind = settings.all_gather
    self.state = state
    self.ema = ema
    self.seed = settings.seed
    self.accum_steps = settings.grad_accum_steps
    self.update_batch = settings.global_batch_size
    self.fetch_ahead = _one_local_replica(strategy)
    self.micro_batch = settings.micro_batch_size
    self.shards = settings.virtual_shards
    # Float non-trainable weights (batch norm's moving statistics): under
    # --deterministic=topology each shard's step starts from the update's
    # value and the update ends at the exact mean of the shards' results.
    self.moving = ([v for m in models.values()
                    for v in m.non_trainable_variables
                    if v.dtype.startswith("float")]
                   if self.shards and optimizers else [])
    self.fp16 = settings.mixed_precision == "mixed_float16"
    self.clip_norm = settings.clip_norm
    jit_compile = settings.jit_compile
    # Set while tracing the step: optimizer name -> ctx.layouts' entry.
    self._layouts = {}
    self.train_sums = self.sums_class(
        strategy, ["weight", "grad_norm", "updates", "skipped_examples"])
    self.eval_sums = self.sums_class(strategy, ["weight"])
    self._buffers = None
    self._wanted_buffers = {}
    self._stats_buffer = None
    if self.accum_steps > 1 and optimizers:
      self._buffers = self._make_buffers()
      if self.shards:
        self._stats_buffer = self._slots([metric_sums.CAPACITY], "stats")
        self._moved_buffers = [self._slots(v.shape, f"moved_{i}")
                               for i, v in enumerate(self.moving)]
    micro = self._micro_step
    if jit_compile:
      micro = tf.function(micro, jit_compile=True)
    self._micro_fn = micro
    self.guarded_loop = self._traced(self._guarded_loop)
    self.eval_loop = tf.function(self._eval_loop)
    # Eval-only Steps never train: no shadow copy. Row-wise optimizers
    # (embedding tables) take the per-update guard: see guard.shadow_pays.
    self.chunk_guard = (self.chunk_guard and not self.fp16 and bool(optimizers)
                        and guard.shadow_pays(optimizers.values()))
    self.shadow = None
    if self.chunk_guard:
      self.shadow = guard.ChunkShadow(strategy, self._chunk_variables())
      self.unguarded_chunk = self._traced(self._unguarded_chunk)

  def _traced(self, fn):
    """tf.function(fn), traced again with new accumulation buffers when its
    first trace finds that the step hands over gradients that today's
    buffers cannot hold (mean_over="weights" parts, sparse slices): their
    layout is known only once the step is traced, and variables cannot be
    created inside the trace."""
    return _Retraced(fn, self._make_wanted_buffers, len(self.optimizers))

  # ---- names -------------------------------------------------------------
  def main_model(self):
    if len(self.models) == 1:
      return next(iter(self.models.values()))
    if "model" in self.models:
      return self.models["model"]
    raise UserError(
        f"the task has models {sorted(self.models)} and none is named "
        "'model': name the main one 'model' or use ctx.models[NAME].")

  @compat.plain
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

  @compat.plain
  def updates(self, name: str) -> tf.Tensor:
    """bool scalar: optimizer `name` applies this update (its 1-based
    number, global step + 1, is a multiple of Task.update_every(name)).
    Either context; the global step moves only between updates."""
    every = self.every.get(name)
    if every is None:
      return tf.constant(True)
    number = tf.convert_to_tensor(self.state.global_step) + 1
    return tf.equal(number % every, 0)

  @compat.plain
  def loss_scale(self):
    return self.state.loss_scale if self.fp16 else None

  @compat.plain
  def differentiate(self, tape, loss, variables, scale=None):
    return compat.gradients(tape, loss, variables, output_gradients=scale)

  def _make_buffers(self):
    """One buffer per replica (sync on read): micro-batch gradients stay
    local until the single reduction of the update. The last buffer of
    each optimizer holds its loss. Made for dense gradients; a step that
    hands over another layout gets its own (_make_wanted_buffers)."""
    self._buffer_specs = {
        name: [("dense", tuple(v.shape)) for v in variables] + [("dense", ())]
        for name, variables in self.optimizer_variables.items()}
    return {name: self._buffers_of(name, specs)
            for name, specs in self._buffer_specs.items()}

  def _slots(self, shape, label):
    """--deterministic=topology: a replica-local [K, *shape] buffer, slot k
    holding micro-batch k's (one shard's) value, summed only by exact."""
    with self.strategy.scope():
      return _replica_local([self.accum_steps, *shape], tf.float32, label)

  def _buffers_of(self, name, specs) -> list:
    """Dense specs: a variable summing the micro-batches (topology: one
    slot per micro-batch). ("rows", n, shape): slices of n rows per
    micro-batch, written side by side into K x n rows (values and
    indices): the update's slices concatenated, O(K x rows) memory, never
    the table's."""
    variable = _replica_local
    buffers = []
    with self.strategy.scope():
      for i, spec in enumerate(specs):
        label = f"accum_{name}_{i}"
        if spec[0] == "dense" and self.shards:
          buffers.append(self._slots(spec[1], label))
        elif spec[0] == "dense":
          buffers.append(variable(spec[1], tf.float32, label))
        else:
          rows = self.accum_steps * spec[1]
          buffers.append(_Rows(
              variable([rows, *spec[2][1:]], tf.float32, label),
              variable([rows], tf.int64, label + "_rows"), spec[1],
              spec[2]))
    return buffers

  def _make_wanted_buffers(self):
    for name, specs in self._wanted_buffers.items():
      self._buffers[name] = self._buffers_of(name, specs)
      self._buffer_specs[name] = specs
    self._wanted_buffers = {}

  def _specs(self, name, values) -> list:
    """The buffer specs that hold `values` (a handed gradient list and its
    loss): entry i < groups x n is a gradient of variable i mod n."""
    variables = self.optimizer_variables[name]
    specs = []
    self._no_slices(values)
    for i, value in enumerate(values):
      rows = value.values.shape[0] if sparse.is_sparse(value) else None
      if rows is not None:
        specs.append(("rows", rows,
                      tuple(variables[i % len(variables)].shape)))
      elif sparse.is_sparse(value):
        # Rows not static (e.g. an unknown local batch): summed into a
        # dense buffer by scatter-add (O(rows) per micro-batch).
        specs.append(("dense", tuple(variables[i % len(variables)].shape)))
      elif not value.shape.is_fully_defined():
        # A dense gradient whose static shape was lost (e.g. a Dense
        # layer's kernel on [batch, time, width] inputs of unknown batch):
        # its variable's. Totals and losses are scalars.
        specs.append(("dense", tuple(variables[i % len(variables)].shape)))
      else:
        specs.append(("dense", tuple(value.shape)))
    return specs

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
  @compat.plain
  def _no_slices(self, values):
    if self.shards and any(sparse.is_sparse(v) for v in values):
      raise UserError(
          "--deterministic=topology does not support sparse (embedding) "
          "gradients yet: drop the flag, or use --deterministic.")

  @compat.plain
  def _micro_step(self, features, labels, meta):
    """The task's step on the local micro-batch: (handed gradients by
    optimizer, metric sums)."""
    if self.shards:
      # One shard: its own first position is its "micro-batch start", so
      # dropout, ctx.seed and ctx.uniform key on the shard, not on how
      # the topology grouped shards into micro-batches.
      meta = dict(meta, start=tf.fill(tf.shape(meta["pos"]), meta["pos"][0]))
    ctx = StepContext(self, meta, training=True)
    before = [tf.identity(v.value) for v in self.moving]
    with seeds_scope(self, meta):
      metrics = compat.user_code(self.task.train_step)((features, labels),
                                                        ctx)
    if not ctx.handed:
      raise UserError("Task.train_step handed no gradients to the context: "
                      "call ctx.minimize(tape, loss) or ctx.apply_gradients.")
    if self.moving:
      # What this shard's step made of them; then back to the update's
      # start for the next shard (the reduction writes the mean).
      moved = [tf.identity(v.value) for v in self.moving]
      for v, value in zip(self.moving, before):
        v.assign(value)
      ctx.handed[MOVED] = (moved, None)
    if ctx.terms and not any(terms for _, terms in ctx.layouts.values()):
      raise UserError(
          "scale_loss(mean_over='weights') returns the micro-batch's "
          "unnormalised sum: differentiate it with ctx.gradients or "
          "ctx.minimize, which divide by the update's total.")
    self._layouts.update(ctx.layouts)
    stats = self._sums_of(metrics, meta["weight"])
    if "skipped" in meta:
      # Damaged examples the pipeline gave weight 0 (--skip_corrupt).
      stats["skipped_examples"] = tf.reduce_sum(
          tf.cast(meta["skipped"], tf.float32))
    return ctx.handed, stats

  @compat.plain
  def _sums_of(self, metrics, weight) -> dict:
    if not isinstance(metrics, dict):
      raise UserError(f"Task.train_step/eval_step must return a dict of "
                      f"per-example metrics, not {type(metrics).__name__}.")
    total = tf.reduce_sum(weight)
    stats = {"weight": total}
    for name, value in metrics.items():
      if isinstance(value, (tuple, list)):
        stats.update(_weighted_sums(name, value, weight))
        continue
      value = tf.cast(value, tf.float32)
      stats[name] = (value * total if value.shape.rank == 0
                     else tf.reduce_sum(value * weight))
    return stats

  @compat.plain
  def _order(self, handed) -> list:
    return [name for name in self.optimizers if name in handed]

  @compat.plain
  def _accumulate(self, batch, k):
    """Micro-batch `k` (0-based) of the update, into the buffers."""
    handed, stats = self._micro_fn(*batch)
    names = self._order(handed)
    wanted = {}
    for name in names:
      grads, loss = handed[name]
      specs = self._specs(name, list(grads) + [loss])
      if specs != self._buffer_specs[name]:
        wanted[name] = specs
    if wanted:
      self._wanted_buffers = wanted
      raise _NewLayout("the step's gradients need new accumulation buffers")
    if self.shards:
      _write_slot(self._stats_buffer, k, self.train_sums.pack(stats))
      for buffer, value in zip(self._moved_buffers,
                               handed.get(MOVED, ((), None))[0]):
        _write_slot(buffer, k, value)
    else:
      self.train_sums.add(stats)
    for name in names:
      grads, loss = handed[name]
      for buffer, value in zip(self._buffers[name], list(grads) + [loss]):
        if self.shards:
          _write_slot(buffer, k, value)
        elif isinstance(buffer, _Rows):
          buffer.write(k, value)
        elif sparse.is_sparse(value):
          tf.raw_ops.ResourceScatterAdd(
              resource=buffer.handle, indices=value.indices,
              updates=value.values)
        else:
          buffer.assign_add(value)
    # Set while tracing: which optimizers this step hands gradients to.
    self._handed_names = tuple(names)

  @compat.plain
  def _reduce(self, handed, stats=None):
    """The one cross-replica reduction per optimizer, then the finite
    check over all of them. `stats`: the micro-batch's metric sums
    (K = 1), added with the update's own in one op.
    --deterministic=topology: every value comes with a first axis of
    shards (this replica's, one per micro-batch) and `stats` is their
    packed metric sums; one exact sum (trainer.step.exact) serves all."""
    context = tf.distribute.get_replica_context()
    reduced, norms = {}, []
    grads_finite = loss_finite = tf.constant(True)
    if self.shards:
      handed, stats = self._exact_sums(handed, stats)
    for name in self._order(handed):
      grads, loss = handed[name]
      # Slices are all-gathered (only the touched rows travel); the
      # mean_over="weights" totals travel in the same reduction.
      if self.shards:
        values = list(grads) + [loss]
      else:
        values = context.all_reduce(_SUM, list(grads) + [loss])
      grads, loss = self.combine(name, values[:-1]), values[-1]
      if self.fp16:
        grads = [sparse.scale(g, 1.0 / self.state.loss_scale)
                 if sparse.is_sparse(g) else g / self.state.loss_scale
                 for g in grads]
      grads = [sparse.combine_repeated(g) for g in grads]
      # One norm serves both the guard and the grad_norm summary (before
      # any transform or clipping): a NaN/Inf in any gradient makes it
      # non-finite. Measured: +2.4 points of raw-loop speed at batch 32
      # over a per-tensor is_finite check. Slices: the norm of their
      # values, each row once (never densified).
      norm = tf.linalg.global_norm(sparse.norm_parts(grads))
      finite, finite_loss = tf.math.is_finite(norm), tf.math.is_finite(loss)
      if name in self.every:
        # Off its turn these gradients are dropped unapplied: they can
        # neither spoil the update nor count in its norm.
        off = tf.logical_not(self.updates(name))
        finite = tf.logical_or(finite, off)
        finite_loss = tf.logical_or(finite_loss, off)
        norm = tf.where(off, tf.zeros_like(norm), norm)
      norms.append(norm)
      grads_finite = tf.logical_and(grads_finite, finite)
      loss_finite = tf.logical_and(loss_finite, finite_loss)
      variables = self.optimizer_variables[name]
      grads = compat.user_code(self.task.transform_gradients)(grads,
                                                              variables)
      if self.clip_norm > 0:
        # Its own norm: the user's transform may have changed the gradient.
        grads, _ = tf.clip_by_global_norm(grads, self.clip_norm)
      reduced[name] = grads
    norm = norms[0] if len(norms) == 1 else tf.norm(tf.stack(norms))
    ok = tf.cast(tf.logical_and(grads_finite, loss_finite), tf.float32)
    # Same value on every replica: each adds 1/R so the reduced sum is 1x.
    share = ok / self.strategy.num_replicas_in_sync
    own = {"grad_norm": tf.where(ok > 0, norm, 0.0) * share,
           "updates": share}
    if self.shards:
      self.train_sums.add_packed(stats + self.train_sums.pack(own))
    else:
      self.train_sums.add({**(stats or {}), **own})
    return reduced, grads_finite, loss_finite

  @compat.plain
  def _exact_sums(self, handed, stats):
    """--deterministic=topology: (handed with every value summed over the
    update's shards, exactly; the packed metric sums, counted on the first
    replica only, so that their sum over replicas is that one value)."""
    names = self._order(handed)
    flat = []
    for name in names:
      grads, loss = handed[name]
      self._no_slices(grads)
      flat += list(grads) + [loss]
    moved = list(handed[MOVED][0]) if MOVED in handed else []
    summed = exact.exact_sum(flat + moved + [stats], self.shards,
                             self.all_gather_kind)
    out, i = {}, 0
    for name in names:
      n = len(handed[name][0])
      out[name] = (summed[i:i + n], summed[i + n])
      i += n + 1
    for v, total in zip(self.moving, summed[i:i + len(moved)]):
      v.assign(total / self.shards)
    context = tf.distribute.get_replica_context()
    first = tf.cast(tf.equal(context.replica_id_in_sync_group, 0), tf.float32)
    return out, summed[-1] * first

  @compat.plain
  def combine(self, name, values) -> list:
    """One gradient per variable from a reduced hand-over laid out as
    ctx.layouts[name] says: the per-example part plus each
    mean_over="weights" part divided by its update total (0 if the update
    had no weight at all)."""
    by_example, terms = self._layouts.get(name, (True, ()))
    if not terms:
      return list(values)
    n = len(self.optimizer_variables[name])
    groups = int(by_example) + len(terms)
    totals = values[groups * n:]
    grads = list(values[:n]) if by_example else [None] * n
    first = int(by_example)
    for j, total in enumerate(totals):
      part = values[(first + j) * n:(first + j + 1) * n]
      for i, g in enumerate(part):
        g = (tf.IndexedSlices(tf.math.divide_no_nan(g.values, total),
                              g.indices, g.dense_shape)
             if sparse.is_sparse(g) else tf.math.divide_no_nan(g, total))
        grads[i] = g if grads[i] is None else sparse.add(grads[i], g)
    return grads

  @compat.plain
  def _micro_and_reduce(self, batch):
    handed, stats = self._micro_fn(*batch)
    if self.shards:
      # This replica's one shard: a first axis of 1.
      stats = self.train_sums.pack(stats)[tf.newaxis]
      handed = {name: tf.nest.map_structure(lambda t: t[tf.newaxis], value)
                for name, value in handed.items()}
    return self._reduce(handed, stats)

  @compat.plain
  def _reduce_buffers(self, names):
    handed = {}
    for name in names:
      buffers = self._buffers[name]
      dense = [b for b in buffers if not isinstance(b, _Rows)]
      values = [b.read() if isinstance(b, _Rows) else b.read_value()
                for b in buffers]
      # Row buffers need no reset: every micro-batch overwrites its rows
      # (so do the slots of --deterministic=topology).
      if not self.shards:
        with tf.control_dependencies(tf.nest.flatten(
            values, expand_composites=True)):
          for b in dense:
            b.assign(tf.zeros_like(b))
        values = tf.nest.map_structure(tf.identity, values,
                                       expand_composites=True)
      handed[name] = (values[:-1], values[-1])
    if self.shards:
      if self.moving:
        handed[MOVED] = ([b.read_value() for b in self._moved_buffers], None)
      return self._reduce(handed, self._stats_buffer.read_value())
    return self._reduce(handed)

  @compat.plain
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
    for k in tf.range(self.accum_steps):
      strategy.run(self._accumulate, args=(next(iterator), k))
    return strategy.run(self._reduce_buffers, args=(self._handed_names,))

  @compat.plain
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
      strategy.run(self._accumulate, args=(batch, k))
      return k + 1, nxt

    _, nxt = tf.while_loop(lambda k, _: k < self.accum_steps, micro,
                           (tf.constant(0), batch))
    return (strategy.run(self._reduce_buffers, args=(self._handed_names,)),
            nxt)

  @compat.plain
  def _apply_everywhere(self, reduced):
    held = self._hold_off_turn()
    self.strategy.run(self._apply, args=(reduced,))
    if self.ema is not None:
      self.ema.update()
    for on, variables, before in held:
      for variable, value in zip(variables, before):
        variable.assign(tf.where(on, tf.convert_to_tensor(variable), value))

  @compat.plain
  def _hold_off_turn(self) -> list:
    """(on its turn, variables, their values now) of each optimizer that
    applies every N-th update only: everything its update moves, put back
    after the apply when it is not its turn (cross-replica context: the
    write reaches every replica's copy)."""
    held = []
    for name in self.every:
      variables = (list(self.optimizer_variables[name]) +
                   list(self.optimizers[name].variables))
      if self.ema is not None:
        mine = {id(v) for v in self.optimizer_variables[name]}
        variables += [average for average, source in
                      zip(self.ema.averages, _ema_sources(self.models))
                      if id(source) in mine]
      held.append((self.updates(name), variables,
                   [tf.identity(tf.convert_to_tensor(v)) for v in variables]))
    return held

  def _one_update(self, iterator):
    self._guarded_apply(self._reduced_gradients(iterator))

  @compat.plain
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

  @compat.plain
  def noting_trace(self, active: bool) -> None:
    """Tells on_trace that a training function's trace begins or ends
    (called from their Python bodies: at trace time only)."""
    if self.on_trace is not None:
      self.on_trace(active)

  def _guarded_loop(self, iterator, num_updates):
    """`num_updates` must be a tensor: a Python int would retrace per value."""
    self.noting_trace(True)
    for _ in tf.range(num_updates):
      self._one_update(iterator)
    self.noting_trace(False)

  def _unguarded_chunk(self, iterator, num_updates):
    """Up to `num_updates` (>= 1) unguarded updates; False if one was
    non-finite (then restore the shadow and replay the chunk through
    guarded_loop, from a new iterator: this one may be a batch ahead).
    Fetches ahead (module doc) unless the iterator says not to: the
    input-wait probe's timed iterator measures the fetch on demand."""
    self.noting_trace(True)
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
    self.noting_trace(False)
    return ok

  @compat.plain
  def _first(self, value):
    """A reduced value (identical on every replica): the first copy."""
    return reduce_per_replica(value, self.strategy, "first")

  # ---- evaluation -------------------------------------------------------
  @compat.plain
  def _eval_step(self, batch):
    features, labels, meta = batch
    ctx = StepContext(self, meta, training=False)
    metrics = compat.user_code(self.task.eval_step)((features, labels), ctx)
    self.eval_sums.add(self._sums_of(metrics, meta["weight"]))

  def _eval_loop(self, iterator, num_batches):
    for _ in tf.range(num_batches):
      self.strategy.run(self._eval_step, args=(next(iterator),))


class _NewLayout(Exception):
  """Raised while tracing: the step needs other accumulation buffers."""


class _Retraced:
  """A tf.function of `fn` that, when a trace raises _NewLayout, makes the
  buffers (`make_buffers`, eagerly) and traces a new tf.function. Other
  attributes are the current tf.function's (tracing counts and such)."""

  def __init__(self, fn, make_buffers, attempts: int):
    self._fn, self._make_buffers, self._attempts = fn, make_buffers, attempts
    self._current = tf.function(fn)

  def __call__(self, *args, **kwargs):
    for _ in range(self._attempts):
      try:
        return self._current(*args, **kwargs)
      except _NewLayout:
        self._make_buffers()
        self._current = tf.function(self._fn)
    return self._current(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._current, name)


class _Rows:
  """An update's gradient slices of one variable: K micro-batches of n
  rows each, values and indices, replica-local."""

  def __init__(self, values, indices, rows: int, shape):
    self.values, self.indices, self.rows, self.shape = (values, indices,
                                                        rows, shape)

  def write(self, k, gradient):
    where = tf.range(tf.cast(k, tf.int64) * self.rows,
                     (tf.cast(k, tf.int64) + 1) * self.rows)
    # The replica's own copy (sync on read variables have no scatter_*).
    tf.raw_ops.ResourceScatterUpdate(resource=self.values.handle,
                                     indices=where, updates=gradient.values)
    tf.raw_ops.ResourceScatterUpdate(
        resource=self.indices.handle, indices=where,
        updates=tf.cast(gradient.indices, tf.int64))

  def read(self):
    return tf.IndexedSlices(self.values.read_value(),
                            self.indices.read_value(),
                            tf.constant(self.shape, tf.int64))


def _replica_local(shape, dtype, label):
  """A zero buffer, one copy per replica (sync on read): micro-batch
  values stay local until the update's one reduction."""
  return tf.Variable(
      tf.zeros(shape, dtype), trainable=False, name=label,
      synchronization=tf.VariableSynchronization.ON_READ,
      aggregation=tf.VariableAggregation.SUM)


def _write_slot(buffer, k, value):
  """buffer[k] = value, on this replica's copy (sync on read variables
  have no scatter_*)."""
  tf.raw_ops.ResourceScatterUpdate(
      resource=buffer.handle, indices=tf.reshape(tf.cast(k, tf.int32), [1]),
      updates=tf.cast(value, buffer.dtype)[tf.newaxis])


def _weighted_sums(name, pair, weight) -> dict:
  """A (values, weights) metric: sum(values * weights) under `name` and
  sum(weights) under its reserved key; padding examples count in neither
  (MetricSums.read_and_reset divides one by the other)."""
  if len(pair) != 2:
    raise UserError(f"metric {name!r}: a tuple metric must be (values, "
                    f"weights), not {len(pair)} items.")
  values, weights = (tf.cast(x, tf.float32) for x in pair)
  if values.shape.rank == 0:
    raise UserError(f"metric {name!r}: (values, weights) needs values with "
                    "the local batch as first dimension, not a scalar.")
  weights = tf.broadcast_to(weights, tf.shape(values))
  rows = tf.reshape(weight, tf.concat(
      [tf.shape(weight), tf.ones([values.shape.rank - 1], tf.int32)], 0))
  weights = weights * rows
  return {name: tf.reduce_sum(values * weights),
          name + WEIGHTS_SUFFIX: tf.reduce_sum(weights)}


def _one_local_replica(strategy) -> bool:
  """Whether this process runs one replica (default strategy, or one
  device per worker), so that a batch is plain tensors, not PerReplica."""
  if strategy.num_replicas_in_sync == 1:
    return True
  return len(strategy.extended.worker_devices) == 1


def _schedules(task, optimizers: dict, asynchronous: bool) -> dict:
  """name -> N of every optimizer with Task.update_every(name) = N > 1."""
  every = {}
  for name in optimizers:
    n = task.update_every(name)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
      raise UserError(
          f"{type(task).__name__}.update_every({name!r}) returned {n!r}: "
          "return a whole number N >= 1 (the optimizer applies on every "
          "N-th update).")
    if n > 1:
      every[name] = int(n)
  if every and asynchronous:
    name, n = next(iter(every.items()))
    raise UserError(
        f"update_every({name!r}) = {n} is not available under "
        "--strategy=parameter_server: workers apply their updates "
        "asynchronously, with no shared update count to take turns on; use "
        "--strategy=mirrored or multiworker.")
  return every


def _ema_sources(models: dict) -> list:
  """The weights --ema_decay averages, in the order of EMA.averages."""
  return [v for m in models.values() for v in m.trainable_variables]


def make_ema(strategy, models: dict, decay: float):
  """--ema_decay's averages of every model's trainable weights, or None."""
  if not decay:
    return None
  with strategy.scope():
    return ema_lib.EMA(_ema_sources(models), decay)
