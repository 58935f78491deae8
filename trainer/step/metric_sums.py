"""Replica-local running sums of metrics, reduced across replicas only when
read.

Every cross-replica reduction is a collective round trip (see tf-traps.md);
metrics therefore accumulate per replica and cost one reduction per summary.
"""

import tensorflow as tf

from trainer import compat
from trainer.reduce import reduce_per_replica

# A (values, weights) metric `m` keeps sum(values * weights) under `m` and
# sum(weights) under m + WEIGHTS_SUFFIX (a name no step can return: "#").
WEIGHTS_SUFFIX = "#weights"

# Room for the names a step reports; a user's train_step may return any
# metrics, registered when it is traced (no variable is created then).
CAPACITY = 64


@compat.plain_methods   # plain Python control flow: see compat.plain
class MetricSums:
  """Named float32 sums, one copy per replica (sync on read, SUM).

  All the sums live in ONE vector variable: an update adds them with one
  op (a step's metric bookkeeping is per-step overhead, measured in
  bench/), and a read is one packed reduction. Names given here are
  always reported; others join the first time a traced step adds them."""

  def __init__(self, strategy, names=()):
    self.names = list(names)
    self._strategy = strategy
    with strategy.scope():
      self._var = tf.Variable(
          tf.zeros([CAPACITY], tf.float32), trainable=False,
          name="sums", synchronization=tf.VariableSynchronization.ON_READ,
          aggregation=tf.VariableAggregation.SUM)
    self._read = tf.function(self._read_and_reset)

  @property
  def variables(self):
    return [self._var]

  def register(self, names) -> None:
    for name in names:
      if name not in self.names:
        if len(self.names) >= CAPACITY:
          raise ValueError(f"more than {CAPACITY} metrics: {self.names}")
        self.names.append(name)

  def pack(self, values: dict) -> tf.Tensor:
    """float32 [CAPACITY]: `values[name]` (scalars) at each name's index,
    0 elsewhere (names not seen before are registered)."""
    self.register(values)
    zero = tf.zeros([], tf.float32)
    packed = tf.stack([tf.cast(values[n], tf.float32) if n in values
                       else zero for n in self.names])
    return tf.pad(packed, [[0, CAPACITY - len(self.names)]])

  def add(self, values: dict):
    """Adds `values[name]` (scalars) to each sum; missing names add 0.
    Call in replica context."""
    self.add_packed(self.pack(values))

  def add_packed(self, packed):
    """Adds a pack() (replica context)."""
    self._var.assign_add(packed)

  def _local_read_and_reset(self):
    value = self._var.read_value()
    with tf.control_dependencies([value]):
      self._var.assign(tf.zeros_like(value))
    return tf.identity(value)

  def _read_and_reset(self):
    per_replica = self._strategy.run(self._local_read_and_reset)
    return reduce_per_replica(per_replica, self._strategy, "sum")

  def read_and_reset(self) -> dict:
    """Totals over all replicas since the last read; resets them to 0.
    Readers divide each total by "weight" (the examples, at least 1); a
    (values, weights) metric's total is given as its weighted mean times
    that divisor, so the division yields sum(values*weights)/sum(weights)
    (0 if no weight)."""
    values = self._read().numpy()
    sums = {n: float(v) for n, v in zip(self.names, values)}
    return weighted_means(sums)


def weighted_means(sums: dict) -> dict:
  """`sums` with each (values, weights) metric's pair of totals folded
  into one total that "divide by max(weight, 1)" turns into its mean."""
  out = {n: v for n, v in sums.items() if not n.endswith(WEIGHTS_SUFFIX)}
  divisor = max(sums.get("weight", 1.0), 1.0)
  for name, value in sums.items():
    if name.endswith(WEIGHTS_SUFFIX):
      metric = name[:-len(WEIGHTS_SUFFIX)]
      out[metric] = out[metric] / value * divisor if value else 0.0
  return out
