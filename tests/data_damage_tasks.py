"""A reference task for tests/test_data_damage.py: the built-in task with
one example (DAMAGED_INDEX, an index of the train split) at weight 0."""

import os

import tensorflow as tf

import layers
from trainer.data import pipeline
from trainer.task import ClassificationTask


class _ZeroOne(ClassificationTask):

  def preprocess(self, features, labels, meta, training):
    features, labels = super().preprocess(features, labels, meta, training)
    if training:
      n = self.source(self.config.train_split).num_examples
      index = pipeline.example_indices(meta["pos"], n, self.config.seed)
      keep = tf.not_equal(index, int(os.environ["DAMAGED_INDEX"]))
      meta["weight"] = meta["weight"] * tf.cast(keep, tf.float32)
    return features, labels


def zero_one(config):
  return _ZeroOne(config, layers.get(config.model))
