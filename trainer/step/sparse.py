"""Gradients that may be tf.IndexedSlices (embedding look-ups), kept sparse.

A look-up of a few rows of a large table has a gradient of those rows
only; converting it to a dense tensor costs O(table) per step. These pure
functions do what the step needs without ever building the dense shape:
cast, scale, add (a sum of slices is their concatenation), combine the
rows of repeated indices, and the parts a norm or finite check reads.
"""

import tensorflow as tf


# Called while the step is traced; no control flow on tensors (the checks
# are on Python types), so AutoGraph need not convert them.
_plain_python = tf.autograph.experimental.do_not_convert


@_plain_python
def is_sparse(gradient) -> bool:
  return isinstance(gradient, tf.IndexedSlices)


@_plain_python
def as_float32(gradient):
  """The gradient in float32, sparse if it was."""
  if is_sparse(gradient):
    return tf.IndexedSlices(tf.cast(gradient.values, tf.float32),
                            gradient.indices, gradient.dense_shape)
  return tf.convert_to_tensor(gradient, tf.float32)


@_plain_python
def scale(gradient, factor):
  """gradient * factor (a scalar tensor), sparse if it was."""
  if is_sparse(gradient):
    return tf.IndexedSlices(gradient.values * factor, gradient.indices,
                            gradient.dense_shape)
  return gradient * factor


@_plain_python
def add(a, b):
  """a + b. Two slices: their concatenation (repeated indices are summed
  where a reader needs it, see combine_repeated). A dense and a sparse
  gradient of one variable: dense (scatter-added, O(rows))."""
  if is_sparse(a) and is_sparse(b):
    return tf.IndexedSlices(tf.concat([a.values, b.values], 0),
                            tf.concat([tf.cast(a.indices, tf.int64),
                                       tf.cast(b.indices, tf.int64)], 0),
                            a.dense_shape)
  if is_sparse(a):
    a, b = b, a
  if is_sparse(b):
    return tf.tensor_scatter_nd_add(a, tf.expand_dims(b.indices, -1),
                                    b.values)
  return a + b


@_plain_python
def combine_repeated(gradient):
  """Slices with each index once (the rows of a repeated index summed):
  what the gradient's norm and a sparse optimizer update need. Dense
  gradients are returned as they are."""
  if not is_sparse(gradient):
    return gradient
  unique, where = tf.unique(tf.cast(gradient.indices, tf.int64))
  values = tf.math.unsorted_segment_sum(gradient.values, where,
                                        tf.shape(unique)[0])
  return tf.IndexedSlices(values, unique, gradient.dense_shape)


@_plain_python
def norm_parts(gradients) -> list:
  """Tensors whose global norm is the gradients' (slices: their values,
  so combine_repeated first)."""
  return [g.values if is_sparse(g) else g for g in gradients]
