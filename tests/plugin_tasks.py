"""Tasks that tests load with --task=plugin_tasks:Name (PYTHONPATH=tests)."""

import numpy as np
import keras
import tensorflow as tf

import layers
from trainer import Task, array_source
from trainer.task import ClassificationTask

# The stream position whose example the NaN task poisons.
POISONED_POSITION = 100


class TinyDigits(ClassificationTask):
  """A user task defined outside the framework: digits with its own model."""

  def __init__(self, config):
    super().__init__(config, model_fn=None)

  def build_model(self, input_spec):
    inputs = keras.Input(input_spec.shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(32, activation="tanh")(x)
    x = layers.Dropout(0.1)(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


class NanDigits(ClassificationTask):
  """The cnn on digits, with a NaN injected into the batch that holds stream
  position POISONED_POSITION (a test-only dataset hook, in the task)."""

  def __init__(self, config):
    super().__init__(config, model_fn=layers.get("cnn"))

  def preprocess(self, features, labels, meta, training):
    images, labels = super().preprocess(features, labels, meta, training)
    if training:
      poisoned = tf.equal(meta["pos"], POISONED_POSITION)[:, None, None, None]
      images = tf.where(poisoned, tf.constant(np.nan, tf.float32), images)
    return images, labels


def _linear_data(n, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  return x


# y = x . W + b with known W, b: the regression task must recover them.
TRUE_W = np.array([[1.5], [-2.0], [0.5], [3.0]], np.float32)
TRUE_B = np.float32(0.25)


class LinearRegression(Task):
  """Mean squared error on y = xW + b (noise-free): recovers W and b."""

  def source(self, split):
    x = _linear_data(2048 if split == "train" else 256,
                     1 if split == "train" else 2)
    return array_source(f"linear:{split}", x, x @ TRUE_W + TRUE_B)

  def build_model(self, input_spec):
    inputs = keras.Input(input_spec.shape)
    return keras.Model(inputs, keras.layers.Dense(1, name="linear")(inputs))

  def loss(self, labels, outputs):
    return tf.reduce_mean(tf.square(outputs - labels), axis=-1)

  def metrics(self):
    return {"mae": lambda y, p: tf.reduce_mean(tf.abs(p - y), axis=-1)}


class TwoHeads(Task):
  """A multi-output model: a regression head (y = xW + b) and a sign
  classifier (is x0 + x1 > 0); loss = 1.0 * mse + 0.5 * cross-entropy."""

  WEIGHTS = {"value": 1.0, "sign": 0.5}

  def source(self, split):
    x = _linear_data(2048 if split == "train" else 256,
                     3 if split == "train" else 4)
    labels = {"value": x @ TRUE_W + TRUE_B,
              "sign": (x[:, 0] + x[:, 1] > 0).astype(np.int32)}
    return array_source(f"two_heads:{split}", x, labels, num_classes=2)

  def build_model(self, input_spec):
    inputs = keras.Input(input_spec.shape)
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    value = keras.layers.Dense(1, name="value")(inputs)
    sign = keras.layers.Dense(2, name="sign")(hidden)
    return keras.Model(inputs, {"value": value, "sign": sign})

  def loss(self, labels, outputs):
    mse = tf.reduce_mean(tf.square(outputs["value"] - labels["value"]), -1)
    ce = keras.losses.sparse_categorical_crossentropy(
        labels["sign"], outputs["sign"], from_logits=True)
    return self.WEIGHTS["value"] * mse + self.WEIGHTS["sign"] * ce

  def metrics(self):
    return {
        "value_mae": lambda y, p: tf.reduce_mean(
            tf.abs(p["value"] - y["value"]), -1),
        "sign_accuracy": lambda y, p: tf.cast(tf.equal(
            tf.argmax(p["sign"], -1, output_type=tf.int32), y["sign"]),
            tf.float32),
    }


class ClippedLinear(LinearRegression):
  """Clips the all-reduced gradient to global norm 0.1 in the user hook."""

  CLIP = 0.1

  def transform_gradients(self, gradients, variables):
    clipped, _ = tf.clip_by_global_norm(gradients, self.CLIP)
    return clipped


class TwoInputs(Task):
  """A two-input regression: features {"x": [4], "scale": [1]}, target
  (xW + b) * scale; the model sees both inputs by name."""

  def source(self, split):
    n = 1024 if split == "train" else 128
    x = _linear_data(n, 5 if split == "train" else 6)
    scale = np.random.default_rng(7).uniform(0.5, 2.0, (n, 1)).astype(
        np.float32)
    return array_source(f"two_inputs:{split}", {"x": x, "scale": scale},
                        (x @ TRUE_W + TRUE_B) * scale)

  def build_model(self, input_spec):
    x = keras.Input(input_spec["x"].shape, name="x")
    scale = keras.Input(input_spec["scale"].shape, name="scale")
    value = keras.layers.Dense(1, name="value")(x)
    return keras.Model({"x": x, "scale": scale},
                       keras.layers.Multiply(name="scaled")([value, scale]))

  def loss(self, labels, outputs):
    return tf.reduce_mean(tf.square(outputs - labels), axis=-1)
# ---- user-written steps (issue 14) ------------------------------------
from examples import dcgan  # noqa: E402

# Adam's epsilon for the GAN equality tests. With Keras' 1e-7, Adam turns
# float-rounding differences in near-zero gradients (1 vs 2 replicas sum
# the batch in another order; so does a hand-written loop) into weight
# differences of ~1e-3 within 20 updates (measured: 1e-8 after update 1,
# 3e-4 after update 4, 6e-3 after 20); with 1e-2 they stay ~1e-8, so the
# tests can demand rtol 1e-5. The step itself is the example's.
GAN_EPSILON = 1e-2


def gan_adam():
  return keras.optimizers.Adam(2e-3, beta_1=0.5, epsilon=GAN_EPSILON)


class ExactDCGAN(dcgan.DCGAN):
  """examples.dcgan:DCGAN with GAN_EPSILON in both Adams."""

  def optimizers(self):
    return {"discriminator": gan_adam(), "generator": gan_adam()}


class NanDCGAN(ExactDCGAN):
  """The generator's loss (and so its gradient) is NaN at stream position
  POISONED_POSITION; the discriminator's stays finite. The framework must
  drop that whole update: neither optimizer applied."""

  def train_step(self, batch, ctx):
    images, _ = batch
    g, d = ctx.models["generator"], ctx.models["discriminator"]
    z = ctx.normal([dcgan.LATENT])
    poison = tf.where(tf.equal(ctx.positions, POISONED_POSITION),
                      tf.constant(np.nan, tf.float32), 1.0)
    with tf.GradientTape(persistent=True) as tape:
      fake = g(z, training=True)
      real_logits = d(images, training=True)
      fake_logits = d(fake, training=True)
      d_per_example = dcgan.bce(1, real_logits) + dcgan.bce(0, fake_logits)
      g_per_example = dcgan.bce(1, fake_logits) * poison
      d_loss = ctx.scale_loss(d_per_example, d)
      g_loss = ctx.scale_loss(g_per_example, g)
    ctx.minimize(tape, d_loss, "discriminator")
    ctx.minimize(tape, g_loss, "generator")
    return {"d_loss": d_per_example}


from examples import simclr  # noqa: E402


class LocalSimCLR(simclr.SimCLR):
  """A WRONG contrastive step: negatives from the replica's own rows only
  (no all_gather), so its loss depends on how the batch is split."""

  def train_step(self, batch, ctx):
    images, _ = batch
    a, b = simclr.view(images, ctx, salt=0), simclr.view(images, ctx, salt=10)
    with tf.GradientTape() as tape:
      z_a, z_b = self.embed(a, ctx), self.embed(b, ctx)
      per_example = simclr.nt_xent(z_a, z_b, ctx.positions, z_a, z_b,
                                   ctx.positions, ctx.weight,
                                   self.temperature)
      loss = ctx.scale_loss(per_example)
    ctx.minimize(tape, loss)
    return {"loss": per_example}


class BlockingDigits(ClassificationTask):
  """The mlp on digits whose training input blocks forever, once: the first
  time worker `block_worker` (TF_CONFIG's task index; 0 without one)
  preprocesses a batch holding stream position `block_position` or later,
  and `marker` does not exist yet, it writes `marker` and waits forever
  (a read stuck on a dead file system, with the process alive). A restart
  finds the marker and reads on. --task_args=block_position=P,
  block_worker=W,marker=PATH; the batches are the built-in digits ones."""

  def __init__(self, config):
    super().__init__(config, model_fn=layers.get("mlp"))
    args = config.task_kwargs
    self._block_at = int(args["block_position"])
    self._block_worker = int(args.get("block_worker", 0))
    self._marker = args["marker"]

  def preprocess(self, features, labels, meta, training):
    images, labels = super().preprocess(features, labels, meta, training)
    if not training:
      return images, labels
    flag = tf.numpy_function(self._maybe_block, [meta["pos"]], tf.int64,
                             stateful=True)
    with tf.control_dependencies([flag]):
      return tf.identity(images), labels

  def _maybe_block(self, positions):
    import json
    import os
    import threading
    task = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task", {})
    if (int(task.get("index", 0)) == self._block_worker
        and positions.max() >= self._block_at
        and not os.path.exists(self._marker)):
      with open(self._marker, "w") as f:
        f.write(f"{os.getpid()} {int(positions.max())}\n")
      threading.Event().wait()   # the stuck read: forever
    return np.int64(0)


# ---- a small embedding table trained row-wise (issue 29) ---------------
TABLE_ROWS, TABLE_DIM = 64, 4
# Example p looks up row TABLE_IDS[p % n] and regresses it onto
# TABLE_TARGETS[p % n]; rows 48-63 are never looked up.
_rng = np.random.default_rng(29)
TABLE_IDS = _rng.integers(0, 48, size=40).astype(np.int64)
TABLE_TARGETS = _rng.normal(size=(40, TABLE_DIM)).astype(np.float32)
del _rng


def numpy_lazy_adam(table, m, v, first, last, lr, batch, beta_1=0.9,
                    beta_2=0.999, epsilon=1e-7):
  """Updates first..last (1-based counts) of row-wise ("lazy") Adam on
  RowTable's stream from (table, m, v), in float64: update t's batch is
  stream positions (t-1)*batch .. t*batch-1 (mod the examples); a row's
  gradient is the sum over the examples that look it up of
  2 (row - target) / batch; rows (and their moments) not looked up stay as
  they are; the bias correction counts every update. The optimizer's
  float32 hyper-parameters are used (1 - float32(0.999) is 1.3e-5 away from
  0.001, which v shows at rel 1e-5)."""
  beta_1, beta_2, epsilon = (float(np.float32(x))
                             for x in (beta_1, beta_2, epsilon))
  table, m, v = (np.array(x, np.float64) for x in (table, m, v))
  n = len(TABLE_IDS)
  for t in range(first, last + 1):
    grads = {}
    for p in range((t - 1) * batch, t * batch):
      row, target = TABLE_IDS[p % n], TABLE_TARGETS[p % n]
      grads[row] = grads.get(row, 0.0) + 2.0 * (table[row] - target) / batch
    alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
    for row, g in grads.items():
      m[row] = beta_1 * m[row] + (1 - beta_1) * g
      v[row] = beta_2 * v[row] + (1 - beta_2) * g * g
      table[row] -= alpha * m[row] / (np.sqrt(v[row]) + epsilon)
  return table, m, v


def table_start(rows=TABLE_ROWS, dim=TABLE_DIM):
  """The table's initial value: a fixed function of the row and column,
  in [1, 2) (so that relative tolerances mean something)."""
  i = np.arange(rows * dim, dtype=np.float64).reshape(rows, dim)
  return (1.0 + np.mod(i * 0.6180339887, 1.0)).astype(np.float32)


class TableStart(keras.initializers.Initializer):
  """table_start(shape) computed by TensorFlow ops (wherever the variable
  is created), not a host-side array."""

  def __call__(self, shape, dtype=None):
    i = tf.reshape(tf.range(shape[0] * shape[1], dtype=tf.float64), shape)
    return tf.cast(1.0 + tf.math.floormod(i * 0.6180339887, 1.0),
                   dtype or "float32")


class RowTable(Task):
  """layers.Embedding(TABLE_ROWS, TABLE_DIM, hashed=False) looked up by
  id; loss: squared distance of the row to the example's target. Training
  reads its own stream: the example at position p is p % 40."""

  def source(self, split):
    del split
    return array_source("row_table", TABLE_IDS, TABLE_TARGETS)

  def train_dataset(self, batch_size, seed, start_position):
    del seed
    ids, targets = tf.constant(TABLE_IDS), tf.constant(TABLE_TARGETS)
    n = len(TABLE_IDS)
    return tf.data.Dataset.counter(start_position).map(
        lambda p: (tf.gather(ids, p % n), tf.gather(targets, p % n))
    ).batch(batch_size, drop_remainder=True)

  def build_model(self, input_spec):
    ids = keras.Input(input_spec.shape, dtype=input_spec.dtype)
    table = layers.Embedding(TABLE_ROWS, TABLE_DIM, hashed=False,
                             embeddings_initializer=TableStart(),
                             name="table")
    return keras.Model(ids, table(ids))

  def loss(self, labels, outputs):
    return tf.reduce_sum(tf.square(outputs - labels), axis=-1)


def cnn_dropout(input_shape, num_classes):
  """The built-in cnn with dropout before its logits (--model=
  plugin_tasks:cnn_dropout): the MNIST model of the topology matrix."""
  base = layers.get("cnn")(input_shape, num_classes)
  features = base.get_layer("dense").output
  x = layers.Dropout(0.25, name="dropout")(features)
  logits = base.layers[-1](x)
  return keras.Model(base.inputs, logits, name="cnn_dropout")
