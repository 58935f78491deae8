"""The Task API: what to train. The framework decides how.

Subclass `Task` (or `ClassificationTask`) and override what differs. Each
hook says where it runs; the framework owns distribution, loss scaling,
accumulation, the single cross-replica reduction, checkpoints and resume.
"""

from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from trainer.config import Config
from trainer.data.source import Source

MetricFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


class Task:
  """Base class. Required: `source`, `build_model`, `loss`."""

  def __init__(self, config: Config):
    self.config = config

  # ---- data (host, inside tf.data) -------------------------------------
  def source(self, split: str) -> Source:
    """Random-access examples of `split` (see trainer.data.source). The
    framework orders them by a pure function of (seed, epoch), which is what
    makes mid-epoch resume exact."""
    raise NotImplementedError

  def preprocess(self, features, labels, meta: dict, training: bool):
    """Maps consecutive rows of a GLOBAL micro-batch: all of it on one
    machine (before the split across its replicas), a replica's share of
    it on each worker under multi-worker (each worker builds only its own
    rows). Keep it per-example so the result does not depend on the
    topology. `meta["pos"]` (int64 [b]) is each example's stream position
    and `meta["start"]` the global batch's first one: derive augmentation
    seeds from them (stateless ops) to keep resume exact, e.g. draw for the
    whole global batch from (seed, start) and keep rows pos - start, as
    trainer.data.augment.crop_and_flip does. To drop an example while
    shapes stay static, set meta["weight"] to 0 for its row (meta is the
    pipeline's dict; meta["skipped"] = 1 also counts it in the train scalar
    skipped_examples). Returns (features, labels)."""
    del meta, training
    return features, labels

  # ---- model (built once, inside strategy.scope()) ---------------------
  def build_model(self, input_spec) -> keras.Model:
    """`input_spec`: tf.TensorSpec (or nest) of one example's features after
    preprocess. Return a Keras model; use layers.Dropout for dropout that is
    exact across replica counts and restarts."""
    raise NotImplementedError

  # ---- objective (replica context, inside tf.function) -----------------
  def loss(self, labels, outputs) -> tf.Tensor:
    """Per-example losses, shape [local_batch]. Do NOT average: the
    framework divides by the global batch size (tf.nn.compute_average_loss)
    so that summing gradients across replicas gives the true mean."""
    raise NotImplementedError

  def metrics(self) -> dict[str, MetricFn]:
    """name -> fn(labels, outputs) giving per-example values; the framework
    reports their mean over all examples (replica-local sums, reduced once
    per summary). `loss` is always reported."""
    return {}

  def transform_gradients(self, gradients: list, variables: list) -> list:
    """Runs in replica context on the ALL-REDUCED gradients (identical on
    every replica), after the finite check, before the optimizer. E.g.
    clipping by global norm. Must be pure TF; no cross-replica calls."""
    del variables
    return gradients


class ClassificationTask(Task):
  """Image classification with a built-in dataset and model (the CLI path)."""

  def __init__(self, config: Config, model_fn=None):
    super().__init__(config)
    self._model_fn = model_fn
    self._sources: dict[str, Source] = {}

  def source(self, split: str) -> Source:
    if split not in self._sources:
      from trainer.data import readers_for
      self._sources[split] = readers_for(self.config, split)
    return self._sources[split]

  # Text-like sets whose meaning a mirror image changes: never flipped.
  _NO_FLIP = ("digits", "mnist")

  def preprocess(self, features, labels, meta, training):
    from trainer.data import augment, resize
    config = self.config
    seed = tf.stack([tf.constant(config.seed, tf.int64), meta["start"][0]])
    first_row = meta["pos"][0] - meta["start"][0]
    if config.image_hw:
      source = self.source(config.train_split)
      channels = source.decode_channels or source.feature_spec.shape[-1]
      images, ok = resize.resize_batch(
          features, config.image_hw, channels, training, seed,
          first_row=first_row, global_batch=config.micro_batch_size,
          flip=config.augment and config.dataset not in self._NO_FLIP)
      if source.decode_channels:
        self._drop_damaged(meta, ok, training)
      return images, labels
    images = tf.cast(features, tf.float32) * (1.0 / 255.0)
    if training and config.augment:
      images = augment.crop_and_flip(
          images, seed, flip=config.dataset == "cifar10",
          first_row=first_row, global_batch=config.micro_batch_size)
    return images, labels

  def _drop_damaged(self, meta, ok, training):
    """A row whose image did not decode: weight 0, counted in meta
    "skipped", and named on the host (trainer.data.damage). meta is the
    pipeline's dict: setting its entries here is how preprocess drops an
    example while shapes stay static."""
    from trainer.data import damage, pipeline
    config = self.config
    split = config.train_split if training else config.eval_split
    source = self.source(split)
    meta["weight"] = meta["weight"] * ok
    meta["skipped"] = 1.0 - ok
    index = (pipeline.example_indices(meta["pos"], source.num_examples,
                                      config.seed) if training else
             tf.minimum(meta["pos"], source.num_examples - 1))

    def note(indices, oks):
      where = [source.describe(int(i)) if source.describe else source.name
               for i, good in zip(indices, oks) if good < 1]
      damage.note(config.dataset, where, config.skip_corrupt)
      return np.int64(0)

    def report():
      with tf.control_dependencies([tf.numpy_function(
          note, [index, ok], tf.int64, stateful=True)]):
        return tf.constant(0, tf.int64)

    done = tf.cond(tf.reduce_min(ok) < 1.0, report,
                   lambda: tf.constant(0, tf.int64))
    with tf.control_dependencies([done]):
      meta["weight"] = tf.identity(meta["weight"])

  def build_model(self, input_spec) -> keras.Model:
    num_classes = self.source(self.config.train_split).num_classes
    return self._model_fn(tuple(input_spec.shape), num_classes)

  def loss(self, labels, outputs):
    return keras.losses.sparse_categorical_crossentropy(
        labels, outputs, from_logits=True)

  def metrics(self):
    return {"accuracy": accuracy}


def accuracy(labels, logits):
  """Per-example 0/1: is the arg-max class the label."""
  predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
  return tf.cast(tf.equal(predicted, tf.cast(labels, tf.int32)), tf.float32)
