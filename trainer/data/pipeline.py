"""The tf.data pipelines: a deterministic example stream, batched globally.

Training reads an endless stream of example positions p = 0, 1, 2, ...;
position p is example index_shuffle(p mod N, seed=(seed, p div N)) of the
split: epoch e's order is a pure function of (seed, e). Resuming at position
P starts the stream at P: no example before P is read or decoded. Batches are
GLOBAL micro-batches (all replicas together), so the sequence of global
batches does not depend on the number of replicas or workers.

On one machine the pipeline builds each whole global micro-batch and
experimental_distribute_dataset splits it across the local replicas. Under
multi-worker, each worker builds only its own rows (worker_train_dataset,
for distribute_datasets_from_function): with auto-sharding every worker
would gather, decode and preprocess the whole global batch and keep 1/W of
it, on cores its compute needs.
"""

import tensorflow as tf

from trainer import compat

_SHUFFLE_SALT = 0x5EED


@compat.plain
def example_indices(positions, num_examples: int, seed: int):
  """Stream positions (int64 [B]) -> example indices of the split."""
  n = tf.constant(num_examples, tf.int64)
  epoch = positions // n
  # One (seed, epoch, salt) triple per position: epochs differ, runs repeat.
  fill = lambda v: tf.fill(tf.shape(positions), tf.constant(v, tf.int64))  # noqa: E731
  seeds = tf.stack([fill(seed), epoch, fill(_SHUFFLE_SALT)], axis=-1)
  return compat.index_shuffle(positions % n, seeds, n - 1)


def _options(shard_policy) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # In-memory sets cannot shard by FILE; say DATA explicitly so that workers
  # take distinct slices of every global batch and no warning is logged
  # (OFF: a worker's own pipeline that must not be sharded again).
  options.experimental_distribute.auto_shard_policy = shard_policy
  return options


def train_dataset(task, split: str, batch_size: int, seed: int,
                  start_position: int):
  """Endless global micro-batches (features, labels, meta) from position
  `start_position` on. meta: pos int64 [B], start int64 [B], weight f32 [B],
  skipped f32 [B] (1: a damaged example, given weight 0 by preprocess)."""
  custom = task.own_train_dataset()
  if custom is not None:
    return _custom_train_dataset(custom, batch_size, seed, start_position)
  source = task.source(split)
  one = _rows_loader(task, source, seed)
  # A stream of batch STARTS, each widened to its positions in the map:
  # batching a stream of single positions cost one iterator call per
  # example (pipeline CPU per batch of 64 from memory: 0.18 -> 0.13 ms,
  # the hand-written from_tensor_slices loop's 0.11; bench.paired --gan).
  ds = _positions(start_position, batch_size).map(
      lambda start: one(start + tf.range(batch_size, dtype=tf.int64), start),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  group = batches_per_call(source, batch_size, ds.element_spec)
  if group > 1:
    # A parallel map's own cost per call (~0.05 ms) shared by the group's
    # batches: 0.15 -> 0.10 ms of CPU per batch of 64 (bench.paired --gan).
    ds = _positions(start_position, group * batch_size).map(
        _group_loader(task, source, seed, batch_size, group),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options(tf.data.experimental.AutoShardPolicy.DATA))


def worker_train_dataset(task, split: str, batch_size: int, seed: int,
                         start_position: int, num_replicas: int,
                         first_replica: int, local_replicas: int):
  """One worker's share of train_dataset's stream, for
  distribute_datasets_from_function: for each global micro-batch b (first
  position s_b), `local_replicas` consecutive per-replica batches; the one
  for global replica g holds positions s_b + g * B/R + [0, B/R). meta
  "start" stays s_b, so the row offset pos - start (dropout, augmentation)
  is the same as in the whole-batch pipeline."""
  rows = batch_size // num_replicas
  load = _rows_loader(task, task.source(split), seed)

  def piece(k):
    start = start_position + (k // local_replicas) * batch_size
    first = start + (first_replica + k % local_replicas) * rows
    return load(first + tf.range(rows, dtype=tf.int64), start)

  ds = _positions(0).map(piece, num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options(tf.data.experimental.AutoShardPolicy.OFF))


def _positions(start: int, step: int = 1):
  """start, start + step, ... without end. Its cardinality must be INFINITE,
  not merely huge (a `range` to 2**62 is finite): for a finite dataset under
  multi-worker, tf.distribute's iterator uses get_next_as_optional, which
  all-reduces a has-data flag across workers on EVERY batch, an extra
  collective per micro-batch (measured in-process, 2 pinned workers, the
  cnn: 49 vs 64 updates/s). Not `Dataset.counter`: it is a scan calling a
  function per position, ~1 ms of CPU per batch of 32 (0.06 here) on the
  cores the step runs on (the chunk ran at 0.84 of the raw loop with it,
  0.98 without, bench.paired-style A/B at cnn batch 32)."""
  return tf.data.Dataset.range(start, 2 ** 62, step).repeat()


# Several global batches a map call: at most this many, of this many rows
# together, each batch at most this many bytes as the map gives it. A call
# costs ~0.05 ms of CPU by itself; a group's batches are copied twice more
# (stacked, then unbatched), which for big batches costs more than the calls
# saved, and each batch of a group traces `preprocess` again. Measured,
# pipeline CPU per batch: digits 8x8 at 64 (18 KB a batch), four a call,
# 0.15 -> 0.10 ms; 28x28x1 at 32 (100 KB), eight a call, 0.107 -> 0.087; at
# 128 (400 KB), two a call, 0.16-0.21 -> 0.18-0.33.
_MAX_BATCHES_PER_CALL = 4
_ROWS_PER_CALL = 256
_BATCH_BYTES = 128 << 10


def batches_per_call(source, batch_size: int, element_spec) -> int:
  """Global batches one training map call loads. `element_spec`: of one
  batch as the one-batch map gives it (features, labels, meta). Several
  only when the source looks rows up in memory (nothing to read or decode,
  nothing that fails mid-stream) and every part of a batch is a dense
  tensor of static shape and small, else one."""
  if not source.in_memory:
    return 1
  batch_bytes = 0
  for spec in tf.nest.flatten(element_spec):
    if (type(spec) is not tf.TensorSpec or not spec.shape.is_fully_defined()
        or spec.dtype == tf.string):
      return 1   # tf.stack needs equal dense shapes; strings: a decode
    batch_bytes += spec.shape.num_elements() * spec.dtype.size
  if batch_bytes > _BATCH_BYTES:
    return 1
  return max(1, min(_MAX_BATCHES_PER_CALL, _ROWS_PER_CALL // batch_size))


@compat.plain
def _meta(positions, start, weight=None) -> dict:
  """The pipeline's meta of a batch's rows: stream positions int64 [b],
  its global micro-batch's first position, weights (default 1), skipped 0."""
  rows = positions.shape[0]
  return {"pos": positions,
          "start": tf.fill([rows], start),
          "weight": tf.ones([rows], tf.float32) if weight is None else weight,
          "skipped": tf.zeros([rows], tf.float32)}


@compat.plain
def _preprocessed(task, features, labels, positions, start):
  """(features, labels, meta) of one global micro-batch's rows (or a
  worker's share of them), `start` its first stream position."""
  meta = _meta(positions, start)
  features, labels = compat.user_code(task.preprocess)(features, labels,
                                                       meta, True)
  return features, labels, meta


def _rows_loader(task, source, seed: int):
  """positions (int64 [b]), start (int64: the global micro-batch's first
  position) -> (features, labels, meta) of those stream positions."""
  n = source.num_examples

  def load(positions, start):
    features, labels = source.gather(example_indices(positions, n, seed))
    return _preprocessed(task, features, labels, positions, start)
  return load


def _group_loader(task, source, seed: int, batch_size: int, group: int):
  """first (int64: a stream position) -> the `group` global micro-batches
  from `first` on, each leaf stacked [group, batch_size, ...]. One index
  shuffle and one gather for all of them; preprocess once per batch, since
  it draws its randomness per global batch."""
  n = source.num_examples

  def load(first):
    positions = first + tf.range(group * batch_size, dtype=tf.int64)
    features, labels = source.gather(example_indices(positions, n, seed))
    batches = []
    for i in range(group):
      rows = lambda t, i=i: t[i * batch_size:(i + 1) * batch_size]  # noqa: E731
      batches.append(_preprocessed(
          task, tf.nest.map_structure(rows, features),
          tf.nest.map_structure(rows, labels), rows(positions),
          first + i * batch_size))
    return tf.nest.map_structure(lambda *t: tf.stack(t), *batches)
  return load


def _custom_train_dataset(make, batch_size, seed, start_position):
  """A task's own pipeline: it yields global micro-batches (features,
  labels) starting at example position `start_position` (its contract for
  exact resume); the framework adds the meta."""
  ds = make(batch_size=batch_size, seed=seed, start_position=start_position)
  # Endless by contract; saying so keeps multi-worker iterators off the
  # per-batch has-data all-reduce (see _positions), and a stream that does
  # end fails with tf.data's "expected to contain infinite elements" error
  # instead of being silently repeated.
  ds = ds.apply(tf.data.experimental.assert_cardinality(
      tf.data.INFINITE_CARDINALITY))
  starts = _positions(start_position, batch_size)

  def add_meta(batch, start):
    features, labels = batch
    return features, labels, _meta(
        start + tf.range(batch_size, dtype=tf.int64), start)

  ds = tf.data.Dataset.zip((ds, starts)).map(add_meta)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(
      _options(tf.data.experimental.AutoShardPolicy.DATA))


def eval_dataset(task, split: str, batch_size: int):
  """Every example of `split` once, in order, padded to whole batches with
  weight-0 copies (static shapes on every replica; pads never count).
  Returns (dataset, number of batches, number of examples)."""
  source = task.source(split)
  n = source.num_examples
  num_batches = -(-n // batch_size)

  def load(positions):
    features, labels = source.gather(tf.minimum(positions, n - 1))
    meta = _meta(positions, positions[0], tf.cast(positions < n, tf.float32))
    features, labels = task.preprocess(features, labels, meta, False)
    return features, labels, meta

  ds = tf.data.Dataset.range(num_batches * batch_size)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  ds = ds.with_options(_options(tf.data.experimental.AutoShardPolicy.DATA))
  return ds, num_batches, n


def input_spec(task, split: str):
  """Spec of one preprocessed example's features (what build_model gets)."""
  custom = task.own_train_dataset()
  if custom is not None:
    features = custom(batch_size=1, seed=0, start_position=0).element_spec[0]
    return tf.nest.map_structure(
        lambda s: tf.TensorSpec(s.shape[1:], s.dtype), features)
  source = task.source(split)
  features, labels = source.gather(tf.zeros([1], tf.int64))
  meta = _meta(tf.zeros([1], tf.int64), tf.constant(0, tf.int64))
  features, _ = task.preprocess(features, labels, meta, False)
  return tf.nest.map_structure(
      lambda t: tf.TensorSpec(t.shape[1:], t.dtype), features)
