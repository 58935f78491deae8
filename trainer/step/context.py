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
  * `ctx.updates(name)`: whether optimizer `name` applies this update
    (Task.update_every(name) = N: the N-th, 2N-th, ... only); a bool
    tensor, e.g. to skip the generator's loss with tf.cond on the others
    (its gradients are dropped there anyway);
  * `ctx.all_gather(x)`: the rows of every replica, in global batch order
    (the same tensor on every topology), e.g. for contrastive negatives;
    differentiable (its gradient is one more all-reduce);
  * `ctx.uniform(shape)` / `ctx.normal(shape)`: per-example stateless
    random draws keyed by the run seed and the example's stream position,
    so a resumed or re-split run (replicas, workers, --grad_accum_steps)
    draws the same numbers for each example; (layers.Dropout inside the
    step is seeded per micro-batch: the same across replicas, workers and
    resumes, not across --grad_accum_steps);
  * `ctx.scale_loss(values, weights, mean_over="weights")`: the mean over
    the weights (e.g. real tokens) of the WHOLE update. Its gradient is
    kept apart, summed unnormalised over micro-batches with the weights'
    sum, and divided by the global total after the update's reduction, in
    which that total travels (see scale_loss);
  * gradients of embedding look-ups stay tf.IndexedSlices up to the
    optimizer (trainer.step.sparse);
  * the returned dict: per-example metrics ([local batch] tensors, or
    scalars meaning a per-example mean), reported as train/<name> like
    `loss`, as means over all examples (padding rows have weight 0); or
    a (values, weights) pair, reported as sum(values * weights) /
    sum(weights) over everything the report covers.
"""

import collections

import keras
import tensorflow as tf

from layers import seeds as layer_seeds
from trainer import compat
from trainer.errors import UserError
from trainer.step import sparse


@compat.plain_methods   # plain Python control flow: see compat.plain
class StepContext:
  """Handed to Task.train_step / Task.eval_step. Built per replica call."""

  def __init__(self, steps, meta, training: bool):
    self._steps = steps
    self._meta = meta
    self.training = training
    # optimizer name -> (gradients, scaled loss); the gradients list is
    # laid out as layouts[name] says (Steps.combine reads it).
    self.handed = {}
    self.layouts = {}     # name -> (has per-example part, weighted term ids)
    self.terms = []       # scale_loss(mean_over="weights") calls, in order
    self._pending = {}    # name -> {term id: gradients} until apply_gradients

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
  def scale_loss(self, values, weights=None, mean_over: str = "examples",
                 model=None) -> tf.Tensor:
    """The loss to differentiate, from per-example (or per-token) `values`.

    mean_over="examples": sum(values * weights) / the update's examples
    (all replicas, workers and micro-batches), i.e. the mean over the
    global batch; weights default to 1.
    mean_over="weights": the gradient applied is that of
    sum(values * weights) / sum(weights), both sums over the WHOLE update.
    That total is known only once every micro-batch has run, so this
    returns the micro-batch's UNNORMALISED sum(values * weights); the
    framework keeps its gradient apart and divides it by the total in the
    update's one reduction. Each such call is its own term, with its own
    total; other terms of the same loss keep their own normalisation.
    `weights` broadcast against `values` ([local batch, ...]); padding
    examples (ctx.weight 0) count in neither sum.
    `model`: its regularization losses are added, once per update. (A
    Keras model as second positional argument is taken as `model`.)"""
    if isinstance(weights, keras.layers.Layer) and model is None:
      weights, model = None, weights
    if mean_over not in ("examples", "weights"):
      raise UserError(f"scale_loss(mean_over={mean_over!r}): use "
                      "'examples' or 'weights'.")
    values = tf.cast(values, tf.float32)
    if weights is None and mean_over == "examples" and values.shape.rank <= 1:
      loss = tf.reduce_sum(values * self.weight) / self._steps.update_batch
    elif values.shape.rank == 0:
      raise UserError("scale_loss with weights: `values` must have the local "
                      "batch as first dimension (one value per example or "
                      "token), not a scalar.")
    else:
      if weights is None:
        if mean_over == "weights":
          raise UserError("scale_loss(mean_over='weights') needs `weights` "
                          "(e.g. the mask of real tokens).")
        weights = tf.ones_like(values)
      weights = self._example_weighted(tf.cast(weights, tf.float32), values)
      weighted = tf.reduce_sum(values * weights)
      if mean_over == "examples":
        loss = weighted / self._steps.update_batch
      else:
        loss = weighted
        self.terms.append(_Term(weighted, tf.reduce_sum(weights)))
    if model is not None and model.losses:
      reg = tf.add_n([tf.cast(l, tf.float32) for l in model.losses])
      if self._steps.shards:
        # Once per shard, so once per update on any topology.
        loss += reg / self._steps.shards
      else:
        loss += (tf.nn.scale_regularization_loss(reg) /
                 self._steps.accum_steps)
    return loss

  def _example_weighted(self, weights, values):
    """weights x ctx.weight (padding rows 0), broadcast to values' shape."""
    weights = tf.broadcast_to(weights, tf.shape(values))
    rows = tf.reshape(self.weight,
                      tf.concat([tf.shape(self.weight),
                                 tf.ones([values.shape.rank - 1], tf.int32)],
                                0))
    return weights * rows

  def variables(self, optimizer: str | None = None) -> list:
    """The variables `optimizer` updates (Task.optimizer_variables)."""
    return self._steps.optimizer_variables[self._steps.optimizer_name(
        optimizer)]

  def gradients(self, tape, loss, optimizer: str | None = None) -> list:
    """d loss / d variables(optimizer) (zeros where there is no path);
    under --mixed_precision=mixed_float16 the loss is scaled here and the
    gradients unscaled after the reduction. An embedding look-up's
    gradient stays a tf.IndexedSlices (the rows it touched).

    A loss with mean_over="weights" terms: those terms' gradients cannot
    be normalised before the update's total is known; the context keeps
    them (for apply_gradients of the same optimizer) and this returns the
    rest of the gradient, None where the rest has no path. A loss that is
    one such term (times constants) costs one backward pass; a loss that
    mixes terms costs one pass per term plus one, and needs
    tf.GradientTape(persistent=True)."""
    name = self._steps.optimizer_name(optimizer)
    variables = self.variables(name)
    scale = self._steps.loss_scale()
    terms, others = _terms_in(loss, self.terms)
    if not terms:
      grads = self._steps.differentiate(tape, loss, variables, scale)
      return _filled(grads, variables)
    if len(terms) == 1 and not others:
      grads = self._steps.differentiate(tape, loss, variables, scale)
      self._pending[name] = {terms[0]: _filled(grads, variables)}
      return [None] * len(variables)
    return self._split_gradients(tape, loss, name, variables, scale, terms)

  def _split_gradients(self, tape, loss, name, variables, scale, terms):
    """A loss mixing terms: each mean_over="weights" term's gradient (times
    its coefficient in the loss) kept apart; the rest returned."""
    weighted = [self.terms[j].weighted for j in terms]
    try:
      coefficients = [tf.stop_gradient(c) for c in
                      tape.gradient(loss, weighted)]
      seeds = [c if scale is None else c * scale for c in coefficients]
      pending = {j: _filled(self._steps.differentiate(tape, w, variables, s),
                            variables)
                 for j, w, s in zip(terms, weighted, seeds)}
      # The rest: d(loss - sum c_j term_j); the terms' paths cancel
      # exactly (c_j - c_j) where they join the loss.
      one = tf.ones([]) if scale is None else scale
      rest = self._steps.differentiate(tape, [loss] + weighted, variables,
                                       [one] + [-s for s in seeds])
    except RuntimeError as e:
      if "persistent" not in str(e):
        raise
      raise UserError(
          "a loss that mixes a scale_loss(mean_over='weights') term with "
          "other terms is differentiated once per term: record it with "
          "tf.GradientTape(persistent=True).") from None
    self._pending[name] = pending
    return _filled(rest, variables)

  def apply_gradients(self, gradients, optimizer: str | None = None,
                      loss=None) -> None:
    """Hands this micro-batch's gradients of variables(optimizer) to the
    framework (see the module doc for when they are applied). `loss`: the
    scaled loss they came from, checked for NaN/Inf with them. Gradients
    may be tf.IndexedSlices (kept sparse to the optimizer) or None (no
    path); a mean_over="weights" part kept by ctx.gradients joins them."""
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
    pending = self._pending.pop(name, {})
    terms = tuple(sorted(pending))
    flat = []
    by_example = bool(not pending or any(g is not None for g in gradients))
    if by_example:
      flat += _filled(gradients, variables)
    for j in terms:
      flat += pending[j]
    flat += [self.terms[j].total for j in terms]
    self.handed[name] = (flat, loss)
    self.layouts[name] = (by_example, terms)

  def minimize(self, tape, loss, optimizer: str | None = None) -> None:
    """apply_gradients(gradients(tape, loss, optimizer), optimizer, loss)."""
    self.apply_gradients(self.gradients(tape, loss, optimizer), optimizer,
                         loss)

  def updates(self, optimizer: str | None = None) -> tf.Tensor:
    """bool scalar tensor: optimizer `optimizer` applies at the end of this
    update, i.e. its 1-based number is a multiple of
    Task.update_every(optimizer) (always True when that is 1). The same on
    every replica and micro-batch of the update. Off its turn the
    gradients handed to it are dropped: the step may skip computing them,
    e.g. `tf.cond(ctx.updates("g"), g_gradients, zeros)` (hand over
    gradients either way: the step is traced once)."""
    return self._steps.updates(self._steps.optimizer_name(optimizer))

  # ---- across replicas ---------------------------------------------------
  def all_gather(self, value, axis: int = 0):
    """Concatenation of `value` from every replica along `axis`, in replica
    order, which is global batch order: the same on every topology."""
    kind = self._steps.all_gather_kind
    if self._steps.shards:
      raise UserError(
          "ctx.all_gather is not available under --deterministic=topology "
          "(each replica's step sees one virtual shard, and what it would "
          "gather depends on the topology); drop the flag, or use "
          "--deterministic.")
    if not kind:
      raise UserError(
          "ctx.all_gather is not available under --strategy=parameter_server "
          "(workers do not step together); use --strategy=mirrored or "
          "multiworker.")
    context = tf.distribute.get_replica_context()
    if kind == "by_sum":
      return tf.nest.map_structure(
          lambda x: compat.all_gather_by_sum(context, x, axis), value)
    return context.all_gather(value, axis)


# One mean_over="weights" term of a step: its unnormalised sum and the
# micro-batch's sum of weights (both replica-local).
_Term = collections.namedtuple("_Term", ["weighted", "total"])


@compat.plain
def _filled(gradients, variables) -> list:
  """float32 gradients, zeros where there is no path; slices stay slices."""
  return [tf.zeros(v.shape, tf.float32) if g is None else sparse.as_float32(g)
          for g, v in zip(gradients, variables)]


@tf.autograph.experimental.do_not_convert   # graph bookkeeping only
def _terms_in(loss, terms):
  """(ids of the weighted terms `loss` depends on, whether it also depends
  on variables other than through them), read from the traced graph."""
  if not terms:
    return [], True
  if tf.executing_eagerly() or not hasattr(loss, "op"):
    return list(range(len(terms))), True
  for j, term in enumerate(terms):
    if loss is term.weighted:
      return [j], False
  ids = {term.weighted.ref(): j for j, term in enumerate(terms)}
  found, others = set(), False
  seen, stack = set(), [loss]
  while stack:
    tensor = stack.pop()
    if tensor.ref() in ids:
      found.add(ids[tensor.ref()])
      continue
    op = tensor.op
    if op.name in seen:
      continue
    seen.add(op.name)
    for t in op.inputs:
      if t.dtype != tf.resource:
        stack.append(t)
      elif not op.type.startswith(_INPUT_OPS):
        others = True    # a variable read (or a control-flow op's capture)
  return sorted(found), others


# Ops that take an input pipeline's resource, not a variable's.
_INPUT_OPS = ("Iterator", "MultiDeviceIterator", "Optional")


def seeds_scope(steps, meta):
  """The per-example seeds layers.Dropout reads inside a step."""
  seeds = layer_seeds.ExampleSeeds(
      seed=tf.stack([tf.constant(steps.seed, tf.int64), meta["start"][0]]),
      offset=meta["pos"][0] - meta["start"][0],
      # From the config: under multi-worker the local batch dimension is
      # not static. Random draws happen only in training (micro-batches);
      # --deterministic=topology: over the step's one shard (its meta
      # "start" is the shard's first position).
      global_batch=(steps.update_batch // steps.shards if steps.shards
                    else steps.micro_batch))
  return layer_seeds.scope(seeds)

