"""Encoded images (PNG/JPEG/GIF/BMP): checked when loaded, decoded in gather.

Every image is decoded once when the Source is built, so a damaged file stops
the run (or is skipped) before training instead of failing mid-epoch, and
`gather` can promise one static shape.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from trainer.data.source import Source
from trainer.errors import UserError


def _decode(data: tf.Tensor, channels: int) -> tf.Tensor:
  # expand_animations=False: a GIF gives its first frame [H,W,3], not [F,H,W,3].
  return tf.io.decode_image(data, channels=channels, dtype=tf.uint8,
                            expand_animations=False)


def probe_shapes(items: np.ndarray, from_paths: bool) -> np.ndarray:
  """Decodes every item once, in parallel: int64 [N, 3] shapes, -1 rows = bad.

  `items` is an object array of encoded bytes, or of file paths when
  `from_paths`. A failed read or decode becomes a -1 row: `ignore_errors`
  drops the element and the example index it carries tells which one it was.
  """
  n = len(items)
  shapes = np.full((n, 3), -1, np.int64)
  if n == 0:
    return shapes

  def shape_of(index, item):
    data = tf.io.read_file(item) if from_paths else item
    return index, tf.shape(_decode(data, channels=0), out_type=tf.int64)

  ds = tf.data.Dataset.from_tensor_slices(
      (tf.range(n, dtype=tf.int64), tf.constant(items, dtype=tf.string)))
  # Order does not matter here (indices say where each shape goes), so let
  # the parallel map hand results back as they finish.
  ds = ds.map(shape_of, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=False).ignore_errors().batch(1024)
  for index, shape in ds.as_numpy_iterator():
    shapes[index] = shape
  return shapes


def common_shape(dataset: str, shapes: np.ndarray, names: list[str]
                 ) -> tuple[int, int, int]:
  """The one shape all (good) images share; UserError naming two that differ."""
  first = {}
  for shape, name in zip(map(tuple, shapes.tolist()), names):
    first.setdefault(shape, name)
    if len(first) > 1:
      (s1, n1), (s2, n2) = list(first.items())[:2]
      raise UserError(
          f"--dataset={dataset}: images differ in shape: {n1} is "
          f"{'x'.join(map(str, s1))} (HxWxC) but {n2} is "
          f"{'x'.join(map(str, s2))}; resize/convert them to one size and "
          "channel count first (batches need one static shape).")
  if not first:
    raise UserError(f"--dataset={dataset}: no readable images.")
  return next(iter(first))


def decoding_source(source: Source, shape: tuple[int, int, int],
                    from_paths: bool, skipped: int = 0) -> Source:
  """Wraps a Source whose features are encoded bytes (or paths): gather decodes.

  Decoding is per example inside the batch (images are decoded to a fixed
  shape, so map_fn can stack them); it runs inside the pipeline's parallel
  tf.data map, so batches decode concurrently.
  """
  spec = tf.TensorSpec(shape, tf.uint8)

  def decode_one(item):
    data = tf.io.read_file(item) if from_paths else item
    return tf.ensure_shape(_decode(data, channels=shape[-1]), shape)

  def gather(indices):
    items, labels = source.gather(indices)
    images = tf.map_fn(decode_one, items, fn_output_signature=spec)
    return images, labels

  return dataclasses.replace(source, gather=gather, feature_spec=spec,
                             skipped=skipped)
