"""Replica-local running sums, reduced across replicas only when read.

Every cross-replica reduction is a collective round trip (see tf-traps.md);
metrics therefore accumulate per replica and cost one reduction per summary.
"""

import tensorflow as tf


class Sums:
  """Named float32 sums, one copy per replica (sync on read, SUM)."""

  def __init__(self, strategy, names):
    self.names = list(names)
    self._strategy = strategy
    with strategy.scope():
      self._vars = [
          tf.Variable(0.0, trainable=False, name=f"sum_{n}",
                      synchronization=tf.VariableSynchronization.ON_READ,
                      aggregation=tf.VariableAggregation.SUM)
          for n in self.names]
    self._read = tf.function(self._read_and_reset)

  def add(self, values: dict):
    """Adds `values[name]` to each sum. Call in replica context."""
    for name, var in zip(self.names, self._vars):
      if name in values:
        var.assign_add(tf.cast(values[name], tf.float32))

  def _read_and_reset(self):
    def local():
      value = tf.stack([v.read_value() for v in self._vars])
      with tf.control_dependencies([value]):
        for v in self._vars:
          v.assign(0.0)
      return tf.identity(value)
    per_replica = self._strategy.run(local)
    # One packed reduction for all the sums.
    return self._strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                                 axis=None)

  def read_and_reset(self) -> dict:
    """Totals over all replicas since the last read; resets them to 0."""
    values = self._read().numpy()
    return {n: float(v) for n, v in zip(self.names, values)}
