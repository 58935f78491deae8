"""An embedding table for raw ids: hashed into a fixed number of rows,
looked up so that the gradient stays sparse (tf.IndexedSlices: only the
rows of the batch), and combined over multi-valued features."""

import keras
import tensorflow as tf

COMBINERS = ("sum", "mean", "sqrtn")

# splitmix64's finaliser: every bit of the id moves every bit of the hash,
# so ids sharing a stride with the table size still spread over all rows.
_SHIFTS = (30, 27, 31)
_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def hash_ids(ids, num_rows: int):
  """Row numbers in [0, num_rows) (int64) for raw ids of any value: strings
  by FarmHash64 (tf.strings.to_hash_bucket_fast), integers (negative or
  beyond the table included) by splitmix64's finaliser of their 64-bit
  two's complement, modulo num_rows. Works on tensors and RaggedTensors."""
  if isinstance(ids, tf.RaggedTensor):
    return tf.ragged.map_flat_values(hash_ids, ids, num_rows)
  if ids.dtype == tf.string:
    return tf.strings.to_hash_bucket_fast(ids, num_rows)
  if not ids.dtype.is_integer:
    raise TypeError(f"hash_ids takes integer or string ids, not {ids.dtype}.")
  z = tf.bitcast(tf.cast(ids, tf.int64), tf.uint64)
  for shift, multiplier in zip(_SHIFTS, _MULTIPLIERS):
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(
        z, tf.constant(shift, tf.uint64)))
    z = z * tf.constant(multiplier, tf.uint64)
  z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(
      z, tf.constant(_SHIFTS[-1], tf.uint64)))
  return tf.cast(tf.math.floormod(z, tf.constant(num_rows, tf.uint64)),
                 tf.int64)


def lookup(table, ids):
  """The rows `ids` of `table` (a tf.Variable, or a ShardedVariable under
  parameter servers), in the order of `ids`; its gradient is IndexedSlices.
  A ShardedVariable is looked up through its list of shards (TF's "div"
  split, the one ShardedVariable uses), each shard's rows gathered on its
  own ps: handed to tf.nn.embedding_lookup as itself, it is converted to
  ONE tensor, a concat of every shard, whenever the lookup runs eagerly
  (TF's dispatch to its sharded lookup works only while tracing, as
  sharded_variable.py says), which pulled the whole table into the
  coordinator (measured: +1.2 GB for a 4,000,000 x 32 table, to look up
  one id from a model built by calling it). Duck-typed (`variables`, a
  list of shards) to keep TF's internal class out of this package."""
  shards = getattr(table, "variables", None)
  if isinstance(shards, (list, tuple)) and not isinstance(
      table, (tf.Variable, tf.Module)):
    table = list(shards)
  return tf.nn.embedding_lookup(table, ids)


class Embedding(keras.layers.Layer):
  """A num_rows x dim table looked up by id.

  Inputs: ids of shape [batch] or [batch, n] (integers, or strings when
  hashed), or a tf.RaggedTensor [batch, (n)] of a multi-valued feature
  (e.g. a user's history). hashed=True (default) maps any id into the table
  by `hash_ids`, so an out-of-vocabulary, negative or huge id never fails a
  step (distinct ids may share a row); hashed=False takes ids that already
  are row numbers in [0, num_rows).

  combiner=None: one vector per id, shape ids.shape + [dim] (ragged in,
  ragged out). combiner="sum" | "mean" | "sqrtn": one vector per example,
  [batch, dim], over its ids (a RaggedTensor's row, or the entries of a
  padded [batch, n] tensor where `mask` is True); an example without ids
  gives zeros.

  Only the looked-up rows are read, so the table's gradient is a
  tf.IndexedSlices of those rows (padding is never looked up): with
  trainer.optim.LazyAdam / Adagrad / LazyMomentum an update touches only
  them. Under parameter servers a large table is sharded like any variable.
  """

  def __init__(self, num_rows: int, dim: int, hashed: bool = True,
               combiner=None, embeddings_initializer="uniform", **kwargs):
    super().__init__(**kwargs)
    if int(num_rows) != num_rows or num_rows < 1:
      raise ValueError(f"Embedding(num_rows={num_rows}): need an integer "
                       ">= 1 (the table's fixed number of rows).")
    if int(dim) != dim or dim < 1:
      raise ValueError(f"Embedding(dim={dim}): need an integer >= 1.")
    if combiner is not None and combiner not in COMBINERS:
      raise ValueError(f"Embedding(combiner={combiner!r}): use None or one "
                       f"of {', '.join(COMBINERS)}.")
    self.num_rows, self.dim = int(num_rows), int(dim)
    self.hashed, self.combiner = bool(hashed), combiner
    self.embeddings_initializer = keras.initializers.get(
        embeddings_initializer)
    # The lookup casts to the compute dtype itself; the table stays in the
    # variable dtype (float32 under mixed precision).
    self.autocast = False

  def build(self, input_shape=None):
    del input_shape
    self.embeddings = self.add_weight(
        shape=(self.num_rows, self.dim),
        initializer=self.embeddings_initializer, name="embeddings")

  def rows(self, ids):
    """The table rows of `ids` (int64; same structure as `ids`)."""
    if self.hashed:
      return hash_ids(ids, self.num_rows)
    if ids.dtype == tf.string or not ids.dtype.is_integer:
      raise ValueError(f"Embedding(hashed=False) takes integer row numbers, "
                       f"not {ids.dtype} ids: use hashed=True for raw ids.")
    return tf.cast(ids, tf.int64)

  def _lookup(self, rows):
    # The variable's own value (not a dense read of it) so the gradient is
    # IndexedSlices.
    return tf.cast(lookup(self.embeddings.value, rows), self.compute_dtype)

  def call(self, ids, mask=None):
    ragged = isinstance(ids, tf.RaggedTensor)
    if not ragged:
      ids = tf.convert_to_tensor(ids)
    rows = self.rows(ids)
    if self.combiner is None:
      if mask is not None:
        raise ValueError("Embedding: a mask needs a combiner; without one "
                         "pass the valid ids as a tf.RaggedTensor.")
      if ragged:
        return tf.ragged.map_flat_values(self._lookup, rows)
      return self._lookup(rows)
    if not ragged:
      if rows.shape.rank == 1:
        rows = rows[:, None]
      rows = (tf.RaggedTensor.from_tensor(rows) if mask is None else
              tf.ragged.boolean_mask(rows, tf.cast(mask, tf.bool)))
    vectors = self._lookup(rows.flat_values)
    sums = tf.math.unsorted_segment_sum(vectors, rows.value_rowids(),
                                        rows.nrows())
    if self.combiner == "sum":
      return sums
    counts = tf.cast(tf.maximum(rows.row_lengths(), 1), sums.dtype)[:, None]
    return sums / (counts if self.combiner == "mean" else tf.sqrt(counts))

  def compute_mask(self, ids, mask=None):
    # A combined output has one vector per example: nothing left to mask
    # (and defining this tells Keras the layer consumes a mask).
    del ids, mask

  def get_config(self):
    return {**super().get_config(), "num_rows": self.num_rows,
            "dim": self.dim, "hashed": self.hashed,
            "combiner": self.combiner,
            "embeddings_initializer": keras.initializers.serialize(
                self.embeddings_initializer)}
