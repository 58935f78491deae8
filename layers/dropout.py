"""Dropout whose mask depends on (seed, example position), not on topology."""

import zlib

import keras
import tensorflow as tf

from layers import seeds


class Dropout(keras.layers.Layer):
  """Inverted dropout. Inside the trainer's step the mask comes from
  `layers.seeds` (exact across replica counts and restarts); anywhere else it
  falls back to Keras' own stateful dropout."""

  def __init__(self, rate: float, **kwargs):
    super().__init__(**kwargs)
    self.rate = float(rate)
    self._fallback = keras.layers.Dropout(rate)
    # The salt names the layer's own stream; from the layer name so that two
    # dropout layers in one model draw independent masks.
    self._salt = zlib.crc32(self.name.encode()) & 0x7FFFFFFF

  def call(self, inputs, training=None):
    if not training or self.rate == 0.0:
      return inputs
    u = seeds.uniform_rows(self._salt, inputs.shape[1:], tf.shape(inputs)[0])
    if u is None:
      return self._fallback(inputs, training=training)
    keep = tf.cast(u >= self.rate, inputs.dtype)
    return inputs * keep / tf.cast(1.0 - self.rate, inputs.dtype)

  def get_config(self):
    return {**super().get_config(), "rate": self.rate}
