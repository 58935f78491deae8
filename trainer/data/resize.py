"""--image_size: images of any size and channel count -> one model shape.

Training draws a random-resized crop (the usual ImageNet recipe: area 8% to
100% of the image, aspect ratio 3/4 to 4/3, ten tries, then a centre crop)
and, where enabled, a horizontal flip. Evaluation takes the largest centre
crop of the target aspect ratio (the shorter side, resized) and resizes it.
Every draw is made for the whole GLOBAL micro-batch from (seed, batch start)
and each worker keeps its own rows, as augment.crop_and_flip does: resume
and the number of replicas or workers change nothing.
"""

import math
import struct

import numpy as np
import tensorflow as tf

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
TRIES = 10
_CROP_SALT = 0x5C0
_FLIP_SALT = 0xF11

# Pure TF without Python control flow on tensors: autograph would only spend
# start-up time (seconds on a busy 2-core host) rewriting these functions.
_plain = tf.autograph.experimental.do_not_convert


@_plain
def random_crop_boxes(hw, uniforms, scale=SCALE, ratio=RATIO):
  """Random-resized-crop boxes: hw int32 [B, 2] image sizes, uniforms
  float32 [B, TRIES, 4] in [0, 1) -> int32 [B, 4] (y, x, height, width).

  Try t draws area fraction, log aspect ratio, y and x from uniforms[:, t];
  the first try whose box fits the image wins; when none fits, a centre
  crop of the whole image clamped to the ratio range (torchvision's rule).
  """
  return boxes_of_draws(hw, crop_draws(uniforms, scale, ratio), ratio)


@_plain
def crop_draws(uniforms, scale=SCALE, ratio=RATIO):
  """uniforms [B, TRIES, 4] -> [B, TRIES, 4] (area fraction, aspect ratio,
  u_y, u_x). Kept apart from boxes_of_draws so that the global batch's
  draws are transformed BEFORE a worker takes its rows: exp's vectorised
  and scalar code may differ in the last bit, and then where a row sits in
  the tensor would change its box; every op after this is exactly rounded
  (multiply, divide, sqrt, round, floor)."""
  frac = scale[0] + (scale[1] - scale[0]) * uniforms[..., 0]
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * uniforms[..., 1])
  return tf.stack([frac, aspect, uniforms[..., 2], uniforms[..., 3]], -1)


@_plain
def boxes_of_draws(hw, draws, ratio=RATIO):
  """hw int32 [B, 2], crop_draws [B, TRIES, 4] -> int32 [B, 4] boxes."""
  h = tf.cast(hw[:, :1], tf.float32)   # [B, 1]: broadcast over the tries
  w = tf.cast(hw[:, 1:], tf.float32)
  area = h * w * draws[..., 0]
  aspect = draws[..., 1]
  cw = tf.round(tf.sqrt(area * aspect))
  ch = tf.round(tf.sqrt(area / aspect))
  fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  y = tf.floor(draws[..., 2] * (h - ch + 1))
  x = tf.floor(draws[..., 3] * (w - cw + 1))
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
  pick = lambda t: tf.gather(t, first, axis=1, batch_dims=1)  # noqa: E731
  tried = tf.stack([pick(y), pick(x), pick(ch), pick(cw)], axis=1)
  fallback = _centre_boxes(hw, ratio)
  any_fit = tf.reduce_any(fits, axis=1, keepdims=True)
  return tf.where(any_fit, tf.cast(tried, tf.int32), fallback)


@_plain
def _centre_boxes(hw, ratio):
  """Centre crop of each image, its aspect ratio clamped to `ratio`."""
  h = tf.cast(hw[:, 0], tf.float32)
  w = tf.cast(hw[:, 1], tf.float32)
  aspect = w / h
  cw = tf.where(aspect > ratio[1], tf.round(h * ratio[1]), w)
  ch = tf.where(aspect < ratio[0], tf.round(w / ratio[0]), h)
  y = tf.floor((h - ch) / 2)
  x = tf.floor((w - cw) / 2)
  return tf.cast(tf.stack([y, x, ch, cw], axis=1), tf.int32)


@_plain
def eval_boxes(hw, size):
  """The largest centre crop with the target's aspect ratio: the shorter
  side (relative to the target) is kept whole, the other is cut evenly."""
  target = float(size[1]) / float(size[0])
  return _centre_boxes(hw, (target, target))


@_plain
def to_channels(image, channels: int):
  """uint8 [..., c] with c in 1..4 -> [..., channels]: grayscale is
  repeated to RGB, alpha dropped, RGB averaged to gray (ITU-R 601 weights)."""
  static = image.shape[-1]
  if static is not None:   # arrays: one known channel count, no tf.cond
    if static == channels:
      return image
    if channels == 3:   # [h, w, c] or a batch of them
      gray_to_rgb = [1] * (image.shape.rank - 1) + [3]
      return tf.tile(image[..., :1], gray_to_rgb) if static < 3 else \
          image[..., :3]
    if channels == 1:
      return image[..., :1] if static < 3 else \
          tf.image.rgb_to_grayscale(image[..., :3])
  c = tf.shape(image)[-1]
  if channels == 3:
    return tf.cond(c < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]),
                   lambda: image[..., :3])
  if channels == 1:
    return tf.cond(c < 3, lambda: image[..., :1],
                   lambda: tf.image.rgb_to_grayscale(image[..., :3]))
  raise ValueError(f"images convert to 1 or 3 channels, not {channels}.")


@_plain
def decode(data):
  """Encoded PNG/JPEG/GIF/BMP bytes -> uint8 [h, w, c], c as stored."""
  # expand_animations=False: a GIF gives its first frame, not [F,h,w,3].
  return tf.io.decode_image(data, channels=0, dtype=tf.uint8,
                            expand_animations=False)


@_plain
def resize_batch(images, size, channels: int, training: bool, seed,
                 first_row=0, global_batch: int | None = None,
                 flip: bool = False):
  """Rows [first_row, first_row + b) of a global micro-batch -> (float32
  [b, H, W, channels] in [0, 1], ok float32 [b]).

  images: uint8 [b, h, w, c] (one shape), or a string [b] tensor of encoded
  images of any size. seed: int64 [2] of the global micro-batch (training).
  ok is 0 for an encoded image that does not decode (its row is then
  zeros): the batch keeps its static shape and the caller gives the row
  weight 0; arrays are always ok.
  """
  encoded = images.dtype == tf.string
  batch = tf.shape(images)[0]
  total = batch if global_batch is None else global_batch
  first = tf.cast(first_row, tf.int32)

  def mine(draw):
    return draw if global_batch is None else draw[first:first + batch]

  draws = None
  if training:
    draws = mine(crop_draws(tf.random.stateless_uniform(
        [total, TRIES, 4], seed=tf.random.experimental.stateless_fold_in(
            seed, _CROP_SALT))))
  shape = [*size, channels]
  if encoded:
    out, ok = _catching_failures(
        lambda items: _decode_crop_resize(items, draws, size, channels),
        images, channels, batch, shape)
  else:
    image_hw = tf.shape(images)[1:3]
    pixels = to_channels(images, channels)
    out = _crop_and_resize(pixels, tf.tile(image_hw[None], [batch, 1]),
                           draws, size, channels)
    ok = tf.ones([batch], tf.float32)
  if training and flip:
    coin = mine(tf.random.stateless_uniform(
        [total, 1, 1, 1], seed=tf.random.experimental.stateless_fold_in(
            seed, _FLIP_SALT)))
    out = tf.where(coin < 0.5, tf.reverse(out, axis=[2]), out)
  return tf.clip_by_value(out, 0.0, 255.0) * (1.0 / 255.0), ok


def _decode_crop_resize(items, draws, size, channels: int):
  """Encoded images [b] -> float32 [b, *size, channels]: the sizes from the
  images' headers, the boxes for the whole batch at once (random-resized
  from crop_draws [b, TRIES, 4], or centred when draws is None), then ONE
  loop that decodes, crops and resizes each image; raises if one does not
  decode or does not have the pixel count its header says.
  Measured, decode + crop + resize per 64x64 JPEG (28x28 in brackets):
  110 us (66) with a decode loop, a ragged batch and a crop loop; 77 (56)
  with one loop; ~70 with the JPEG headers read on the host. Boxes
  computed per image inside the loop instead cost ~20 us an image in small
  ops; a loop's own cost is ~10 us an image."""
  hw = sizes(items)
  boxes = (boxes_of_draws(hw, draws) if draws is not None
           else eval_boxes(hw, size))

  def one(args):
    item, image_hw, box = args
    # The header's size is the one the decoder uses (sizes reads the
    # first frame header as libjpeg does, else leaves the row to libjpeg;
    # libpng reads IHDR and fails on one that does not pass its CRC), so
    # the two cannot differ for an image that decodes. Should their pixel
    # counts ever differ, the reshape fails and the fallback's _decodable,
    # which compares the two, takes the row as damaged (named, weight 0 or
    # a stop). (An assert op here, on the hot path, cost 30 us an image.)
    image = tf.reshape(to_channels(decode(item), channels),
                       [image_hw[0], image_hw[1], channels])
    return _crop_resized(image, box, size, channels)

  return tf.map_fn(one, (items, hw, boxes),
                   fn_output_signature=tf.TensorSpec([*size, channels],
                                                     tf.float32))


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC): the frame
# header after one holds the image's height and width.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_hw(data: bytes):
  """(height, width) from a JPEG's first frame header, walking the marker
  segments as libjpeg does; None where this walk is not sure (garbage
  between segments, a cut header, a zero size): such rows are left to
  libjpeg itself."""
  n = len(data)
  if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
    return None
  i = 2
  while i + 4 <= n:
    if data[i] != 0xFF:
      return None   # libjpeg skips such bytes with a warning
    code = data[i + 1]
    if code == 0xFF:   # fill byte
      i += 1
    elif code in _JPEG_SOF:
      if i + 9 > n:
        return None
      h, w = struct.unpack_from(">HH", data, i + 5)
      return (h, w) if h and w else None
    elif 0xD0 <= code <= 0xD9 or code == 0x01:   # markers without length
      i += 2
    else:
      i += 2 + ((data[i + 2] << 8) | data[i + 3])
  return None


def _png_hw(data: bytes):
  """(height, width) from a PNG's IHDR (big-endian at bytes 16-23)."""
  if len(data) < 24 or data[:8] != _PNG_MAGIC:
    return None
  w, h = struct.unpack_from(">II", data, 16)
  return (h, w) if 0 < h < 2**31 and 0 < w < 2**31 else None


def _header_sizes(items) -> np.ndarray:
  """int32 [b, 2] from the headers of encoded images (a NumPy object
  array of bytes); -1 where the header is not a JPEG's or PNG's or this
  reading of it is not sure."""
  out = np.full((len(items), 2), -1, np.int32)
  for row, data in enumerate(items):
    hw = _jpeg_hw(data) or _png_hw(data)
    if hw:
      out[row] = hw
  return out


@_plain
def sizes(items):
  """int32 [b, 2] (height, width) of encoded images [b]. JPEG and PNG
  headers are read on the host in one call for the batch (~1 us an image);
  the rows it leaves (other formats, unusual headers) are decoded, or
  their JPEG header read by libjpeg, in a loop of their own. Measured per
  64x64 JPEG: 4 us, against 15 for that loop over every row."""
  hw = tf.ensure_shape(
      tf.numpy_function(_header_sizes, [items], tf.int32, stateful=False),
      [None, 2])
  rows = tf.range(tf.shape(items)[0])
  known = hw[:, 0] >= 0
  unknown = tf.logical_not(known)

  def header(item):
    return tf.cond(tf.io.is_jpeg(item),
                   lambda: tf.io.extract_jpeg_shape(item)[:2],
                   lambda: tf.shape(decode(item))[:2])

  def fill_in():
    other_hw = tf.map_fn(header, tf.boolean_mask(items, unknown),
                         fn_output_signature=tf.TensorSpec([2], tf.int32))
    return tf.dynamic_stitch(
        [tf.boolean_mask(rows, known), tf.boolean_mask(rows, unknown)],
        [tf.boolean_mask(hw, known), other_hw])

  # The usual batch (all JPEG or PNG) skips the loop and its set-up.
  return tf.cond(tf.reduce_all(known), lambda: hw, fill_in)


def _crop_and_resize(pixels, hw, draws, size, channels: int):
  """pixels: uint8 [b, h, w, c] of sizes hw int32 [b, 2] -> float32
  [b, *size, channels]: the crops (random-resized from crop_draws, or
  centred when draws is None), resized. The boxes are computed for the
  whole batch at once: per image, only the slice and the resize run in the
  loop."""
  boxes = (boxes_of_draws(hw, draws) if draws is not None
           else eval_boxes(hw, size))

  return tf.map_fn(lambda args: _crop_resized(*args, size, channels),
                   (pixels, boxes),
                   fn_output_signature=tf.TensorSpec([*size, channels],
                                                     tf.float32))


def _crop_resized(image, box, size, channels: int):
  """One image's box (y, x, height, width), cut out and resized to float32
  [*size, channels]."""
  crop = tf.slice(image, [box[0], box[1], 0], [box[2], box[3], channels])
  out = _resize(tf.cast(crop, tf.float32), box[2:], size)
  return tf.ensure_shape(out, [*size, channels])


@_plain
def _resize(crop, crop_hw, size):
  """Bilinear; antialiased where the crop shrinks (photos are often shrunk
  many times over). Enlarging, the antialiasing kernel only costs: with it
  the whole decode, crop and resize took 100 instead of 57 us per 28x28
  JPEG here, so plain bilinear then."""
  shrinks = tf.logical_or(crop_hw[0] > size[0], crop_hw[1] > size[1])
  return tf.cond(shrinks,
                 lambda: tf.image.resize(crop, size, antialias=True),
                 lambda: tf.image.resize(crop, size))


def _catching_failures(transform, items, channels, batch, shape):
  """transform(items) -> float32 [b, *shape]; a row whose image does not
  decode becomes zeros with ok 0 instead of failing the pipeline.

  Graph ops cannot catch errors, tf.data can. Fast path: the transform of
  the whole batch, in a one-element dataset with ignore_errors. Only when
  it fails (a damaged image in the batch) the fallback runs: an inner
  dataset over the rows with ignore_errors finds the rows that decode, the
  others are replaced by a 1x1 image, and the same transform runs on that
  batch. A good row is thus computed the same whichever path its batch (or
  a worker's share of it) took; the fallback decodes twice, once per row in
  a dataset (~2x the cost): paid only by batches with a damaged image.
  The transform is traced once and called on both paths (start-up: the
  pipeline's graph is built and optimized once more for each copy)."""
  transform = tf.function(transform, autograph=False)
  fast = tf.data.Dataset.from_tensors(items).map(
      lambda x: (transform(x), tf.ones([batch], tf.float32))).ignore_errors()

  def fallback(x):
    ok = _decodable(x, channels, batch)
    stand_in = tf.io.encode_png(tf.zeros([1, 1, channels], tf.uint8))
    out = transform(tf.where(ok > 0, x, stand_in))
    return out * ok[:, None, None, None], ok

  slow = tf.data.Dataset.from_tensors(items).map(fallback)
  out, ok = fast.concatenate(slow).take(1).get_single_element()
  return tf.ensure_shape(out, [None, *shape]), ok


def _decodable(items, channels, batch):
  """float32 [b]: 1 where the row's image decodes (as _decode_crop_resize
  decodes it) to the size the host read from its header, where it read one
  (elsewhere sizes takes the decoder's own)."""
  rows = tf.range(batch)

  def check(i, item):
    shape = tf.shape(to_channels(decode(item), channels))
    header = tf.numpy_function(_header_sizes, [item[None]], tf.int32,
                               stateful=False)[0]
    agree = tf.logical_or(header[0] < 0,
                          tf.reduce_all(tf.equal(shape[:2], header)))
    with tf.control_dependencies([tf.debugging.assert_equal(agree, True)]):
      return i, tf.identity(shape)

  inner = tf.data.Dataset.from_tensor_slices((rows, items)).map(
      check).ignore_errors()
  # A batch in which every row failed yields no element: the empty pair
  # appended after it is taken instead.
  empty = tf.data.Dataset.from_tensors(
      (tf.zeros([0], tf.int32), tf.zeros([0, 3], tf.int32)))
  kept, _ = inner.batch(tf.cast(batch, tf.int64)).concatenate(
      empty).take(1).get_single_element()
  return tf.scatter_nd(kept[:, None], tf.ones_like(kept, tf.float32),
                       [batch])
