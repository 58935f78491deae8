"""The step context: what a `Task.train_step(batch, ctx)` is given.

A train_step runs in replica context on ONE micro-batch (this replica's
rows of it), inside the framework's tf.function. It computes losses and
hands gradients to the context; the framework does the rest, identically
for the built-in step and for a user's:

  * loss scaling: `ctx.scale_loss(per_example)` divides the (weighted) sum
    by the GLOBAL batch of the whole update (all replicas, all
    --grad_accum_steps micro-batches) and adds the model's regularization
    losses, so that SUMMING gradients over replicas and micro-batches gives
    the mean gradient of the global batch;
  * `ctx.apply_gradients(grads, optimizer)` / `ctx.minimize(tape, loss,
    optimizer)`: the gradients of each named optimizer are accumulated in
    replica-local buffers over the micro-batches of the update, then
    all-reduced ONCE per optimizer per update, checked for NaN/Inf
    together (a non-finite gradient of ANY optimizer drops the WHOLE
    update, never half of it), and applied;
  * every optimizer's update is applied at the END of the update, in the
    order the step first handed it gradients. So every gradient of an
    update (of every optimizer, in every micro-batch) is taken at the
    weights as they were when the update began: a GAN's generator step
    sees the discriminator of the start of the update (simultaneous
    updates), whatever --grad_accum_steps is. The result therefore does
    not depend on K, nor on the number of replicas or workers;
  * `ctx.all_gather(x)`: the rows of every replica, in global batch order
    (the same tensor on every topology), e.g. for contrastive negatives;
    differentiable (its gradient is one more all-reduce);
  * `ctx.uniform(shape)` / `ctx.normal(shape)`: per-example stateless
    random draws keyed by the run seed and the example's stream position,
    so a resumed or re-split run (replicas, workers, --grad_accum_steps)
    draws the same numbers for each example; (layers.Dropout inside the
    step is seeded per micro-batch: the same across replicas, workers and
    resumes, not across --grad_accum_steps);
  * the returned dict: per-example metrics ([local batch] tensors, or
    scalars meaning a per-example mean), reported as train/<name> like
    `loss`, as means over all examples (padding rows have weight 0).
"""

import tensorflow as tf

from layers import seeds as layer_seeds
from trainer.errors import UserError


class StepContext:
  """Handed to Task.train_step / Task.eval_step. Built per replica call."""

  def __init__(self, steps, meta, training: bool):
    self._steps = steps
    self._meta = meta
    self.training = training
    self.handed = {}      # optimizer name -> (gradients, scaled loss)

  # ---- what the step works on ------------------------------------------
  @property
  def models(self) -> dict:
    """Every model of the task by name ({"model": m} for a single model)."""
    return self._steps.models

  @property
  def model(self):
    """The task's main model: the only one, or the one named "model"."""
    return self._steps.main_model()

  @property
  def weight(self) -> tf.Tensor:
    """float32 [local batch]: 1 for real examples, 0 for padding."""
    return self._meta["weight"]

  @property
  def positions(self) -> tf.Tensor:
    """int64 [local batch]: each example's position in the training stream."""
    return self._meta["pos"]

  @property
  def seed(self) -> tf.Tensor:
    """int64 [2] stateless seed of this global micro-batch: (run seed,
    stream position of its first example). Fold in a salt per draw."""
    return tf.stack([tf.constant(self._steps.seed, tf.int64),
                     self._meta["start"][0]])

  @property
  def replica_id(self) -> tf.Tensor:
    return tf.distribute.get_replica_context().replica_id_in_sync_group

  @property
  def num_replicas(self) -> int:
    return self._steps.strategy.num_replicas_in_sync

  @property
  def global_batch_size(self) -> int:
    """Examples of the whole update (all replicas and micro-batches)."""
    return self._steps.update_batch

  # ---- randomness --------------------------------------------------------
  def _rows(self, draw, salt: int, row_shape, dtype):
    """This replica's rows of a draw over the whole UPDATE (all its
    micro-batches), keyed by the update's first position: an example gets
    the same numbers whatever --grad_accum_steps and replica or worker
    count (a draw per micro-batch would change with K). Positions start
    at 0 and advance by the update's batch, so the update begins at the
    multiple below; 2x rows cover an offset left by a resume with another
    --global_batch_size."""
    update = self._steps.update_batch
    start = self._meta["start"][0]
    update_start = start - start % update
    seed = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(self._steps.seed, tf.int64), update_start]),
        salt + 1000)
    full = draw([2 * update, *row_shape], seed=seed, dtype=dtype)
    positions = self._meta["pos"]
    first = tf.cast(positions[0] - update_start, tf.int32)
    rows = tf.shape(positions)[0]
    mine = full[first:first + rows]
    # The slice's bounds are tensors, so its batch dimension comes out
    # unknown; give back the local batch's static size where there is one.
    # Models traced on an unknown batch dimension ran the GAN example's
    # step ~10% slower on CPU (bench.paired --gan: 0.84 -> 0.94-0.95).
    mine.set_shape(positions.shape[:1].concatenate(full.shape[1:]))
    return mine

  def uniform(self, row_shape, salt: int = 0, dtype=tf.float32):
    """U[0,1) of shape [local batch, *row_shape], the same for each example
    on every topology and after a resume. Use a different salt per draw."""
    return self._rows(tf.random.stateless_uniform, salt, row_shape, dtype)

  def normal(self, row_shape, salt: int = 0, dtype=tf.float32):
    """N(0,1) draws, per example, like uniform()."""
    return self._rows(tf.random.stateless_normal, salt, row_shape, dtype)

  # ---- losses and gradients ----------------------------------------------
  def scale_loss(self, per_example, model=None) -> tf.Tensor:
    """sum(per_example * weight) / global batch of the update, plus the
    regularization losses of `model` (scaled by replicas and micro-batches,
    so that they count once per update). Differentiate this."""
    per_example = tf.cast(per_example, tf.float32)
    loss = tf.reduce_sum(per_example * self.weight) / self._steps.update_batch
    if model is not None and model.losses:
      reg = tf.add_n([tf.cast(l, tf.float32) for l in model.losses])
      loss += tf.nn.scale_regularization_loss(reg) / self._steps.accum_steps
    return loss

  def variables(self, optimizer: str | None = None) -> list:
    """The variables `optimizer` updates (Task.optimizer_variables)."""
    return self._steps.optimizer_variables[self._steps.optimizer_name(
        optimizer)]

  def gradients(self, tape, loss, optimizer: str | None = None) -> list:
    """d loss / d variables(optimizer) (zeros where there is no path);
    under --mixed_precision=mixed_float16 the loss is scaled here and the
    gradients unscaled after the reduction."""
    variables = self.variables(optimizer)
    scale = self._steps.loss_scale()
    grads = self._steps.differentiate(tape, loss, variables, scale)
    return [tf.zeros(v.shape, tf.float32) if g is None
            else tf.convert_to_tensor(g, tf.float32)
            for g, v in zip(grads, variables)]

  def apply_gradients(self, gradients, optimizer: str | None = None,
                      loss=None) -> None:
    """Hands this micro-batch's gradients of variables(optimizer) to the
    framework (see the module doc for when they are applied). `loss`: the
    scaled loss they came from, checked for NaN/Inf with them."""
    if not self.training:
      raise UserError("apply_gradients called in an evaluation step.")
    name = self._steps.optimizer_name(optimizer)
    variables = self.variables(name)
    gradients = list(gradients)
    if len(gradients) != len(variables):
      raise UserError(
          f"apply_gradients({name!r}): {len(gradients)} gradients for "
          f"{len(variables)} variables; pass one per ctx.variables({name!r}).")
    if name in self.handed:
      raise UserError(f"apply_gradients({name!r}) called twice in one step; "
                      "add the gradients first (one hand-over per optimizer).")
    loss = tf.zeros([], tf.float32) if loss is None else tf.cast(loss,
                                                                 tf.float32)
    self.handed[name] = ([tf.convert_to_tensor(g, tf.float32)
                          for g in gradients], loss)

  def minimize(self, tape, loss, optimizer: str | None = None) -> None:
    """apply_gradients(gradients(tape, loss, optimizer), optimizer, loss)."""
    self.apply_gradients(self.gradients(tape, loss, optimizer), optimizer,
                         loss)

  # ---- across replicas ---------------------------------------------------
  def all_gather(self, value, axis: int = 0):
    """Concatenation of `value` from every replica along `axis`, in replica
    order, which is global batch order: the same on every topology."""
    if self._steps.is_parameter_server:
      raise UserError(
          "ctx.all_gather is not available under --strategy=parameter_server "
          "(workers do not step together); use --strategy=mirrored or "
          "multiworker.")
    context = tf.distribute.get_replica_context()
    if isinstance(self._steps.strategy,
                  tf.distribute.MultiWorkerMirroredStrategy):
      return tf.nest.map_structure(
          lambda x: _gather_by_sum(context, x, axis), value)
    return context.all_gather(value, axis)


def _gather_by_sum(context, value, axis: int):
  """all_gather as an all-reduce: each replica puts its rows in its own
  block of zeros, the SUM is every replica's rows in replica order. Used
  under multi-worker, where TF 2.21's ReplicaContext.all_gather fails at
  trace time ("ValueError: destinations can not be empty"). Exact (one
  non-zero term per element) and differentiable (the all-reduce's
  gradient is an all-reduce). Needs the same shape on every replica,
  which the step has (global batch divisible by the replicas)."""
  value = tf.convert_to_tensor(value)
  replicas = context.num_replicas_in_sync
  mine = tf.one_hot(context.replica_id_in_sync_group, replicas,
                    dtype=value.dtype)
  mine = tf.reshape(mine, [replicas] + [1] * value.shape.rank)
  summed = context.all_reduce(tf.distribute.ReduceOp.SUM,
                              mine * value[None])
  return tf.concat(tf.unstack(summed, num=replicas), axis=axis)


def seeds_scope(steps, meta):
  """The per-example seeds layers.Dropout reads inside a step."""
  seeds = layer_seeds.ExampleSeeds(
      seed=tf.stack([tf.constant(steps.seed, tf.int64), meta["start"][0]]),
      offset=meta["pos"][0] - meta["start"][0],
      # From the config: under multi-worker the local batch dimension is
      # not static. Random draws happen only in training (micro-batches).
      global_batch=steps.micro_batch)
  return layer_seeds.scope(seeds)

