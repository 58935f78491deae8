"""Training state: everything a checkpoint must hold to decide the future."""

import tensorflow as tf

_FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA


def _counter(name, dtype=tf.int64, value=0):
  # Assigned only in cross-replica context (the loop body), identically on
  # every replica; ONLY_FIRST_REPLICA makes a replica-context write legal too.
  return tf.Variable(tf.constant(value, dtype), trainable=False, name=name,
                     aggregation=_FIRST)


class TrainState(tf.Module):
  """Counters next to the model and optimizer. Create inside strategy.scope().

  global_step: optimizer updates applied (our own: Keras' iterations is not
    atomic under parameter servers).
  position: examples of the training stream consumed; decides the next
    batch, and with it every dropout mask and augmentation (all are
    stateless functions of (seed, position)). No RNG state is needed.
  nonfinite_steps: updates dropped because of a NaN/Inf loss or gradient.
  last_bad_position: stream position of the newest such update (-1: none).
  loss_scale, good_steps: mixed_float16 dynamic loss scaling.
  """

  def __init__(self):
    super().__init__(name="train_state")
    self.global_step = _counter("global_step")
    self.position = _counter("position")
    self.nonfinite_steps = _counter("nonfinite_steps")
    self.last_bad_position = _counter("last_bad_position", value=-1)
    self.loss_scale = _counter("loss_scale", tf.float32, 2.0 ** 15)
    self.good_steps = _counter("good_steps")

  def variables_of_an_update(self) -> list:
    """Every counter an update may change (for the chunk's shadow copy)."""
    return [self.global_step, self.position, self.nonfinite_steps,
            self.last_bad_position, self.loss_scale, self.good_steps]
