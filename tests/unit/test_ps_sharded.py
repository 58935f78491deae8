"""Keras 3 variables held as ShardedVariables (what the parameter-server
partitioner makes of large ones): gradients, optimizer updates and
checkpoints, in one process (a variable creator shards like the ps tasks)."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sharded_variable():
  import keras
  import tensorflow as tf
  sharded = tf.__internal__.distribute.ShardedVariable

  def creator(next_creator, **kwargs):
    value = kwargs["initial_value"]
    value = tf.convert_to_tensor(value() if callable(value) else value)
    if value.shape.rank and value.shape[0] >= 2:
      parts = tf.split(value, _split(value.shape[0], count[0]))
      return sharded([
          next_creator(**{**kwargs, "initial_value": part, "shape": None})
          for part in parts])
    return next_creator(**{**kwargs, "initial_value": value})

  count = [2]

  def make(value, shards=2):
    count[0] = shards
    with tf.variable_creator_scope(creator):
      variable = keras.Variable(np.asarray(value, np.float32))
    assert isinstance(variable.value, sharded)
    return variable

  return make


def test_gradients_of_a_sharded_variable(sharded_variable):
  import keras
  import tensorflow as tf
  from trainer.compat import gradients as _gradients
  v = sharded_variable(np.arange(12).reshape(4, 3))
  plain = keras.Variable(np.ones(3, np.float32))
  x = tf.constant(np.arange(8, dtype=np.float32).reshape(2, 4))

  @tf.function
  def grads():
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.matmul(x, tf.convert_to_tensor(v)) *
                           tf.convert_to_tensor(plain))
    return _gradients(tape, loss, [v, plain])

  g_sharded, g_plain = grads()
  np.testing.assert_allclose(g_sharded, np.repeat(
      x.numpy().sum(0)[:, None], 3, axis=1))
  np.testing.assert_allclose(g_plain, (x.numpy() @ v.numpy()).sum(0))


def test_sgd_updates_a_sharded_variable(sharded_variable):
  import keras
  import tensorflow as tf
  from trainer import compat
  v = sharded_variable(np.ones((4, 3)))
  optimizer = compat.with_sharded_updates(
      keras.optimizers.SGD(learning_rate=0.5))
  optimizer.build([v])
  tf.function(lambda: optimizer.apply([tf.ones((4, 3))], [v]))()
  np.testing.assert_allclose(tf.convert_to_tensor(v), np.full((4, 3), 0.5))


def _stored_shapes(path, key):
  """The shapes the checkpoint stores `key` as: one per slice written."""
  import tensorflow as tf
  lines = tf.train.load_checkpoint(path).debug_string().split(b"\n")
  return [json.loads(line.rsplit(b" ", 1)[1]) for line in lines
          if key.encode() in line]


def _split(rows, shards):
  return [rows // shards + (1 if i < rows % shards else 0)
          for i in range(shards)]


def test_split_rows_follow_the_shards(sharded_variable):
  import keras
  from trainer import compat
  v = sharded_variable(np.zeros((7, 2)), shards=3)
  assert compat.save_sharded_by_shard([v, keras.Variable(1.0)]) == [v]
  assert [rows for _, rows in compat.shard_rows(v)] == [3, 2, 2]


@pytest.mark.parametrize("before,after", [(2, 3), (3, 2), (2, 1), (2, 2)])
def test_checkpoint_saves_each_shard_as_a_slice_and_reshards(
    sharded_variable, tmp_path, before, after):
  import tensorflow as tf
  from trainer import compat
  value, path = _saved_in_shards(sharded_variable, tmp_path, before)
  key = "w/.ATTRIBUTES/VARIABLE_VALUE"
  # One key, stored as one slice per shard (each written where its shard
  # lives); a reader gets the whole value.
  assert _stored_shapes(path, key) == [[n, 3] for n in _split(7, before)]
  reader = tf.train.load_checkpoint(path)
  assert reader.get_variable_to_shape_map()[key] == [7, 3]
  np.testing.assert_array_equal(reader.get_tensor(key), value)
  # Another split of the same rows restores every row.
  other = sharded_variable(np.zeros((7, 3)), shards=after)
  compat.save_sharded_by_shard([other])
  tf.train.Checkpoint(w=other).read(path).assert_consumed()
  np.testing.assert_array_equal(tf.convert_to_tensor(other), value)
  assert [int(s.shape[0]) for s in other.value.variables] == _split(7, after)


def test_sharded_checkpoint_restores_as_one_plain_variable(sharded_variable,
                                                           tmp_path):
  import keras
  import tensorflow as tf
  from trainer import compat
  value = np.arange(12, dtype=np.float32).reshape(4, 3)
  v = sharded_variable(value)
  compat.save_sharded_by_shard([v])
  path = tf.train.Checkpoint(w=v).write(str(tmp_path / "ckpt"))
  # What the default strategy (evaluation, export) builds.
  plain = keras.Variable(np.zeros((4, 3), np.float32))
  tf.train.Checkpoint(w=plain).read(path).assert_consumed()
  np.testing.assert_array_equal(plain.numpy(), value)


def test_a_whole_value_checkpoint_restores_into_shards(sharded_variable,
                                                       tmp_path):
  import keras
  import tensorflow as tf
  from trainer import compat
  value = np.arange(15, dtype=np.float32).reshape(5, 3)
  # The layout any unsharded run, and earlier sharded runs, wrote.
  path = tf.train.Checkpoint(w=keras.Variable(value)).write(
      str(tmp_path / "ckpt"))
  assert _stored_shapes(path, "w/.ATTRIBUTES/VARIABLE_VALUE") == [[5, 3]]
  v = sharded_variable(np.zeros((5, 3)), shards=2)
  compat.save_sharded_by_shard([v])
  tf.train.Checkpoint(w=v).read(path).assert_consumed()
  np.testing.assert_array_equal(tf.convert_to_tensor(v), value)


def test_initial_values_are_made_per_shard_and_slots_split_like_the_table(
    monkeypatch):
  """compat.make_variables_on_the_ps's two parts, without a cluster: a
  creator plays ParameterServerStrategy (it calls the initial value with
  each shard's partition_shape / partition_offset, as TF does)."""
  import keras
  import tensorflow as tf
  from keras.src.backend.tensorflow import core as tf_core
  from trainer import compat
  monkeypatch.setattr(tf_core.Variable, "_initialize_with_initializer",
                      compat._initialize_where_placed)
  asked = []

  def ps_like(next_creator, **kwargs):
    shape, value = kwargs["shape"], kwargs["initial_value"]
    assert shape is not None and callable(value)
    rows = _split(shape[0], 2)
    parts, start = [], 0
    for n in rows:
      part = value(partition_shape=(n, *shape[1:]),
                   partition_offset=(start, 0))
      asked.append(tuple(part.shape))
      parts.append(next_creator(**{**kwargs, "initial_value": part,
                                   "shape": None}))
      start += n
    return tf.__internal__.distribute.ShardedVariable(parts)

  rows = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
  shapes = []

  def row_numbers(shape, dtype=None):   # depends on the row: made whole
    shapes.append(("rows", tuple(shape)))
    return tf.constant(rows[:shape[0]], dtype)

  zeros_call = keras.initializers.Zeros.__call__
  monkeypatch.setattr(keras.initializers.Zeros, "__call__",
                      lambda self, shape, dtype=None: shapes.append(
                          ("zeros", tuple(shape))) or zeros_call(
                              self, shape, dtype))

  with tf.variable_creator_scope(ps_like):
    table = keras.Variable(row_numbers, shape=(7, 3))
    zeros = keras.Variable("zeros", shape=(7, 3))
  np.testing.assert_array_equal(tf.convert_to_tensor(table), rows)
  np.testing.assert_array_equal(tf.convert_to_tensor(zeros), 0.0)
  assert asked == [(4, 3), (3, 3)] * 2
  # Each shard of the row-dependent one is cut from the whole value; the
  # row-free one is made at each shard's shape only.
  assert shapes == [("rows", (7, 3))] * 2 + [("zeros", (4, 3)),
                                              ("zeros", (3, 3))]
  # A slot of the table: a ShardedVariable with the table's split, each
  # part colocated with the table's part (any other shape: its first).
  placed = []

  def strategy_like(next_creator, **kwargs):
    placed.append(kwargs.pop("colocate_with"))
    return next_creator(**kwargs)

  with tf.variable_creator_scope(strategy_like), tf.variable_creator_scope(
      compat._sharded_like(table.value)):
    slot = keras.Variable("ones", shape=(7, 3))
    other = keras.Variable("zeros", shape=(3,))
  assert compat.is_sharded(slot) and not compat.is_sharded(other)
  assert [int(s.shape[0]) for s in slot.value.variables] == [4, 3]
  shards = table.value.variables
  assert placed == [shards[0], shards[1], shards[0]]
  np.testing.assert_array_equal(tf.convert_to_tensor(slot), 1.0)


def _ps_like(shards):
  """A variable creator playing ParameterServerStrategy: the initial value
  called with each shard's partition_shape / partition_offset, as TF does."""
  import tensorflow as tf

  def creator(next_creator, **kwargs):
    shape, value = kwargs["shape"], kwargs["initial_value"]
    parts, start = [], 0
    for n in _split(shape[0], shards):
      part = value(partition_shape=(n, *shape[1:]),
                   partition_offset=(start, *[0] * (len(shape) - 1)))
      parts.append(next_creator(**{**kwargs, "initial_value": part,
                                   "shape": None}))
      start += n
    return tf.__internal__.distribute.ShardedVariable(parts)

  return creator


@pytest.mark.parametrize("name,shape,dtype", [
    ("uniform", (7, 3), "float32"), ("glorot_uniform", (10, 5), "float64"),
    ("he_normal", (9, 4), "float32"), ("random_normal", (8, 2), "float32"),
    ("lecun_normal", (7, 3), "float64")])
def test_random_initial_values_are_drawn_per_shard_as_the_whole(
    monkeypatch, name, shape, dtype):
  """Each shard draws only its own rows (the initializer never runs at the
  whole shape), and the rows are bit for bit those of the unsharded
  variable: the initial table does not depend on the number of ps."""
  import keras
  import tensorflow as tf
  from keras.src.backend.tensorflow import core as tf_core
  from trainer import compat
  monkeypatch.setattr(tf_core.Variable, "_initialize_with_initializer",
                      compat._initialize_where_placed)
  config = keras.initializers.get(name).get_config()
  initializer = type(keras.initializers.get(name))(**{**config, "seed": 42})
  whole = initializer(shape, dtype=dtype).numpy()   # the reference
  calls = []
  call = type(initializer).__call__
  owner = next(c for c in type(initializer).__mro__ if "__call__" in vars(c))
  monkeypatch.setattr(owner, "__call__",
                      lambda self, s, dtype=None: calls.append(s) or call(
                          self, s, dtype))
  for shards in (2, 3):
    with tf.variable_creator_scope(_ps_like(shards)):
      table = keras.Variable(initializer, shape=shape, dtype=dtype)
    assert len(table.value.variables) == shards
    np.testing.assert_array_equal(tf.convert_to_tensor(table), whole)
  assert calls == []
  # A SeedGenerator draws anew at each call: such tables are made whole
  # and cut, as any initializer this does not know.
  generated = type(initializer)(**{**config,
                                   "seed": keras.random.SeedGenerator(1)})
  assert compat.stateless_rows(generated, shape, dtype, 1, 2) is None


def _hwm_mb():
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) / 1024 for line in f
                 if line.startswith("VmHWM:"))


def _reset_hwm():
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def test_memory_of_a_sharded_table_at_build_and_restore(monkeypatch,
                                                        tmp_path):
  """The goal itself, in one process: a 96 MB random table in 3 shards is
  built with ~1x its bytes (it was made whole, then cut), and restored
  with its old value released first (the restore's new value would
  otherwise coexist with it: +1x); the values round-trip."""
  import keras
  import tensorflow as tf
  from keras.src.backend.tensorflow import core as tf_core
  from trainer import compat
  monkeypatch.setattr(tf_core.Variable, "_initialize_with_initializer",
                      compat._initialize_where_placed)
  rows, dim = 750_000, 32
  table_mb = rows * dim * 4 / (1 << 20)
  tf.zeros([8]) + 1   # noqa: B018 - TF's own start-up, before the peaks
  _reset_hwm()
  before = _hwm_mb()
  with tf.variable_creator_scope(_ps_like(3)):
    table = keras.Variable(keras.initializers.RandomUniform(seed=1),
                           shape=(rows, dim))
  built = _hwm_mb() - before
  assert built < 1.25 * table_mb, (built, table_mb)
  compat.save_sharded_by_shard([table])
  checkpoint = tf.train.Checkpoint(w=table)
  path = checkpoint.write(str(tmp_path / "ckpt"))
  first = table.value.variables[0][:5].numpy()
  table.value.variables[0].assign(tf.zeros_like(table.value.variables[0]))
  _reset_hwm()
  before = _hwm_mb()
  released = compat.release_for_restore(checkpoint, path)
  assert len(released) == 3
  assert [int(tf.raw_ops.VariableShape(input=r.variable.handle)[0])
          for r in released] == [0, 0, 0]
  compat.restore_released(released, path)   # what a damaged file fails
  with compat.skipping(released):
    checkpoint.read(path).assert_consumed()
  compat.check_restored(released)
  restored = _hwm_mb() - before
  assert restored < 0.25 * table_mb, (restored, table_mb)
  np.testing.assert_array_equal(table.value.variables[0][:5].numpy(), first)


def test_a_released_shard_left_unrestored_is_an_error(sharded_variable,
                                                      tmp_path):
  import tensorflow as tf
  from trainer import compat
  v = sharded_variable(np.ones((4, 3)))
  compat.save_sharded_by_shard([v])
  checkpoint = tf.train.Checkpoint(w=v)
  path = checkpoint.write(str(tmp_path / "ckpt"))
  # A checkpoint without the key: nothing is released.
  other = tf.train.Checkpoint(x=tf.Variable(1.0)).write(
      str(tmp_path / "other"))
  assert compat.release_for_restore(checkpoint, other, min_bytes=0) == []
  released = compat.release_for_restore(checkpoint, path, min_bytes=0)
  with pytest.raises(RuntimeError, match="left it with 0 of its 2 rows"):
    compat.check_restored(released)


@pytest.mark.parametrize("before,after", [(2, 3), (3, 2)])
def test_a_restore_that_releases_first_reshards_every_row(
    sharded_variable, tmp_path, before, after):
  """As the trainer restores (trainer.checkpoint): each shard emptied,
  then read with its new slice and assigned, the Checkpoint skipping it."""
  import tensorflow as tf
  from trainer import compat
  value, path = _saved_in_shards(sharded_variable, tmp_path, before)
  other = sharded_variable(np.zeros((7, 3)), shards=after)
  compat.save_sharded_by_shard([other])
  checkpoint = tf.train.Checkpoint(w=other)
  released = compat.release_for_restore(checkpoint, path, min_bytes=0)
  assert [r.variable for r in released] == list(other.value.variables)
  compat.restore_released(released, path)
  with compat.skipping(released):
    checkpoint.read(path).assert_consumed()
  compat.check_restored(released)
  np.testing.assert_array_equal(tf.convert_to_tensor(other), value)


def _saved_in_shards(sharded_variable, tmp_path, shards):
  """(value, checkpoint path) of a 7 x 3 variable saved in `shards`."""
  import tensorflow as tf
  from trainer import compat
  value = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
  v = sharded_variable(value, shards=shards)
  compat.save_sharded_by_shard([v])
  return value, tf.train.Checkpoint(w=v).write(str(tmp_path / "ckpt"))


def test_an_eager_lookup_never_makes_the_sharded_table_one_tensor(
    sharded_variable, monkeypatch):
  """layers.Embedding and the sparse optimizers' row reads, run eagerly on
  a sharded table (a model built by calling it on a batch, on the
  coordinator): the rows come from the shards, never from a concat of the
  whole table (TF's conversion of a ShardedVariable, which its
  embedding_lookup does eagerly: +1.2 GB on the coordinator for a
  4,000,000 x 32 table), and equal a plain table's rows."""
  import tensorflow as tf
  import layers
  from tensorflow.python.distribute import sharded_variable as sv
  from trainer import sparse_optim
  value = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
  table = sharded_variable(value, shards=3)
  layer = layers.Embedding(7, 3, hashed=False)
  layer.embeddings = table    # as build() makes it under parameter servers
  layer.built = True

  from tensorflow.python.framework import tensor_conversion_registry as reg
  conversions = reg.get

  def whole(*args, **kwargs):
    raise AssertionError("the sharded table was made one tensor")

  def get(query):
    if issubclass(query, sv.ShardedVariable):
      return [(sv.ShardedVariable, whole)]
    return conversions(query)
  monkeypatch.setattr(reg, "get", get)
  ids = tf.constant([6, 0, 3, 3, 2], tf.int64)
  np.testing.assert_array_equal(layer(ids).numpy(), value[ids.numpy()])
  np.testing.assert_array_equal(
      sparse_optim.read_rows(table, ids).numpy(), value[ids.numpy()])
  with tf.GradientTape() as tape:
    rows = layer(ids)
  gradient, = tape.gradient(rows, [table.value.variables[0]])
  assert isinstance(gradient, tf.IndexedSlices)
