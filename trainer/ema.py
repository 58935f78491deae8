"""--ema_decay: an exponential moving average of the trainable weights.

    ema <- decay * ema + (1 - decay) * weights      after every applied update

The averages start at the initial weights, live next to them (mirrored: the
same value on every replica, updated in cross-replica context from the
already identical weights, so no communication), are checkpointed under
`ema`, and are swapped into the model(s) for evaluation and export.
"""

import contextlib

import tensorflow as tf


class EMA(tf.Module):
  """Averages of `variables`. Create inside strategy.scope()."""

  def __init__(self, variables, decay: float):
    super().__init__(name="ema")
    self.decay = decay
    self._sources = list(variables)
    self.averages = [
        tf.Variable(tf.convert_to_tensor(v), trainable=False,
                    name=f"ema_{i}",
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        for i, v in enumerate(self._sources)]

  def update(self):
    """One step of the average (cross-replica context, or no strategy)."""
    decay = tf.constant(self.decay, tf.float32)
    for average, source in zip(self.averages, self._sources):
      value = tf.cast(tf.convert_to_tensor(source), average.dtype)
      average.assign(decay * average + (1.0 - decay) * value)

  def _copy(self, to_model: bool):
    for average, source in zip(self.averages, self._sources):
      if to_model:
        source.assign(tf.cast(tf.convert_to_tensor(average), source.dtype))
      else:
        average.assign(tf.cast(tf.convert_to_tensor(source), average.dtype))

  def swap_in(self):
    """The averages in place of the weights, for good (eagerly): a model
    loaded from a checkpoint for use, as evaluation sees it."""
    self._copy(to_model=True)

  @contextlib.contextmanager
  def swapped_in(self):
    """The averages in place of the weights inside the block (eagerly)."""
    saved = [tf.identity(tf.convert_to_tensor(s)) for s in self._sources]
    self._copy(to_model=True)
    try:
      yield
    finally:
      for source, value in zip(self._sources, saved):
        source.assign(value)
