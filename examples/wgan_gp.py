"""A WGAN-GP on the embedded digits: n_critic=5 through Task.update_every.

  .venv/bin/python -m trainer.main --task=examples.wgan_gp:WGANGP \\
      --train_steps=500 --global_batch_size=64 --model_dir=runs/wgan_gp

What it shows:
- `update_every("generator") == 5`: the critic steps every update, the
  generator on updates 5, 10, 15, ... only, with that update's gradient;
  its Adam state (iterations, moments) moves only then, so after N updates
  the generator's optimizer has counted N // 5 steps.
- `ctx.updates("generator")`: the generator's loss and backward pass run
  only on its turns (tf.cond); on the others zeros are handed over, which
  the framework drops anyway.
- The gradient penalty (Gulrajani et al., 2017) through a nested
  GradientTape: the norm of d critic / d input at points between real and
  generated images, pushed to 1. Its per-example draws (`ctx.normal`,
  `ctx.uniform`) are keyed by stream position: the same on every topology
  and after a resume.
- `eval_step`: the critic's estimate of the Wasserstein distance between
  real and generated digits (`w_distance`, higher = easier to tell apart).
"""

import keras
import tensorflow as tf

import trainer
from trainer.task import ClassificationTask

LATENT = 16
N_CRITIC = 5
PENALTY = 10.0


def generator(shape) -> keras.Model:
  z = keras.Input((LATENT,))
  x = keras.layers.Dense(128, activation="relu")(z)
  x = keras.layers.Dense(128, activation="relu")(x)
  size = 1
  for n in shape:
    size *= n
  x = keras.layers.Dense(size, activation="sigmoid", dtype="float32")(x)
  return keras.Model(z, keras.layers.Reshape(shape)(x), name="generator")


def critic(shape) -> keras.Model:
  # No batch normalization: the penalty is per example (Gulrajani et al.).
  images = keras.Input(shape)
  x = keras.layers.Flatten()(images)
  x = keras.layers.Dense(128)(x)
  x = keras.layers.LeakyReLU(0.2)(x)
  x = keras.layers.Dense(128)(x)
  x = keras.layers.LeakyReLU(0.2)(x)
  return keras.Model(images, keras.layers.Dense(1, dtype="float32")(x),
                     name="critic")


def gradient_penalty(critic_model, real, fake, mix):
  """Per example: (|d critic(x) / dx| - 1)^2 at x = mix * real +
  (1 - mix) * fake. Differentiable in the critic's weights (the outer tape
  sees the inner tape's gradient)."""
  points = mix * real + (1.0 - mix) * fake
  with tf.GradientTape() as tape:
    tape.watch(points)
    scores = critic_model(points, training=True)
  grads = tape.gradient(scores, points)
  norms = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=[1, 2, 3]) + 1e-12)
  return tf.square(norms - 1.0)


class WGANGP(ClassificationTask):
  """Digits images (8x8, in [0, 1]) from the built-in dataset; labels unused."""

  def __init__(self, config):
    super().__init__(config, model_fn=None)

  def build_model(self, input_spec):
    shape = tuple(input_spec.shape)
    return {"critic": critic(shape), "generator": generator(shape)}

  def optimizers(self):
    # The paper's Adam settings (beta_1 0, beta_2 0.9), a larger step for
    # a few hundred updates.
    return {"critic": keras.optimizers.Adam(1e-3, beta_1=0.0, beta_2=0.9),
            "generator": keras.optimizers.Adam(1e-3, beta_1=0.0,
                                               beta_2=0.9)}

  def update_every(self, name):
    return N_CRITIC if name == "generator" else 1

  def train_step(self, batch, ctx):
    images, _ = batch
    g, d = ctx.models["generator"], ctx.models["critic"]
    fake = g(ctx.normal([LATENT]), training=True)
    mix = ctx.uniform([1, 1, 1], salt=1)
    with tf.GradientTape() as tape:
      real_scores = d(images, training=True)[:, 0]
      fake_scores = d(tf.stop_gradient(fake), training=True)[:, 0]
      penalty = gradient_penalty(d, images, tf.stop_gradient(fake), mix)
      d_per_example = fake_scores - real_scores + PENALTY * penalty
      d_loss = ctx.scale_loss(d_per_example, d)
    ctx.minimize(tape, d_loss, "critic")

    def generator_gradients():
      with tf.GradientTape() as g_tape:
        # Again from the noise: the forward pass above is outside this tape.
        scores = d(g(ctx.normal([LATENT]), training=True), training=True)
        g_loss = ctx.scale_loss(-scores[:, 0], g)
      return ctx.gradients(g_tape, g_loss, "generator")

    def off_turn():
      return [tf.zeros(v.shape) for v in ctx.variables("generator")]

    ctx.apply_gradients(
        tf.cond(ctx.updates("generator"), generator_gradients, off_turn),
        "generator")
    return {"loss": d_per_example, "w_distance": real_scores - fake_scores,
            "penalty": penalty}

  def eval_step(self, batch, ctx):
    images, _ = batch
    g, d = ctx.models["generator"], ctx.models["critic"]
    # Eval noise from the eval example's index: the same every evaluation.
    seed = tf.stack([tf.zeros_like(ctx.positions), ctx.positions], axis=-1)
    z = tf.map_fn(lambda s: tf.random.stateless_normal([LATENT], seed=s),
                  seed, fn_output_signature=tf.float32)
    real_scores = d(images, training=False)[:, 0]
    fake_scores = d(g(z, training=False), training=False)[:, 0]
    return {"loss": fake_scores - real_scores,
            "w_distance": real_scores - fake_scores}


if __name__ == "__main__":
  import sys
  dirs = [a.split("=", 1)[1] for a in sys.argv[1:]
          if a.startswith("--model_dir=")]
  config = trainer.Config(task="examples.wgan_gp:WGANGP", train_steps=500,
                          global_batch_size=64, eval_every=250,
                          model_dir=dirs[0] if dirs else "runs/wgan_gp")
  print(trainer.train(config, WGANGP(config)))
