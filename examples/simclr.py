"""SimCLR-style contrastive learning on the digits, then a linear probe.

  # 1. contrastive pre-training of the encoder (labels unused)
  python -m trainer.main --task=examples.simclr:SimCLR --train_steps=300 \\
      --global_batch_size=128 --optimizer=adam --learning_rate=0.003 \\
      --model_dir=runs/simclr
  # 2. the linear probe: a linear classifier on the frozen encoder's features
  python -m trainer.main --task=examples.simclr:LinearProbe \\
      --task_args=encoder_dir=runs/simclr --train_steps=300 \\
      --optimizer=adam --learning_rate=0.01 --model_dir=runs/simclr_probe

The probe's eval_accuracy is the linear-probe accuracy of the encoder.
Optional --task_args of SimCLR: temperature=T (default 0.2).

What it shows:
- two augmented views per example (pixel drop-out mask, contrast and
  noise), drawn from `ctx.uniform` / `ctx.normal`: keyed by the example's
  stream position, so every topology and a resumed run draw the same views;
- NT-Xent loss whose negatives come from EVERY replica: each replica
  gathers the embeddings (and stream positions) of the whole global
  micro-batch with `ctx.all_gather`, computes the loss of its own rows
  against them, and differentiates through the gather. The loss and the
  update are therefore the same however the batch is split across replicas
  or workers. With --grad_accum_steps=K the negatives of an example are
  the other examples of its micro-batch (global batch / K).
- a dict of models {"model": encoder, "head": projection head}: the probe
  reuses the encoder (examples/frozen.py), the head is discarded.
"""

import keras
import tensorflow as tf

from examples import frozen
from trainer.errors import UserError
from trainer.task import ClassificationTask

FEATURES = 32


def encoder(input_shape) -> keras.Model:
  images = keras.Input(input_shape)
  x = keras.layers.Flatten()(images)
  x = keras.layers.Dense(64, activation="relu")(x)
  return keras.Model(images, keras.layers.Dense(FEATURES, dtype="float32")(x),
                     name="encoder")


def projection_head() -> keras.Model:
  features = keras.Input((FEATURES,))
  x = keras.layers.Dense(32, activation="relu")(keras.layers.ReLU()(features))
  return keras.Model(features, keras.layers.Dense(16, dtype="float32")(x),
                     name="head")


def view(images, ctx, salt: int):
  """One random view per example: drop 20% of the pixels, scale the
  contrast by U[0.7, 1.3), add N(0, 0.05) noise."""
  shape = images.shape[1:]
  keep = tf.cast(ctx.uniform(shape, salt=salt) > 0.2, images.dtype)
  contrast = 0.7 + 0.6 * ctx.uniform([1] * len(shape), salt=salt + 1)
  noise = 0.05 * ctx.normal(shape, salt=salt + 2)
  return images * keep * contrast + noise


def nt_xent(z_a, z_b, positions, all_a, all_b, all_positions, all_weight,
            temperature):
  """Per-example NT-Xent of the local rows (z_a, z_b: [b, d], normalised)
  against the gathered global micro-batch (all_*: [N, d]). The positive
  of row i in view a is its own view b; every other row of both views
  (real examples only) is a negative. Returns [b]."""
  # Where each local row sits in the gathered batch: found from the stream
  # positions, so it does not depend on how the batch was split.
  own = tf.cast(tf.equal(positions[:, None], all_positions[None, :]),
                tf.float32)                                      # [b, N]
  pad = tf.zeros_like(own) + tf.cast(all_weight <= 0, tf.float32)[None, :]
  none = tf.zeros_like(own)
  candidates = tf.concat([all_a, all_b], axis=0)                 # [2N, d]

  def side(z, excluded, positive):
    logits = tf.matmul(z, candidates, transpose_b=True) / temperature
    # Its own embedding and padding rows are never candidates.
    logits -= 1e9 * tf.minimum(excluded, 1.0)
    return (tf.reduce_logsumexp(logits, axis=1)
            - tf.reduce_sum(logits * positive, axis=1))

  # Candidates are [view a | view b] of every gathered row: for view a the
  # row itself is in the first block and its positive in the second.
  loss_a = side(z_a, tf.concat([own + pad, pad], 1), tf.concat([none, own], 1))
  loss_b = side(z_b, tf.concat([pad, own + pad], 1), tf.concat([own, none], 1))
  return 0.5 * (loss_a + loss_b)


class SimCLR(ClassificationTask):
  """Contrastive pre-training of `encoder` on the digits (labels unused)."""

  def __init__(self, config):
    super().__init__(config, model_fn=None)
    args = config.task_kwargs
    unknown = sorted(set(args) - {"temperature"})
    if unknown:
      raise UserError(f"examples.simclr:SimCLR: unknown --task_args "
                      f"{', '.join(unknown)}; it takes temperature=T.")
    try:
      self.temperature = float(args.get("temperature", 0.2))
    except ValueError:
      raise UserError(f"--task_args=temperature={args['temperature']!r} must "
                      "be a number.") from None
    if self.temperature <= 0:
      raise UserError("--task_args=temperature must be > 0.")

  def build_model(self, input_spec):
    return {"model": encoder(tuple(input_spec.shape)),
            "head": projection_head()}

  def embed(self, images, ctx):
    z = ctx.models["head"](ctx.model(images, training=True), training=True)
    return tf.math.l2_normalize(tf.cast(z, tf.float32), axis=-1)

  def train_step(self, batch, ctx):
    images, _ = batch
    a, b = view(images, ctx, salt=0), view(images, ctx, salt=10)
    with tf.GradientTape() as tape:
      z_a, z_b = self.embed(a, ctx), self.embed(b, ctx)
      per_example = nt_xent(
          z_a, z_b, ctx.positions, ctx.all_gather(z_a), ctx.all_gather(z_b),
          ctx.all_gather(ctx.positions), ctx.all_gather(ctx.weight),
          self.temperature)
      loss = ctx.scale_loss(per_example)
    ctx.minimize(tape, loss)
    return {"loss": per_example}

  def eval_step(self, batch, ctx):
    """Alignment of two fixed views (keyed by the eval position): the mean
    cosine similarity of an example's two embeddings."""
    images, _ = batch
    seed = tf.stack([tf.zeros_like(ctx.positions), ctx.positions], axis=-1)
    noise = tf.map_fn(
        lambda s: tf.random.stateless_normal(images.shape[1:], seed=s),
        seed, fn_output_signature=tf.float32)
    z_a = tf.math.l2_normalize(ctx.models["head"](ctx.model(images)), -1)
    z_b = tf.math.l2_normalize(
        ctx.models["head"](ctx.model(images + 0.05 * noise)), -1)
    return {"alignment": tf.reduce_sum(z_a * z_b, axis=-1)}


class LinearProbe(ClassificationTask):
  """A linear classifier on the frozen encoder of a SimCLR run
  (--task_args=encoder_dir=DIR): its eval_accuracy is the probe's."""

  def __init__(self, config):
    super().__init__(config, model_fn=None)
    if set(config.task_kwargs) != {"encoder_dir"}:
      raise UserError("examples.simclr:LinearProbe needs --task_args="
                      "encoder_dir=DIR (a SimCLR run's --model_dir) and "
                      "nothing else.")
    self.encoder_dir = config.task_kwargs["encoder_dir"]

  def build_model(self, input_spec):
    features = frozen.load(self.encoder_dir, input_spec, self.config.dataset,
                           "--task_args=encoder_dir")
    num_classes = self.source(self.config.train_split).num_classes
    images = keras.Input(tuple(input_spec.shape))
    logits = keras.layers.Dense(num_classes, dtype="float32", name="probe")(
        features(images, training=False))
    return keras.Model(images, logits, name="linear_probe")
