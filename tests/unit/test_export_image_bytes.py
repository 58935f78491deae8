"""--image_bytes serving takes images of any size and channel count in one
request, resized as evaluation resizes (trainer.data.resize): compared with
trainer.load's model on the images resized by evaluation's own code path
for encoded images."""

import numpy as np
import tensorflow as tf

import trainer
from export_runs import digits_run


def _encoded(rng):
  """A 56x56 RGB JPEG, a 20x30 RGBA PNG and a 28x28 gray PNG."""
  def noise(*shape):
    return tf.constant(rng.integers(0, 256, shape, dtype=np.uint8))
  return [tf.io.encode_jpeg(noise(56, 56, 3)).numpy(),
          tf.io.encode_png(noise(20, 30, 4)).numpy(),
          tf.io.encode_png(noise(28, 28, 1)).numpy()]


def _evaluation_resize(data, size):
  """float32 [1, *size, 1] in [0, 1]: resize_batch on the encoded bytes, as
  evaluation prepares an image_folder or array_record example."""
  from trainer.data import resize
  images, ok = resize.resize_batch(tf.constant([data]), size, 1,
                                   training=False, seed=None)
  assert ok.numpy().tolist() == [1.0]
  return images.numpy()


def _serve(out, encoded):
  signature = tf.saved_model.load(str(out)).signatures["serving_default"]
  return signature(image_bytes=tf.constant(encoded, tf.string))[
      "probabilities"].numpy()


def test_mixed_sizes_with_image_size(tmp_path):
  from trainer import export
  run = digits_run(image_size="28,28")
  out = tmp_path / "served"
  export.export(str(run), str(out), image_bytes=True)
  encoded = _encoded(np.random.default_rng(0))
  _, model = trainer.load(str(run))
  images = np.concatenate([_evaluation_resize(e, (28, 28)) for e in encoded])
  expected = tf.nn.softmax(model(images)).numpy()
  got = _serve(out, encoded)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert np.ptp(expected, axis=0).max() > 1e-3   # the images tell apart
  # One at a time gives the same rows: nothing depends on the batch.
  for i, e in enumerate(encoded):
    np.testing.assert_allclose(_serve(out, [e]), expected[i:i + 1], atol=1e-6)


def test_mixed_sizes_at_the_training_size(tmp_path):
  """Without --image_size the data have one size (8x8 digits): an image of
  that size is served exactly as evaluation prepares the array, another is
  resized to it first (to uint8 pixels, then Task.preprocess)."""
  from trainer import export
  run = digits_run()
  out = tmp_path / "served"
  export.export(str(run), str(out), image_bytes=True)
  task, model = trainer.load(str(run))
  source = task.source("test")
  digit, _ = source.gather(tf.constant([0], tf.int64))
  rng = np.random.default_rng(1)
  encoded = [tf.io.encode_png(digit[0]).numpy(),
             tf.io.encode_jpeg(tf.constant(
                 rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))).numpy(),
             tf.io.encode_png(tf.constant(
                 rng.integers(0, 256, (16, 12, 1), dtype=np.uint8))).numpy()]
  first = digit.numpy().astype(np.float32) / 255.0
  others = [np.round(_evaluation_resize(e, (8, 8)) * 255.0) / 255.0
            for e in encoded[1:]]
  images = np.concatenate([first, *others]).astype(np.float32)
  expected = tf.nn.softmax(model(images)).numpy()
  np.testing.assert_allclose(_serve(out, encoded), expected, atol=1e-6)
