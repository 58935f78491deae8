"""The one way a per-replica value becomes one value outside the replica
context, with its reduction named at the call site."""

import tensorflow as tf


@tf.autograph.experimental.do_not_convert   # no control flow on tensors
def reduce_per_replica(values, strategy, how: str):
  """`values` (a nest of per-replica values, as strategy.run returns) as
  one value:
  - "sum": summed over every replica (and worker): a collective under
    multi-worker, so every worker must call it alike;
  - "first": this process's first local copy, for a value that is already
    identical on every replica (a reduced gradient, a vote's result);
  - "concat": every local replica's value concatenated along axis 0, in
    replica order.

  >>> float(reduce_per_replica(tf.constant(3.0), tf.distribute.get_strategy(),
  ...                          "sum"))
  3.0
  """
  if how == "sum":
    return strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None)
  if how == "first":
    return tf.nest.map_structure(
        lambda v: strategy.experimental_local_results(v)[0], values)
  if how == "concat":
    return tf.nest.map_structure(
        lambda v: tf.concat(strategy.experimental_local_results(v), axis=0),
        values)
  raise ValueError(f"reduce_per_replica: how={how!r} is not one of "
                   "'sum', 'first', 'concat'.")
