"""Keras 3 variables held as ShardedVariables (what the parameter-server
partitioner makes of large ones): gradients, optimizer updates and
checkpoints, in one process (a variable creator shards like the ps tasks)."""

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
      half = value.shape[0] // 2
      return sharded([
          next_creator(**{**kwargs, "initial_value": part, "shape": None})
          for part in (value[:half], value[half:])])
    return next_creator(**{**kwargs, "initial_value": value})

  def make(value):
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


def test_checkpoint_holds_the_whole_value_and_restores_it(sharded_variable,
                                                         tmp_path):
  import keras
  import tensorflow as tf
  from trainer import compat
  value = np.arange(12, dtype=np.float32).reshape(4, 3)
  v = sharded_variable(value)
  assert compat.save_sharded_whole([v, keras.Variable(1.0)]) == 1
  path = tf.train.Checkpoint(w=v).write(str(tmp_path / "ckpt"))
  reader = tf.train.load_checkpoint(path)
  np.testing.assert_array_equal(
      reader.get_tensor("w/.ATTRIBUTES/VARIABLE_VALUE"), value)
  v.assign(tf.zeros((4, 3)))
  tf.train.Checkpoint(w=v).read(path).assert_consumed()
  np.testing.assert_array_equal(tf.convert_to_tensor(v), value)
  # Any other strategy reads it as one ordinary variable.
  plain = keras.Variable(np.zeros((4, 3), np.float32))
  tf.train.Checkpoint(w=plain).read(path).assert_consumed()
  np.testing.assert_array_equal(plain.numpy(), value)
