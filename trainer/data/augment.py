"""Seeded, stateless image augmentation on (a slice of) a global micro-batch."""

import tensorflow as tf


@tf.autograph.experimental.do_not_convert  # pure TF: no rewriting needed
def crop_and_flip(images, seed, pad: int = 4, flip: bool = True,
                  first_row=0, global_batch: int | None = None):
  """Random crop of each image after zero-padding by `pad`, and (optionally)
  a random horizontal flip. `seed` (int64 [2]) fixes every choice, so a
  resumed run augments each batch exactly as the uninterrupted one did.

  `images` may be rows [first_row, first_row + b) of a global micro-batch
  of `global_batch` rows (a worker's share): the draws are made for the
  whole global batch and sliced, so each example gets the same crop and
  flip whichever process builds it."""
  batch, height, width = (tf.shape(images)[0], images.shape[1],
                          images.shape[2])
  total = batch if global_batch is None else global_batch
  first = tf.cast(first_row, tf.int32)

  def mine(draw):
    # This slice's rows of a draw made for the whole global batch. (Named
    # apart from the crop's row indices below: reusing one name broke the
    # flip draw, which every cifar10 --augment run traced.)
    return draw if global_batch is None else draw[first:first + batch]
  padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
  offsets = mine(tf.random.stateless_uniform(
      [total, 2], seed=seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32))
  # Crop by gathering rows then columns: one op per axis for the whole batch.
  rows = offsets[:, :1] + tf.range(height)[None, :]
  cols = offsets[:, 1:] + tf.range(width)[None, :]
  out = tf.gather(padded, rows, axis=1, batch_dims=1)
  out = tf.gather(out, cols, axis=2, batch_dims=1)
  if flip:
    coin = mine(tf.random.stateless_uniform(
        [total, 1, 1, 1],
        seed=tf.random.experimental.stateless_fold_in(seed, 1)))
    out = tf.where(coin < 0.5, tf.reverse(out, axis=[2]), out)
  return out
