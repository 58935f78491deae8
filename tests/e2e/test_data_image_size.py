"""--image_size: random-resized crop and eval crop against NumPy references,
channel conversion, worker slices, and real photos of every size training."""

import math

import numpy as np
import pytest
import tensorflow as tf

from conftest import last_json, run_trainer, write_photo_folder
from trainer.data import resize

pytestmark = pytest.mark.timeout(300)


def _numpy_crop_box(h, w, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params, its draws taken from u."""
  for t in range(u.shape[0]):
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[t, 0])
    aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) -
                                            math.log(ratio[0])) * u[t, 1])
    cw = int(np.round(np.sqrt(area * aspect), 0))
    ch = int(np.round(np.sqrt(area / aspect), 0))
    if 0 < cw <= w and 0 < ch <= h:
      return [int(u[t, 2] * (h - ch + 1)), int(u[t, 3] * (w - cw + 1)), ch, cw]
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  return [(h - ch) // 2, (w - cw) // 2, ch, cw]


def test_random_crop_boxes_follow_the_imagenet_recipe():
  rng = np.random.default_rng(0)
  hw = np.stack([rng.integers(1, 400, 300), rng.integers(1, 400, 300)], 1)
  hw[:3] = [[10, 400], [400, 10], [1, 1]]   # extreme shapes: the fallback
  u = rng.uniform(size=(300, resize.TRIES, 4)).astype(np.float32)
  u[:3, :, 0] = 0.999                       # whole-image area never fits
  got = resize.random_crop_boxes(tf.constant(hw, tf.int32), tf.constant(u))
  expected = [_numpy_crop_box(h, w, ui) for (h, w), ui in zip(hw, u)]
  np.testing.assert_array_equal(got.numpy(), expected)
  y, x, ch, cw = got.numpy().T
  assert (y >= 0).all() and (x >= 0).all()
  assert (y + ch <= hw[:, 0]).all() and (x + cw <= hw[:, 1]).all()


def test_eval_boxes_keep_the_shorter_side_and_centre():
  hw = tf.constant([[100, 200], [200, 100], [90, 90]], tf.int32)
  np.testing.assert_array_equal(resize.eval_boxes(hw, (32, 32)).numpy(),
                                [[0, 50, 100, 100], [50, 0, 100, 100],
                                 [0, 0, 90, 90]])
  # A 2:1 target on a square: full width, half the height, centred.
  np.testing.assert_array_equal(
      resize.eval_boxes(tf.constant([[90, 90]]), (16, 32)).numpy(),
      [[22, 0, 45, 90]])


def test_grayscale_and_rgba_convert_to_the_model_channels():
  rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3)).astype(np.uint8)
  gray = rgb[..., :1]
  rgba = tf.constant(np.concatenate([rgb, np.full((5, 7, 1), 9, np.uint8)], -1))
  gray = tf.constant(gray)
  np.testing.assert_array_equal(resize.to_channels(gray, 3).numpy(),
                                np.repeat(gray.numpy(), 3, -1))
  np.testing.assert_array_equal(resize.to_channels(rgba, 3).numpy(), rgb)
  np.testing.assert_array_equal(resize.to_channels(rgba, 1).numpy(),
                                tf.image.rgb_to_grayscale(rgb).numpy())


def test_worker_rows_equal_whole_batch_rows_for_encoded_images_of_any_size():
  rng = np.random.default_rng(2)
  encoded = []
  for i in range(6):
    shape = (int(rng.integers(5, 60)), int(rng.integers(5, 60)), 1 + 2 * (i % 2))
    pixels = rng.integers(0, 256, shape).astype(np.uint8)
    encoded.append(tf.io.encode_png(pixels).numpy())
  encoded = tf.constant(encoded)
  seed = tf.constant([3, 96], tf.int64)
  whole, ok = resize.resize_batch(encoded, (12, 10), 3, True, seed, flip=True)
  np.testing.assert_array_equal(ok, np.ones(6))
  assert whole.shape == (6, 12, 10, 3)
  assert 0.0 <= float(tf.reduce_min(whole)) and float(tf.reduce_max(whole)) <= 1.0
  parts = [resize.resize_batch(encoded[a:a + 3], (12, 10), 3, True, seed,
                               first_row=a, global_batch=6, flip=True)[0]
           for a in (0, 3)]
  np.testing.assert_array_equal(tf.concat(parts, 0).numpy(), whole.numpy())
  # A different batch start (seed) draws other crops.
  other, _ = resize.resize_batch(encoded, (12, 10), 3, True,
                                 tf.constant([3, 97], tf.int64), flip=True)
  assert not np.array_equal(other.numpy(), whole.numpy())
  # A row that does not decode: zeros and ok 0, the others unchanged.
  damaged = tf.tensor_scatter_nd_update(encoded, [[4]], [b"not an image"])
  out, ok = resize.resize_batch(damaged, (12, 10), 3, True, seed, flip=True)
  np.testing.assert_array_equal(ok, [1, 1, 1, 1, 0, 1])
  np.testing.assert_array_equal(out[4], np.zeros((12, 10, 3)))
  np.testing.assert_array_equal(np.delete(out.numpy(), 4, 0),
                                np.delete(whole.numpy(), 4, 0))


def test_photos_of_every_size_train_to_high_accuracy(tmp_path):
  pytest.importorskip("sklearn")
  data = tmp_path / "photos"
  write_photo_folder(data / "train", 60, "train", 0)
  write_photo_folder(data / "test", 30, "test", 1)
  common = ["--dataset=image_folder", f"--data_dir={data}",
            "--global_batch_size=32", "--steps_per_loop=25", "--eval_every=0"]
  # Without --image_size such a folder is refused, with the way out named.
  refused = run_trainer(*common, "--train_steps=1",
                        f"--model_dir={tmp_path / 'no'}", check=False)
  assert refused.returncode == 2 and "differ in shape" in refused.stderr
  result = last_json(run_trainer(
      *common, "--image_size=32", "--augment", "--train_steps=150",
      f"--model_dir={tmp_path / 'run'}"))
  assert result["eval_examples"] == 60
  assert result["eval_accuracy"] >= 0.9, result
