"""`--image_bytes` serving: a signature that takes encoded images of any
size and channel count and prepares them as evaluation does, around a
task's single-image signature (trainer.serving)."""

import tensorflow as tf

from trainer.errors import UserError
from trainer.serving import Signature
from trainer.task import ClassificationTask


def image_bytes_signature(task, signature: Signature, source) -> Signature:
  """Takes `image_bytes`, a string [batch] of encoded images of any size
  and channel count (a batch may mix them); each is decoded, converted to
  the model's channels and resized as evaluation resizes (trainer.data.
  resize: the largest centre crop of the target's aspect ratio, resized),
  then prepared as evaluation prepares it and given to `signature`.

  With --image_size the image goes straight to the model input, as
  ClassificationTask.preprocess makes it from any image. Otherwise the
  data have one size, [H, W, C] uint8: an image of another size is
  resized to it (rounded to uint8 pixels), then Task.preprocess(training=
  False) runs as in evaluation."""
  from trainer.data import resize
  if len(signature.inputs) != 1:
    raise UserError("--image_bytes needs a serving signature with one "
                    f"input, not {sorted(signature.inputs)}.")
  (name,) = signature.inputs
  feature, label = source.feature_spec, source.label_spec
  # The built-in task with --image_size: any image goes to the model input.
  any_size = (task.settings.image_hw
              if isinstance(task, ClassificationTask) else None)
  if any_size:
    channels = source.decode_channels or feature.shape[-1]
    size = any_size
  elif (isinstance(feature, tf.TensorSpec) and feature.dtype == tf.uint8
        and feature.shape.rank == 3):
    height, width, channels = feature.shape.as_list()
    size = (height, width)
  else:
    raise UserError("--image_bytes needs a task whose data are single uint8 "
                    f"images [H, W, C] (this one's features are {feature}), "
                    "or --image_size.")

  def resized(data):
    # One image at a time: sizes differ within a request. The array path
    # of resize_batch is pure TF (the encoded one reads headers in Python,
    # which a SavedModel cannot hold).
    image = resize.to_channels(resize.decode(data), channels)
    image.set_shape([None, None, channels])
    images, _ = resize.resize_batch(image[None], size, channels,
                                    training=False, seed=None)
    return images[0]

  if any_size:
    def fn(inputs):
      images = tf.map_fn(resized, inputs["image_bytes"],
                         fn_output_signature=tf.TensorSpec(
                             [*size, channels], tf.float32))
      return signature.fn({name: images})

    return Signature({"image_bytes": tf.TensorSpec([], tf.string)}, fn)

  def pixels(data):
    return tf.cast(tf.clip_by_value(tf.round(resized(data) * 255.0), 0, 255),
                   tf.uint8)

  def fn(inputs):
    data = inputs["image_bytes"]
    images = tf.map_fn(pixels, data, fn_output_signature=tf.TensorSpec(
        [*size, channels], tf.uint8))
    batch = tf.shape(data)[0]
    labels = tf.nest.map_structure(
        lambda s: tf.zeros(tf.concat(
            [[batch], tf.constant(s.shape.as_list(), tf.int32)], 0), s.dtype),
        label)
    meta = {"pos": tf.zeros([batch], tf.int64),
            "start": tf.zeros([batch], tf.int64),
            "weight": tf.ones([batch], tf.float32)}
    features, _ = task.preprocess(images, labels, meta, False)
    return signature.fn({name: features})

  return Signature({"image_bytes": tf.TensorSpec([], tf.string)}, fn)
