"""trainer.data.resize on encoded images: sizes from headers, the one-loop
decode + crop + resize against a per-image reference, damaged rows."""

import io

import numpy as np
import pytest
import tensorflow as tf

from trainer.data import resize

pytestmark = pytest.mark.timeout(120)


def _photo_crops(n, seed=0):
  """Crops of scikit-learn's two real photographs, every size; some gray."""
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    h, w = rng.integers(9, 120, 2)
    y, x = rng.integers(0, 300, 2)
    crop = photos[i % 2][y:y + h, x:x + w]
    out.append(crop[..., :1] if i % 3 == 0 else crop)
  return out


def _encoded(images):
  """Alternately JPEG and PNG, one GIF and one BMP (decoded for their size)."""
  from PIL import Image
  out = []
  for i, image in enumerate(images):
    if i == 4 or i == 7:
      buf = io.BytesIO()
      pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      pil.save(buf, format="GIF" if i == 4 else "BMP")
      out.append(buf.getvalue())
    elif i % 2:
      out.append(tf.io.encode_jpeg(image).numpy())
    else:
      out.append(tf.io.encode_png(image).numpy())
  return out


def test_sizes_from_headers_equal_the_decoded_sizes():
  images = _photo_crops(12)
  items = tf.constant(_encoded(images))
  got = resize.sizes(items).numpy()
  want = [tf.shape(resize.decode(x)).numpy()[:2] for x in items]
  np.testing.assert_array_equal(got, np.array(want))
  np.testing.assert_array_equal(got, [im.shape[:2] for im in images])


def test_jpeg_headers_read_on_the_host_as_libjpeg_reads_them():
  """The host's reading of JPEG frame headers against libjpeg's, on the
  layouts real files have; where it is not sure (bytes between segments,
  which libjpeg skips with a warning) the row is left to libjpeg."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photo = load_sample_images().images[0][:37, :53]
  base = tf.io.encode_jpeg(photo).numpy()
  first_segment_end = 4 + ((base[4] << 8) | base[5])
  exif = Image.Exif()
  exif[0x010E] = "x" * 3000                      # APP1 of 3 kB
  with_app = io.BytesIO()
  Image.fromarray(photo).save(with_app, "JPEG", exif=exif.tobytes(),
                              icc_profile=bytes(5000))   # APP2 as well
  gray = io.BytesIO()
  Image.fromarray(photo[..., 0]).save(gray, "JPEG", optimize=True)
  items = {
      "baseline": base,
      "progressive": tf.io.encode_jpeg(photo, progressive=True).numpy(),
      "exif_icc": with_app.getvalue(),
      "fill_bytes": base[:2] + b"\xff\xff" + base[2:],
      "gray_optimized": gray.getvalue(),
      "png": tf.io.encode_png(photo).numpy(),
      "bytes_between_segments": (base[:first_segment_end] + b"\0\0"
                                 + base[first_segment_end:]),
  }
  host = resize._header_sizes(np.array(list(items.values()), dtype=object))  # noqa: SLF001
  np.testing.assert_array_equal(host[:-1], [[37, 53]] * 6)
  np.testing.assert_array_equal(host[-1], [-1, -1])   # left to libjpeg
  got = resize.sizes(tf.constant(list(items.values()))).numpy()
  np.testing.assert_array_equal(got, [[37, 53]] * 7)
  for data in items.values():   # what the decoder gives
    assert tf.io.decode_image(data).shape[:2] == (37, 53)


@pytest.mark.parametrize("training", [True, False])
def test_one_loop_equals_decode_then_batch_boxes(training):
  """Reference computed another way: every image decoded alone, the boxes
  for the whole batch from random_crop_boxes/eval_boxes, then slice and
  resize image by image."""
  items = tf.constant(_encoded(_photo_crops(16, seed=1)))
  seed = tf.constant([4, 2], tf.int64)
  size, channels = (24, 20), 3
  got, ok = resize.resize_batch(items, size, channels, training, seed)
  decoded = [resize.to_channels(resize.decode(x), channels) for x in items]
  hw = tf.constant([d.shape[:2] for d in decoded], tf.int32)
  if training:
    uniforms = tf.random.stateless_uniform(
        [16, resize.TRIES, 4],
        seed=tf.random.experimental.stateless_fold_in(seed, resize._CROP_SALT))  # noqa: SLF001
    boxes = resize.random_crop_boxes(hw, uniforms).numpy()
  else:
    boxes = resize.eval_boxes(hw, size).numpy()
  want = [resize._resize(tf.cast(d[y:y + h, x:x + w], tf.float32),  # noqa: SLF001
                         tf.constant([h, w]), size).numpy()
          for d, (y, x, h, w) in zip(decoded, boxes)]
  want = np.clip(np.stack(want), 0, 255) / 255.0
  np.testing.assert_array_equal(ok.numpy(), np.ones(16))
  np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-7)


def test_damaged_rows_weigh_zero_and_good_rows_do_not_change():
  clean = _encoded(_photo_crops(10, seed=2))
  bad = list(clean)
  bad[1] = bad[1][:len(bad[1]) // 2]      # a JPEG cut short
  bad[2] = b"not an image"
  bad[3] = b""                            # a file that could not be read
  ihdr = bytearray(bad[6])
  ihdr[19] ^= 1                           # a PNG whose header says 1 px more
  bad[6] = bytes(ihdr)
  bad[8] = bad[8][:20]                    # a PNG shorter than its header
  seed = tf.constant([1, 1], tf.int64)
  want, _ = resize.resize_batch(tf.constant(clean), (16, 16), 3, True, seed)
  got, ok = resize.resize_batch(tf.constant(bad), (16, 16), 3, True, seed)
  damaged = np.isin(np.arange(10), [1, 2, 3, 6, 8])
  np.testing.assert_array_equal(ok.numpy(), (~damaged).astype(np.float32))
  np.testing.assert_array_equal(got.numpy()[~damaged], want.numpy()[~damaged])
  assert not got.numpy()[damaged].any()


def test_header_the_decoder_disagrees_with_is_a_damaged_row(monkeypatch):
  """Should the host's header read ever disagree with the decoder, the row
  is taken as damaged (weight 0, named), not a failed pipeline; the other
  rows come out as without it."""
  clean = _encoded(_photo_crops(10, seed=3))
  seed = tf.constant([2, 5], tf.int64)
  want, _ = resize.resize_batch(tf.constant(clean), (16, 16), 3, True, seed)
  liar = clean[1]   # a JPEG (odd rows)
  read = resize._jpeg_hw  # noqa: SLF001

  def off_by_one(data):
    hw = read(data)
    return (hw[0] + 1, hw[1]) if data == liar else hw

  monkeypatch.setattr(resize, "_jpeg_hw", off_by_one)
  got, ok = resize.resize_batch(tf.constant(clean), (16, 16), 3, True, seed)
  bad = np.arange(10) == 1
  np.testing.assert_array_equal(ok.numpy(), (~bad).astype(np.float32))
  np.testing.assert_array_equal(got.numpy()[~bad], want.numpy()[~bad])
  assert not got.numpy()[bad].any()
