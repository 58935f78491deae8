"""layers.Embedding: hashing of raw ids, combiner lookups against NumPy,
and gradients that stay tf.IndexedSlices (one device and 2 mirrored
replicas)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
M64 = (1 << 64) - 1


def splitmix_rows(ids, num_rows):
  """splitmix64's finaliser in Python integers, modulo num_rows."""
  out = []
  for i in ids:
    z = int(i) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    out.append((z ^ (z >> 31)) % num_rows)
  return np.array(out, np.int64)


def test_integer_ids_of_any_value_hash_into_the_table():
  import tensorflow as tf
  from layers import hash_ids
  ids = [0, 1, -1, 5, 19, 20, 2**31 - 1, 2**62, 2**63 - 1, -2**63, 10**18]
  got = hash_ids(tf.constant(ids, tf.int64), 20).numpy()
  np.testing.assert_array_equal(got, splitmix_rows(ids, 20))
  assert got.dtype == np.int64 and got.min() >= 0 and got.max() < 20
  small = [-7, 0, 3, 2**31 - 1]
  np.testing.assert_array_equal(hash_ids(tf.constant(small, tf.int32), 20),
                                splitmix_rows(small, 20))
  # Ids on a stride of the table size spread over it (a bare modulo would
  # put all of them in row 0).
  strided = hash_ids(tf.range(0, 1000 * 5000, 1000, tf.int64), 1000).numpy()
  assert len(np.unique(strided)) > 950


def test_string_ids_hash_deterministically_into_the_table():
  import tensorflow as tf
  from layers import hash_ids
  words = tf.constant(["user:1", "user:2", "", "never seen before", "user:1"])
  rows = hash_ids(words, 7).numpy()
  assert rows.min() >= 0 and rows.max() < 7 and rows[0] == rows[4]
  np.testing.assert_array_equal(rows, hash_ids(words, 7).numpy())
  ragged = hash_ids(tf.ragged.constant([["user:1"], [], ["user:2", ""]]), 7)
  np.testing.assert_array_equal(ragged.flat_values, rows[[0, 1, 2]])


def history():
  """A multi-valued feature: ids per user (row 2 empty, repeats in row 0),
  and the same as a padded tensor with a mask."""
  lists = [[3, 17, 3], [5], [], [0, 1, 2, 11]]
  width = max(len(x) for x in lists)
  padded = np.full((len(lists), width), -1, np.int64)
  mask = np.zeros_like(padded, bool)
  for i, x in enumerate(lists):
    padded[i, :len(x)] = x
    mask[i, :len(x)] = True
  return lists, padded, mask


def combine(table, lists, combiner):
  out = np.zeros((len(lists), table.shape[1]))
  for i, rows in enumerate(lists):
    if rows:
      total = table[rows].sum(0)
      out[i] = {"sum": total, "mean": total / len(rows),
                "sqrtn": total / np.sqrt(len(rows))}[combiner]
  return out


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_combiners_match_numpy_and_keep_sparse_gradients(combiner):
  import tensorflow as tf
  from layers import Embedding
  lists, padded, mask = history()
  layer = Embedding(20, 4, hashed=False, combiner=combiner)
  layer.build()
  table = layer.embeddings.numpy().astype(np.float64)
  want = combine(table, lists, combiner)
  weights = np.random.default_rng(0).normal(size=want.shape)
  for ids, m in ((tf.ragged.constant(lists, tf.int64), None),
                 (tf.constant(padded), tf.constant(mask))):
    with tf.GradientTape() as tape:
      out = layer(ids, mask=m)
      loss = tf.reduce_sum(out * tf.constant(weights, out.dtype))
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6, atol=1e-7)
    grad = tape.gradient(loss, layer.embeddings)
    assert isinstance(grad, tf.IndexedSlices), type(grad)
    # Only the ids' rows (the padding's -1 is never looked up).
    assert set(grad.indices.numpy()) == {r for x in lists for r in x}
    # d loss / d table[r] = sum over users of weight x (factor per id).
    want_grad = np.zeros_like(table)
    for user, rows in enumerate(lists):
      scale = {"sum": 1.0, "mean": 1 / max(len(rows), 1),
               "sqrtn": 1 / np.sqrt(max(len(rows), 1))}[combiner]
      for r in rows:
        want_grad[r] += weights[user] * scale
    np.testing.assert_allclose(tf.convert_to_tensor(grad), want_grad,
                               rtol=1e-6, atol=1e-7)


def test_hashed_lookup_of_raw_ids_matches_numpy_under_tf_function():
  import tensorflow as tf
  from layers import Embedding
  layer = Embedding(20, 3)
  layer.build()
  table = layer.embeddings.numpy()
  ids = np.array([[-5, 2**63 - 1], [-2**63, 10**18], [7, 7]], np.int64)

  @tf.function
  def lookup_and_grad(x):
    with tf.GradientTape() as tape:
      out = layer(x)
      loss = tf.reduce_sum(out)
    return out, tape.gradient(loss, layer.embeddings)

  out, grad = lookup_and_grad(tf.constant(ids))
  rows = splitmix_rows(ids.ravel(), 20).reshape(ids.shape)
  np.testing.assert_array_equal(out.numpy(), table[rows])
  assert isinstance(grad, tf.IndexedSlices)
  ragged = layer(tf.ragged.constant([[-5], [], [7, 10**18]], tf.int64))
  assert isinstance(ragged, tf.RaggedTensor)
  np.testing.assert_array_equal(ragged.flat_values.numpy(),
                                table[splitmix_rows([-5, 7, 10**18], 20)])
  words = layer(tf.constant(["a", "b"]))
  assert words.shape == (2, 3)


def test_bad_arguments_name_the_fix():
  import tensorflow as tf
  from layers import Embedding
  with pytest.raises(ValueError, match="combiner"):
    Embedding(10, 2, combiner="max")
  with pytest.raises(ValueError, match="num_rows"):
    Embedding(0, 2)
  layer = Embedding(10, 2, hashed=False)
  with pytest.raises(ValueError, match="hashed=True"):
    layer(tf.constant(["a"]))
  with pytest.raises(ValueError, match="RaggedTensor"):
    layer(tf.constant([[1, 2]]), mask=tf.constant([[True, False]]))


_MIRRORED = textwrap.dedent("""
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from layers import Embedding
    from trainer import optim

    histories = tf.ragged.constant(
        [[3, 17, 3], [5], [], [2**40, -1], [17], [8, 9]], tf.int64)
    targets = tf.constant(np.linspace(-1, 1, 6 * 4).reshape(6, 4),
                          tf.float32)

    def make():
      keras.utils.set_random_seed(1)
      layer = Embedding(50, 4, combiner="mean")
      layer.build()
      return layer, optim.prepare(optim.LazyAdam(0.1),
                                  layer.trainable_variables)

    def loss_of(layer, ids, y):
      per_example = tf.reduce_sum(tf.square(layer(ids) - y), axis=1)
      return tf.nn.compute_average_loss(per_example, global_batch_size=6)

    # One device, the whole batch.
    single, opt = make()
    start = single.embeddings.numpy()
    for _ in range(3):
      with tf.GradientTape() as tape:
        loss = loss_of(single, histories, targets)
      opt.apply_gradients(zip(tape.gradient(loss, single.trainable_variables),
                              single.trainable_variables))

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
      layer, opt = make()
    np.testing.assert_array_equal(layer.embeddings.numpy(), start)

    def replica(ids, y):
      ctx = tf.distribute.get_replica_context()
      half = 3 * ctx.replica_id_in_sync_group
      with tf.GradientTape() as tape:
        loss = loss_of(layer, ids[half:half + 3], y[half:half + 3])
      grads = tape.gradient(loss, layer.trainable_variables)
      assert isinstance(grads[0], tf.IndexedSlices), type(grads[0])
      grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
      assert isinstance(grads[0], tf.IndexedSlices), type(grads[0])
      opt.apply_gradients(zip(grads, layer.trainable_variables))

    step = tf.function(lambda: strategy.run(replica, args=(histories,
                                                            targets)))
    for _ in range(3):
      step()
    want = single.embeddings.numpy()
    for copy in layer.embeddings.value.values:
      np.testing.assert_allclose(copy.numpy(), want, rtol=1e-6)
    touched = set(layer.rows(histories).flat_values.numpy().tolist())
    untouched = sorted(set(range(50)) - touched)
    np.testing.assert_array_equal(want[untouched], start[untouched])
    assert not np.array_equal(want, start)
    print("ok", len(touched))
""")


def test_mirrored_replicas_keep_sparse_gradients_and_match_one_device():
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
         "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get(
             "PYTHONPATH", "")}
  done = subprocess.run([sys.executable, "-c", _MIRRORED, str(REPO)],
                        capture_output=True, text=True, env=env, timeout=100,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1].startswith("ok ")
