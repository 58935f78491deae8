"""Tiny next-token tasks whose loss is the mean over the real tokens of the
whole update, and the hand-written full-batch SGD loop they must equal.
Imported by tests/unit/test_weighted_loss.py, by
tests/e2e/test_per_token_workers.py and, as --task=tiny_lm:NAME
(PYTHONPATH=tests), by its trainer processes (2 workers via launch.local).
tiny_config and hand_written also serve other tiny in-process checks
(tests/unit/test_sparse_step.py).

Two layouts of the same kind of data (random documents of 2..LENGTH + 1
tokens):
- TinyLM: one document a row, padded with 0 to LENGTH; weights = its mask;
- PackedLM: several documents a row of LENGTH slots (trainer.data.documents,
  packed=True) with segment ids and per-document positions; the model's
  attention is masked by segment; weights = the real tokens of the rows.
"""

import keras
import numpy as np
import tensorflow as tf

from trainer import Task, array_source
from trainer.data import documents, pipeline, sequence

VOCAB, LENGTH, EXAMPLES, BATCH, UPDATES, LR = 40, 12, 512, 16, 12, 0.5


def _sequences(seed: int = 3):
  """Token rows of random lengths 2..LENGTH padded with 0; the target is
  the next token; mask 1 on real targets."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, LENGTH + 1, EXAMPLES)
  tokens = rng.integers(1, VOCAB, (EXAMPLES, LENGTH + 1)).astype(np.int32)
  mask = (np.arange(LENGTH)[None, :] < lengths[:, None] - 1).astype(
      np.float32)
  inputs = tokens[:, :-1] * (np.arange(LENGTH)[None] < lengths[:, None])
  return {"tokens": inputs.astype(np.int32), "mask": mask}, tokens[:, 1:]


def positions_metric(weights):
  """Each slot's column: a metric whose weighted mean is far from its
  plain one."""
  return tf.zeros_like(weights) + tf.range(LENGTH, dtype=tf.float32)


class TinyLM(Task):
  """Next-token loss, the mean over real tokens of the whole update
  (MEAN_OVER = "examples": each row's token mean, averaged over the
  update's rows, the per-example normalisation that is wrong here)."""

  MEAN_OVER = "weights"

  def source(self, split):
    features, targets = _sequences(3 if split == "train" else 4)
    return array_source(f"tiny_lm:{split}", features, targets)

  def build_model(self, input_spec):
    del input_spec
    return keras.Sequential([keras.Input((LENGTH,), dtype="int32"),
                             keras.layers.Embedding(VOCAB, 8),
                             keras.layers.Dense(VOCAB)])

  @staticmethod
  def logits(model, features):
    return model(features["tokens"], training=True)

  @staticmethod
  def targets_and_weights(features, labels):
    return labels, features["mask"]

  @classmethod
  def per_token(cls, model, features, labels):
    """(per-token loss [B, T], weights [B, T]) of a batch."""
    targets, weights = cls.targets_and_weights(features, labels)
    per_token = keras.losses.sparse_categorical_crossentropy(
        targets, cls.logits(model, features), from_logits=True)
    return per_token, weights

  def train_step(self, batch, ctx):
    features, labels = batch
    with tf.GradientTape() as tape:
      per_token, weights = self.per_token(ctx.model, features, labels)
      if self.MEAN_OVER == "weights":
        loss = ctx.scale_loss(per_token, weights, mean_over="weights")
      else:
        per_example = (tf.reduce_sum(per_token * weights, 1) /
                       tf.maximum(tf.reduce_sum(weights, 1), 1.0))
        loss = ctx.scale_loss(per_example)
    ctx.minimize(tape, loss)
    return {"loss": (per_token, weights),
            "pos": (positions_metric(weights), weights),
            "tokens_per_row": tf.reduce_sum(weights, axis=1)}

  def eval_step(self, batch, ctx):
    features, labels = batch
    return {"loss": self.per_token(ctx.model, features, labels)}


class ExampleMeanLM(TinyLM):
  MEAN_OVER = "examples"


def _documents(seed: int):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, LENGTH + 2, EXAMPLES)
  return [rng.integers(1, VOCAB, n).astype(np.int32) for n in lengths]


class PackedLM(TinyLM):
  """Packed rows: several documents a row, attention and positions within
  each document (segment ids)."""

  def source(self, split):
    docs = _documents(5 if split == "train" else 6)
    return documents.documents_source(
        f"tiny_packed:{split}", [len(d) for d in docs],
        lambda doc, start, end: docs[doc][start:end], LENGTH, pad_id=0,
        packed=True)

  def build_model(self, input_spec):
    del input_spec
    names = ("tokens", "segment_ids", "positions")
    inputs = {k: keras.Input((LENGTH,), dtype="int32", name=k)
              for k in names}
    x = (keras.layers.Embedding(VOCAB, 8)(inputs["tokens"]) +
         keras.layers.Embedding(LENGTH, 8)(inputs["positions"]))
    mask = sequence.attention_mask(inputs["segment_ids"], causal=True)
    # No biases: the key's bias cannot change a softmax (its gradient is
    # zero, so it stays at rounding noise that a relative check reads as
    # a difference).
    x = x + keras.layers.MultiHeadAttention(1, 8, use_bias=False)(
        x, x, attention_mask=mask)
    return keras.Model(inputs, keras.layers.Dense(VOCAB)(x))

  @staticmethod
  def logits(model, features):
    return model(features, training=True)

  @staticmethod
  def targets_and_weights(features, labels):
    del features
    return labels["targets"], labels["weights"]


class PackedExampleMeanLM(PackedLM):
  MEAN_OVER = "examples"


class RefusedAccumulation(PackedLM):
  """Keras' own gradient accumulation, which the framework refuses."""

  def optimizers(self):
    return keras.optimizers.Adam(gradient_accumulation_steps=5)


def tiny_config(model_dir, **kw):
  """The Config of a tiny in-process run: UPDATES updates of BATCH rows in
  one chunk, plain SGD at LR, no evaluation (kw overrides)."""
  from trainer.config import Config
  settings = dict(global_batch_size=BATCH, train_steps=UPDATES,
                  steps_per_loop=UPDATES, summary_every=UPDATES,
                  checkpoint_every=UPDATES, eval_every=0, mode="train",
                  optimizer="sgd", learning_rate=LR, seed=1,
                  model_dir=str(model_dir))
  settings.update(kw)
  return Config(**settings)


def token_mean(task_class, model, features, labels, weight):
  """The full batch's loss: sum(token losses * weights) / the batch's real
  tokens (rows of weight 0 left out)."""
  per_token, weights = task_class.per_token(model, features, labels)
  weights = weights * weight[:, None]
  return tf.reduce_sum(per_token * weights) / tf.reduce_sum(weights)


def hand_written(config, task, initial, loss_of=None):
  """Plain TF SGD on each update's full global batch, from `initial`
  weights: loss_of(model, features, labels, meta weight) -> the scalar
  loss (default token_mean of the task's class)."""
  loss_of = loss_of or (lambda *a: token_mean(type(task), *a))
  model = task.build_model(None)
  model.set_weights(initial)
  data = iter(pipeline.train_dataset(task, config.train_split,
                                     config.global_batch_size, config.seed,
                                     0))

  @tf.function
  def step(features, labels, weight):
    with tf.GradientTape() as tape:
      loss = loss_of(model, features, labels, weight)
    grads = tape.gradient(loss, model.trainable_variables)
    for v, g in zip(model.trainable_variables, grads):
      v.assign_sub(config.learning_rate * tf.convert_to_tensor(g))

  for _ in range(config.train_steps):
    features, labels, meta = next(data)
    step(features, labels, meta["weight"])
  return model.get_weights()


def rel(a, b) -> float:
  """Worst over variables of |a - b| / |b| (norms of whole variables)."""
  worst = max(float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12))
              for x, y in zip(a, b))
  assert np.isfinite(worst)
  return worst
