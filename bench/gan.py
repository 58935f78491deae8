"""The hand-written GAN loop of examples/dcgan.py: plain tf.function,
GradientTape, two Keras Adams, SIMULTANEOUS updates (both players'
gradients taken at the weights of the start of the update, then both
applied), the framework's semantics. bench.paired races it against the
trainer's chunk; tests/test_custom_step_unit.py checks the trainer's GAN
step against the same step function."""

import numpy as np
import tensorflow as tf


def adam():
  """The optimizer examples.dcgan gives each player."""
  return tf.keras.optimizers.Adam(2e-3, beta_1=0.5)


def simultaneous_step(generator, discriminator, opt_d, opt_g):
  """step(images, z): one update of both players on one batch."""
  from examples import dcgan
  g, d = generator, discriminator

  def step(images, z):
    with tf.GradientTape(persistent=True) as tape:
      fake = g(z, training=True)
      real_logits = d(images, training=True)
      fake_logits = d(fake, training=True)
      d_loss = tf.reduce_mean(dcgan.bce(1, real_logits)
                              + dcgan.bce(0, fake_logits))
      g_loss = tf.reduce_mean(dcgan.bce(1, fake_logits))
    d_grads = tape.gradient(d_loss, d.trainable_variables)
    g_grads = tape.gradient(g_loss, g.trainable_variables)
    opt_d.apply_gradients(zip(d_grads, d.trainable_variables))
    opt_g.apply_gradients(zip(g_grads, g.trainable_variables))
  return step


def raw_loop(batch: int, seed: int = 0):
  """train_loop(n): n raw updates in one tf.function, on the digits in
  [0, 1] (an in-memory repeat/batch pipeline) with fresh N(0,1) noise."""
  from sklearn.datasets import load_digits
  from examples import dcgan
  images = (load_digits().images[..., None] / 16.0).astype(np.float32)
  data = iter(tf.data.Dataset.from_tensor_slices(images).repeat()
              .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
  g, d = dcgan.generator(), dcgan.discriminator(images.shape[1:])
  opt_d, opt_g = adam(), adam()
  opt_d.build(d.trainable_variables)
  opt_g.build(g.trainable_variables)
  step = simultaneous_step(g, d, opt_d, opt_g)
  counter = tf.Variable(0, dtype=tf.int64, trainable=False)

  @tf.function
  def train_loop(n):
    for _ in tf.range(n):
      z = tf.random.stateless_normal(
          [batch, dcgan.LATENT],
          seed=tf.stack([tf.constant(seed, tf.int64), counter]))
      step(next(data), z)
      counter.assign_add(1)
  return train_loop
