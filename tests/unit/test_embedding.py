"""layers.Embedding: hashing of raw ids, combiner lookups against NumPy,
and gradients that stay tf.IndexedSlices. Under 2 mirrored replicas it is
checked in test_sparse_optim's subprocess (one TensorFlow start for both)."""

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)

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
