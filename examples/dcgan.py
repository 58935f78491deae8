"""A DCGAN on the embedded digits: two models, two optimizers, one step.

  .venv/bin/python -m trainer.main --task=examples.dcgan:DCGAN \\
      --train_steps=600 --global_batch_size=64 --model_dir=runs/dcgan

What it shows:
- `build_model` returns a dict of named models: each is checkpointed under
  model/<name> and restored by that name.
- `optimizers` returns a dict of Keras optimizers, one per model of the same
  name (the default `optimizer_variables`).
- `train_step` written with the step context: the latent noise is drawn per
  example from its stream position (`ctx.normal`), so every topology and a
  resumed run draw the same noise; each player's loss is scaled by the
  GLOBAL batch (`ctx.scale_loss`) and its gradients handed to the framework
  (`ctx.minimize`), which reduces them once per optimizer per update, drops
  the whole update if either is non-finite, and applies both at the end of
  the update: the generator's gradient is taken at the discriminator of the
  start of the update (simultaneous updates), whatever --grad_accum_steps.
- `eval_step`: the discriminator's accuracy on real and generated digits.
"""

import keras
import tensorflow as tf

import trainer
from trainer.task import ClassificationTask

LATENT = 16


def generator() -> keras.Model:
  z = keras.Input((LATENT,))
  x = keras.layers.Dense(2 * 2 * 64, activation="relu")(z)
  x = keras.layers.Reshape((2, 2, 64))(x)
  x = keras.layers.Conv2DTranspose(32, 3, strides=2, padding="same",
                                   activation="relu")(x)
  x = keras.layers.Conv2DTranspose(1, 3, strides=2, padding="same",
                                   activation="sigmoid", dtype="float32")(x)
  return keras.Model(z, x, name="generator")


def discriminator(shape) -> keras.Model:
  images = keras.Input(shape)
  x = keras.layers.Conv2D(32, 3, strides=2, padding="same")(images)
  x = keras.layers.LeakyReLU(0.2)(x)
  x = keras.layers.Conv2D(64, 3, strides=2, padding="same")(x)
  x = keras.layers.LeakyReLU(0.2)(x)
  x = keras.layers.Flatten()(x)
  return keras.Model(images, keras.layers.Dense(1, dtype="float32")(x),
                     name="discriminator")


def bce(labels, logits):
  """Per-example binary cross-entropy with logits."""
  return tf.nn.sigmoid_cross_entropy_with_logits(
      labels=tf.fill(tf.shape(logits), float(labels)), logits=logits)[:, 0]


class DCGAN(ClassificationTask):
  """Digits images (8x8, in [0, 1]) from the built-in dataset; labels unused."""

  def __init__(self, config):
    super().__init__(config, model_fn=None)

  def build_model(self, input_spec):
    return {"generator": generator(),
            "discriminator": discriminator(tuple(input_spec.shape))}

  def optimizers(self):
    return {"discriminator": keras.optimizers.Adam(2e-3, beta_1=0.5),
            "generator": keras.optimizers.Adam(2e-3, beta_1=0.5)}

  def train_step(self, batch, ctx):
    images, _ = batch
    g, d = ctx.models["generator"], ctx.models["discriminator"]
    z = ctx.normal([LATENT])
    with tf.GradientTape(persistent=True) as tape:
      fake = g(z, training=True)
      real_logits = d(images, training=True)
      fake_logits = d(fake, training=True)
      d_per_example = bce(1, real_logits) + bce(0, fake_logits)
      g_per_example = bce(1, fake_logits)
      d_loss = ctx.scale_loss(d_per_example, d)
      g_loss = ctx.scale_loss(g_per_example, g)
    ctx.minimize(tape, d_loss, "discriminator")
    ctx.minimize(tape, g_loss, "generator")
    return {"d_loss": d_per_example, "g_loss": g_per_example}

  def eval_step(self, batch, ctx):
    images, _ = batch
    g, d = ctx.models["generator"], ctx.models["discriminator"]
    # Eval noise from the eval example's index: the same every evaluation.
    seed = tf.stack([tf.zeros_like(ctx.positions), ctx.positions], axis=-1)
    z = tf.map_fn(lambda s: tf.random.stateless_normal([LATENT], seed=s),
                  seed, fn_output_signature=tf.float32)
    real_logits = d(images, training=False)
    fake_logits = d(g(z, training=False), training=False)
    real_ok = tf.cast(real_logits[:, 0] > 0, tf.float32)
    fake_ok = tf.cast(fake_logits[:, 0] < 0, tf.float32)
    return {"loss": bce(1, real_logits) + bce(0, fake_logits),
            "d_accuracy": (real_ok + fake_ok) / 2.0,
            "g_fool_rate": 1.0 - fake_ok}


if __name__ == "__main__":
  import sys
  dirs = [a.split("=", 1)[1] for a in sys.argv[1:]
          if a.startswith("--model_dir=")]
  config = trainer.Config(task="examples.dcgan:DCGAN", train_steps=600,
                          global_batch_size=64, eval_every=200,
                          model_dir=dirs[0] if dirs else "runs/dcgan")
  print(trainer.train(config, DCGAN(config)))
