"""Optimizers for embedding tables: a sparse (tf.IndexedSlices) gradient
updates only the rows it touches, in the variable and in its slots.

Lazy semantics (TF1's LazyAdamOptimizer, TF Addons' LazyAdam): a row that
no example of the update looked up is left exactly as it is, bits and all:
no moment decay, no momentum step. A dense gradient (every other variable)
gets the ordinary rule on TF's fused kernel. Repeated indices in one
gradient are summed first, so each row gets exactly one update.

  LazyAdam      touched rows: Adam with the bias correction of the
                optimizer's global iteration count; untouched rows: nothing.
                Differs from dense Adam, which keeps decaying every row's
                moments and moving rows with non-zero momentum: the choice
                is the user's (--optimizer=adam stays dense).
  Adagrad       keras.optimizers.Adagrad's rule; a zero gradient changes
                nothing under Adagrad, so lazy and dense agree exactly.
  LazyMomentum  touched rows: Keras SGD momentum (Nesterov optional);
                untouched rows keep their momentum and do not move (dense
                momentum would keep moving them).
"""

import keras
import tensorflow as tf

from layers import embedding
from trainer import compat


# ---- row maths: pure functions on the touched rows -----------------------
def adam_rows(var, m, v, g, alpha, beta_1, beta_2, epsilon):
  """Adam on a block of rows; alpha = lr * sqrt(1 - beta_2^t) /
  (1 - beta_1^t). The form of TF's ResourceApplyAdam kernel (Keras' Adam)."""
  m = m + (g - m) * (1 - beta_1)
  v = v + (g * g - v) * (1 - beta_2)
  return var - alpha * m / (tf.sqrt(v) + epsilon), m, v


def adagrad_rows(var, acc, g, lr, epsilon):
  """keras.optimizers.Adagrad on a block of rows."""
  acc = acc + g * g
  return var - lr * g / tf.sqrt(acc + epsilon), acc


def momentum_rows(var, mom, g, lr, momentum, nesterov: bool):
  """Keras SGD with momentum on a block of rows (the form of TF's
  ResourceSparseApplyKerasMomentum kernel)."""
  mom = mom * momentum - lr * g
  step = mom * momentum - lr * g if nesterov else mom
  return var + step, mom


def unique_rows(gradient: tf.IndexedSlices):
  """(indices, values) of `gradient` with every row once, repeated rows'
  values summed: a row updated twice would decay its moments twice."""
  indices, position = tf.unique(gradient.indices)
  values = tf.math.unsorted_segment_sum(gradient.values, position,
                                        tf.shape(indices)[0])
  return indices, values


# ---- reading and writing rows --------------------------------------------
def _tf_variable(variable):
  return variable.value if isinstance(variable, keras.Variable) else variable


def read_rows(variable, indices):
  """Rows of a Keras or tf variable. Through the resource handle: inside
  strategy.extended.update that is the current device's copy of a mirrored
  variable. A ShardedVariable (parameter servers) reads from its shards
  (each shard's rows on its own ps task)."""
  variable = _tf_variable(variable)
  if compat.is_sharded(variable):
    # Not ShardedVariable.sparse_read: it returns the rows grouped by
    # shard, not in the order of `indices`.
    return embedding.lookup(variable, indices)
  return tf.raw_ops.ResourceGather(resource=variable.handle, indices=indices,
                                   dtype=variable.dtype)


def write_rows(variable, indices, rows):
  """Overwrites rows of a Keras or tf variable (see read_rows)."""
  variable = _tf_variable(variable)
  if compat.is_sharded(variable):
    return variable.scatter_update(tf.IndexedSlices(rows, indices))
  return tf.raw_ops.ResourceScatterUpdate(resource=variable.handle,
                                          indices=indices, updates=rows)


def apply_rows(rule, gradient: tf.IndexedSlices, variable, slots, *scalars):
  """Applies `rule(var_rows, *slot_rows, grad_rows, *scalars) -> (var_rows,
  *slot_rows)` to the rows `gradient` touches, once per row."""
  indices, values = unique_rows(gradient)
  targets = (variable, *slots)
  rows = [read_rows(t, indices) for t in targets]
  new = rule(*rows, tf.cast(values, rows[0].dtype), *scalars)
  return tf.group([write_rows(t, indices, r) for t, r in zip(targets, new)])


def _handle(variable):
  return _tf_variable(variable).handle


# ---- the optimizers -------------------------------------------------------
class LazyAdam(keras.optimizers.Adam):
  """Adam; a tf.IndexedSlices gradient updates only its rows of the
  variable and of m and v (lazy: see the module docstring). Dense
  gradients: keras.optimizers.Adam. Same arguments, without amsgrad."""

  def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999,
               epsilon=1e-7, amsgrad=False, name="lazy_adam", **kwargs):
    if amsgrad:
      raise ValueError("LazyAdam(amsgrad=True) is not supported: use "
                       "keras.optimizers.Adam(amsgrad=True), or amsgrad=False.")
    super().__init__(learning_rate=learning_rate, beta_1=beta_1,
                     beta_2=beta_2, epsilon=epsilon, name=name, **kwargs)

  def update_step(self, gradient, variable, learning_rate):
    dtype = variable.dtype
    cast = lambda x: tf.cast(x, dtype)  # noqa: E731
    step = tf.cast(self.iterations + 1, tf.float32)
    beta_1_power = cast(tf.pow(tf.cast(self.beta_1, tf.float32), step))
    beta_2_power = cast(tf.pow(tf.cast(self.beta_2, tf.float32), step))
    m = compat.slot(self, "_momentums", variable)
    v = compat.slot(self, "_velocities", variable)
    lr = cast(learning_rate)
    if isinstance(gradient, tf.IndexedSlices):
      alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
      return apply_rows(adam_rows, gradient, variable, (m, v), alpha,
                        cast(self.beta_1), cast(self.beta_2),
                        cast(self.epsilon))
    if compat.is_sharded(variable):
      return super().update_step(gradient, variable, learning_rate)
    return tf.raw_ops.ResourceApplyAdam(
        var=_handle(variable), m=_handle(m), v=_handle(v),
        beta1_power=beta_1_power, beta2_power=beta_2_power, lr=lr,
        beta1=cast(self.beta_1), beta2=cast(self.beta_2),
        epsilon=cast(self.epsilon), grad=cast(gradient))


class Adagrad(keras.optimizers.Adagrad):
  """keras.optimizers.Adagrad; a tf.IndexedSlices gradient updates only its
  rows of the variable and of the accumulator (the same result as the dense
  rule, which leaves zero-gradient rows unchanged, at O(rows) cost). Not
  TF's ResourceSparseApplyAdagradV2: it divides by sqrt(acc) + epsilon,
  Keras 3 by sqrt(acc + epsilon)."""

  def update_step(self, gradient, variable, learning_rate):
    if not isinstance(gradient, tf.IndexedSlices):
      return super().update_step(gradient, variable, learning_rate)
    dtype = variable.dtype
    return apply_rows(adagrad_rows, gradient, variable,
                      (compat.slot(self, "_accumulators", variable),),
                      tf.cast(learning_rate, dtype),
                      tf.cast(self.epsilon, dtype))


class LazyMomentum(keras.optimizers.SGD):
  """SGD with momentum (Keras' rule, Nesterov optional); a tf.IndexedSlices
  gradient updates only its rows of the variable and of the momentum (lazy:
  see the module docstring). Dense gradients: keras.optimizers.SGD."""

  def __init__(self, learning_rate=0.01, momentum=0.9, nesterov=False,
               name="lazy_momentum", **kwargs):
    if not 0.0 < momentum <= 1.0:
      raise ValueError(f"LazyMomentum(momentum={momentum}) needs 0 < "
                       "momentum <= 1; for plain SGD use "
                       "keras.optimizers.SGD.")
    super().__init__(learning_rate=learning_rate, momentum=momentum,
                     nesterov=nesterov, name=name, **kwargs)

  def update_step(self, gradient, variable, learning_rate):
    dtype = variable.dtype
    lr = tf.cast(learning_rate, dtype)
    momentum = tf.cast(self.momentum, dtype)
    accum = compat.slot(self, "momentums", variable)
    sparse = isinstance(gradient, tf.IndexedSlices)
    if compat.is_sharded(variable):
      if not sparse:
        return super().update_step(gradient, variable, learning_rate)
      return apply_rows(momentum_rows, gradient, variable, (accum,), lr,
                        momentum, self.nesterov)
    if sparse:
      indices, values = unique_rows(gradient)
      return tf.raw_ops.ResourceSparseApplyKerasMomentum(
          var=_handle(variable), accum=_handle(accum), lr=lr,
          grad=tf.cast(values, dtype), indices=indices, momentum=momentum,
          use_nesterov=self.nesterov)
    return tf.raw_ops.ResourceApplyKerasMomentum(
        var=_handle(variable), accum=_handle(accum), lr=lr,
        grad=tf.cast(gradient, dtype), momentum=momentum,
        use_nesterov=self.nesterov)
