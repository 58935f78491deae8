"""The hand-written loop of examples/lm.py: plain tf.function, GradientTape,
Keras' Adam, the loss per real token of the batch (sum(loss * weights) /
sum(weights)), on the same packed rows (the example's text source over the
standard library, read lazily the same way). bench.paired --lm races it
against the trainer's chunk on examples.lm:ByteLM."""

import numpy as np
import tensorflow as tf

# The sizes both contenders train (examples.lm's defaults).
TASK_ARGS = "max_len=128,width=128,heads=4,blocks=2"
LEARNING_RATE = 3e-3


def task(task_args: str = TASK_ARGS):
  """examples.lm's task with these sizes (its source and model)."""
  from examples import lm
  from trainer.config import Config
  return lm.ByteLM(Config(task="examples.lm:ByteLM", task_args=task_args))


def make_step(model, optimizer):
  """step(features, labels): one update on one packed batch."""
  from examples import lm

  def step(features, labels):
    with tf.GradientTape() as tape:
      logits = model(features, training=True)
      per_token = lm.per_token_loss(labels["targets"], logits)
      weights = labels["weights"]
      loss = tf.reduce_sum(per_token * weights) / tf.reduce_sum(weights)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
  return step


def raw_loop(batch: int, task_args: str = TASK_ARGS, seed: int = 0):
  """train_loop(n): n raw updates in one tf.function, on packed rows of the
  train split in a fixed shuffled order (a parallel map of batch starts over
  the source's gather, prefetched)."""
  import keras
  the_task = task(task_args)
  source = the_task.source("train")
  order = tf.constant(np.random.default_rng(seed).permutation(
      source.num_examples).astype(np.int64))
  n = source.num_examples

  def load(start):
    return source.gather(tf.gather(order, (start + tf.range(
        batch, dtype=tf.int64)) % n))

  data = iter(tf.data.Dataset.range(0, 2 ** 62, batch).map(
      load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      .prefetch(tf.data.AUTOTUNE))
  model = the_task.build_model(None)
  optimizer = keras.optimizers.Adam(LEARNING_RATE)
  optimizer.build(model.trainable_variables)
  step = make_step(model, optimizer)

  @tf.function
  def train_loop(n):
    for _ in tf.range(n):
      step(*next(data))
  return train_loop
