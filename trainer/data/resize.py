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
  h = tf.cast(hw[:, :1], tf.float32)   # [B, 1]: broadcast over the tries
  w = tf.cast(hw[:, 1:], tf.float32)
  area = h * w * (scale[0] + (scale[1] - scale[0]) * uniforms[..., 0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * uniforms[..., 1])
  cw = tf.round(tf.sqrt(area * aspect))
  ch = tf.round(tf.sqrt(area / aspect))
  fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  y = tf.floor(uniforms[..., 2] * (h - ch + 1))
  x = tf.floor(uniforms[..., 3] * (w - cw + 1))
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
  """uint8 [h, w, c] with c in 1..4 -> [h, w, channels]: grayscale is
  repeated to RGB, alpha dropped, RGB averaged to gray (ITU-R 601 weights)."""
  static = image.shape[-1]
  if static is not None:   # arrays: one known channel count, no tf.cond
    if static == channels:
      return image
    if channels == 3:
      return tf.tile(image[..., :1], [1, 1, 3]) if static < 3 else \
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

  if training:
    uniforms = mine(tf.random.stateless_uniform(
        [total, TRIES, 4], seed=tf.random.experimental.stateless_fold_in(
            seed, _CROP_SALT)))
  else:
    uniforms = tf.zeros([batch, TRIES, 4])

  def one(args):
    item, u = args
    image = to_channels(decode(item) if encoded else item, channels)
    hw = tf.shape(image)[None, :2]
    box = (random_crop_boxes(hw, u[None]) if training
           else eval_boxes(hw, size))[0]
    crop = image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
    # Antialiased: photos are often shrunk many times over.
    out = tf.image.resize(tf.cast(crop, tf.float32), size, antialias=True)
    return tf.ensure_shape(out, [*size, channels])

  if encoded:
    out, ok = _map_dropping_failures(one, images, uniforms, batch,
                                     [*size, channels])
  else:
    out = tf.map_fn(one, (images, uniforms),
                    fn_output_signature=tf.TensorSpec([*size, channels],
                                                      tf.float32))
    ok = tf.ones([batch], tf.float32)
  if training and flip:
    coin = mine(tf.random.stateless_uniform(
        [total, 1, 1, 1], seed=tf.random.experimental.stateless_fold_in(
            seed, _FLIP_SALT)))
    out = tf.where(coin < 0.5, tf.reverse(out, axis=[2]), out)
  return tf.clip_by_value(out, 0.0, 255.0) * (1.0 / 255.0), ok


def _map_dropping_failures(fn, items, uniforms, batch, shape):
  """fn over the rows; a row whose fn raises (an image that does not
  decode) becomes zeros with ok 0 instead of failing the pipeline. Graph
  ops cannot catch errors, tf.data can: an inner dataset over the rows with
  ignore_errors drops the failing ones, and the survivors are scattered
  back to their row numbers."""
  rows = tf.range(batch)
  inner = tf.data.Dataset.from_tensor_slices((rows, items, uniforms)).map(
      lambda i, item, u: (i, fn((item, u)))).ignore_errors()
  # A batch in which every row failed yields no element: the empty pair
  # appended after it is taken instead.
  empty = tf.data.Dataset.from_tensors(
      (tf.zeros([0], tf.int32), tf.zeros([0, *shape], tf.float32)))
  kept, images = inner.batch(tf.cast(batch, tf.int64)).concatenate(
      empty).take(1).get_single_element()
  out = tf.scatter_nd(kept[:, None], images, tf.concat([[batch], shape], 0))
  ok = tf.scatter_nd(kept[:, None], tf.ones_like(kept, tf.float32), [batch])
  return tf.ensure_shape(out, [None, *shape]), ok
