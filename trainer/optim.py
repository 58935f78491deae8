"""Optimizer and learning-rate schedule factory (built eagerly, in scope).

The schedule is a pure function of the framework's own global step (Keras'
`optimizer.iterations` is not an atomic counter under parameter servers).
"""

import math

import keras
import tensorflow as tf

from trainer.config import Config


def learning_rate_at(step, config: Config):
  """Learning rate for the update at 0-based `step` (a Python number or a
  tensor): linear warm-up to --learning_rate, then constant or cosine decay
  to 0 at --train_steps."""
  step = tf.cast(step, tf.float32)
  peak = tf.constant(config.learning_rate, tf.float32)
  warmup = float(config.warmup_steps)
  warm = tf.minimum(1.0, (step + 1.0) / warmup) if warmup else 1.0
  if config.lr_schedule == "cosine":
    span = max(1.0, float(config.train_steps) - warmup)
    progress = tf.clip_by_value((step - warmup) / span, 0.0, 1.0)
    decay = 0.5 * (1.0 + tf.cos(math.pi * progress))
  else:
    decay = 1.0
  return peak * warm * decay


class _PreReduced:
  """The step all-reduces gradients itself, exactly once per update, so that
  clipping and the finite check see the global gradient (Keras' own clipnorm
  runs before its reduction, on per-replica gradients). Keras must not SUM
  them across replicas a second time."""

  def _all_reduce_sum_gradients(self, grads_and_vars):
    return list(grads_and_vars)


_CLASSES = {
    "sgd": keras.optimizers.SGD,
    "momentum": keras.optimizers.SGD,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
}
_PREREDUCED = {name: type(f"PreReduced{cls.__name__}", (_PreReduced, cls), {})
               for name, cls in _CLASSES.items()}


def build(config: Config, global_step: tf.Variable, variables):
  """Builds the optimizer and its slots. Call inside strategy.scope().

  Slots are built eagerly here: created lazily inside strategy.run they
  break multi-replica steps (keras-team/keras #23085).
  """
  lr = lambda: learning_rate_at(global_step, config)  # noqa: E731
  kwargs = {}
  if config.optimizer == "momentum":
    kwargs["momentum"] = config.momentum
  if config.optimizer == "adamw":
    kwargs["weight_decay"] = config.weight_decay
  optimizer = _PREREDUCED[config.optimizer](learning_rate=lr, **kwargs)
  optimizer.build(variables)
  return optimizer
