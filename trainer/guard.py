"""Non-finite updates, in one place: counting, the per-chunk shadow copy,
and the --nonfinite policy (skip, rollback, fail).

An update whose reduced gradient (of any optimizer) or loss is NaN/Inf is
dropped whole. Two ways to get there, with the same result (the step's
module doc says when each runs): a tf.cond per update, or a chunk run
unguarded from a shadow copy of every variable it changes, restored and
replayed guarded when one of its updates went bad.

The shadow is taken only where it pays (shadow_pays): with a row-wise
optimizer (trainer.optim.LazyAdam, Adagrad, LazyMomentum: embedding
tables) an update reads and writes the batch's rows only, while a shadow
would hold a second copy of every table and slot (memory 2x the weights
and slots) and copy all of it at each chunk's start. Such steps run the
per-update guard instead: no shadow, the same results, a tf.cond per update.
"""

from absl import logging
import tensorflow as tf

from trainer import compat, exitcodes
from trainer.sparse_optim import Adagrad, LazyAdam, LazyMomentum

# Optimizers whose sparse updates touch only the gradient's rows.
_ROW_WISE = (Adagrad, LazyAdam, LazyMomentum)

_LOSS_SCALE_PERIOD = 2000   # finite fp16 updates before the scale doubles


class NonFiniteError(Exception):
  """--nonfinite=fail, or --max_rollbacks exhausted."""
  exit_code = exitcodes.NONFINITE


@compat.plain
def count(state, ok, grads_finite, loss_finite, update_batch: int,
          fp16: bool) -> None:
  """Advances the counters after a guarded update (cross-replica context):
  the global step if applied, the stream position always; mixed_float16's
  loss scale."""
  start = state.position.read_value()
  state.global_step.assign_add(tf.cast(ok, tf.int64))
  state.position.assign_add(update_batch)
  if fp16:
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


def shadow_pays(optimizers) -> bool:
  """Whether a chunk's shadow copy is worth its memory: not when any of
  `optimizers` updates row-wise. A dense update already reads and writes
  every variable and slot, so copying them once per chunk is cheap next
  to it; a row-wise update touches O(batch) rows, its shadow O(table)."""
  return not any(isinstance(o, _ROW_WISE) for o in optimizers)


@compat.plain_methods   # plain Python control flow: see compat.plain
class ChunkShadow:
  """A copy of every variable a chunk changes, taken when it starts.

  Costs one assign per variable per chunk and one extra copy of the
  weights and slots in memory; buys a loop body with no cond."""

  def __init__(self, strategy, variables):
    self._strategy = strategy
    self._shared, self._local = variables

    def like(v, **kw):
      return tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                         name="shadow", **kw)
    with strategy.scope():
      self._shared_copies = [
          like(v, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
          for v in self._shared]
      self._local_copies = [
          like(v, synchronization=tf.VariableSynchronization.ON_READ,
               aggregation=tf.VariableAggregation.SUM) for v in self._local]
    self.restore = tf.function(lambda: self._copy(to_shadow=False))

  def save(self) -> None:
    """Inside the chunk's tf.function, before its first update."""
    self._copy(to_shadow=True)

  def _copy(self, to_shadow: bool):
    def pairs(variables, copies):
      return zip(copies, variables) if to_shadow else zip(variables, copies)
    # Keras variables and tf.Variables alike; a mirrored variable read in
    # cross-replica context gives its (identical) primary copy.
    for dst, src in pairs(self._shared, self._shared_copies):
      dst.assign(tf.convert_to_tensor(src))

    def copy_local():
      for dst, src in pairs(self._local, self._local_copies):
        dst.assign(tf.convert_to_tensor(src))
    self._strategy.run(copy_local)


def on_nonfinite(settings, state, checkpointer, record, bad: int,
                 bad_seen: int, rollbacks: int) -> int:
  """Acts on new non-finite updates by --nonfinite; returns 1 if it rolled
  back to the last checkpoint (and moved the stream past the bad batch).
  `settings`: the policy (nonfinite, max_rollbacks, global_batch_size);
  `record`: the run's identity, which the restore checks."""
  where = int(state.last_bad_position.numpy())
  step = int(state.global_step.numpy())
  logging.warning("%d non-finite update(s) dropped (latest at example "
                  "position %d); --nonfinite=%s.", bad - bad_seen, where,
                  settings.nonfinite)
  if settings.nonfinite == "fail":
    raise NonFiniteError(
        f"non-finite loss or gradient at example position {where} (step "
        f"{step}); the weights are unchanged. Use "
        "--nonfinite=skip or rollback to continue past it.")
  if settings.nonfinite == "skip":
    return 0
  if rollbacks >= settings.max_rollbacks:
    raise NonFiniteError(
        f"non-finite loss or gradient again after {rollbacks} rollback(s) "
        f"(--max_rollbacks={settings.max_rollbacks}); latest at example "
        f"position {where}. Lower --learning_rate or check the data.")
  restored = checkpointer.restore(record)
  # Move past the bad batch: the restored position would replay it.
  resume_at = max(int(state.position.numpy()),
                  where + settings.global_batch_size)
  state.position.assign(resume_at)
  state.nonfinite_steps.assign(bad)
  state.last_bad_position.assign(where)
  logging.warning("rolled back to %s (step %d); training resumes at example "
                  "position %d.", restored or "the current weights",
                  int(state.global_step.numpy()), resume_at)
  return 1
