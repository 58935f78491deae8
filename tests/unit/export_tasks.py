"""Tasks the export tests train in-process (--task=export_tasks:Name)."""

import keras
import numpy as np
import tensorflow as tf

from trainer import Task, array_source
from trainer.serving import Signature

DIM = 16


class Recommender(Task):
  """Pairs of ids (user, item) in one embedding table of --task_args
  rows=N (default 1,000,000) x 16; the score is their dot product through
  a Dense unit. Two signatures: the score of a pair (`serving_default`),
  and the K best-scoring items for a user (`top_items`)."""

  K = 3

  def __init__(self, config):
    super().__init__(config)
    self.rows = int(config.task_kwargs.get("rows", 1_000_000))

  def source(self, split):
    rng = np.random.default_rng(0 if split == "train" else 1)
    ids = rng.integers(0, self.rows, (256, 2)).astype(np.int32)
    return array_source(f"pairs:{split}", ids,
                        rng.normal(size=(256, 1)).astype(np.float32))

  def build_model(self, input_spec):
    ids = keras.Input(input_spec.shape, dtype="int32", name="ids")
    vectors = keras.layers.Embedding(self.rows, DIM, name="table")(ids)
    dot = keras.layers.Dot(axes=-1)([vectors[:, 0], vectors[:, 1]])
    return keras.Model(ids, keras.layers.Dense(1, name="score")(dot))

  def loss(self, labels, outputs):
    return tf.reduce_mean(tf.square(outputs - labels), axis=-1)

  def serving_signatures(self, model, input_spec):
    table = model.get_layer("table").embeddings

    def top_items(inputs):
      users = tf.gather(table, inputs["user"])
      scores, items = tf.math.top_k(tf.matmul(users, table, transpose_b=True),
                                    self.K)
      return {"items": items, "scores": scores}

    return {"serving_default": self.serving_signature(model, input_spec),
            "top_items": Signature({"user": tf.TensorSpec([], tf.int32)},
                                   top_items)}
