"""The CLI's optimizer (--optimizer and friends) and learning-rate schedule.

The schedule is a pure function of the framework's own global step (Keras'
`optimizer.iterations` is not an atomic counter under parameter servers).
A Task may instead return any Keras 3 optimizer(s) from Task.optimizers();
trainer.compat.prereduced adapts those (and these) to the step.
"""

import dataclasses
import math

import keras
import tensorflow as tf

from trainer import compat
from trainer.errors import UserError
# Importable from here for tasks (Task.optimizers()): row-wise updates of
# sparse gradients, the ordinary rule on dense ones.
from trainer.sparse_optim import Adagrad, LazyAdam, LazyMomentum

__all__ = ["Adagrad", "LazyAdam", "LazyMomentum", "build", "from_flags",
           "learning_rate_at", "prepare"]


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the --optimizer flags describe (field names are the flags')."""
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  train_steps: int = 1000
  momentum: float = 0.9
  weight_decay: float = 1e-4


def learning_rate_at(step, schedule):
  """Learning rate for the update at 0-based `step` (a Python number or a
  tensor): linear warm-up to --learning_rate, then constant or cosine decay
  to 0 at --train_steps. `schedule`: anything with the schedule's fields
  (learning_rate, warmup_steps, lr_schedule, train_steps).

  >>> float(learning_rate_at(4, Settings(learning_rate=0.1, warmup_steps=10)))
  0.05...
  """
  step = tf.cast(step, tf.float32)
  peak = tf.constant(schedule.learning_rate, tf.float32)
  warmup = float(schedule.warmup_steps)
  warm = tf.minimum(1.0, (step + 1.0) / warmup) if warmup else 1.0
  if schedule.lr_schedule == "cosine":
    span = max(1.0, float(schedule.train_steps) - warmup)
    progress = tf.clip_by_value((step - warmup) / span, 0.0, 1.0)
    decay = 0.5 * (1.0 + tf.cos(math.pi * progress))
  else:
    decay = 1.0
  return peak * warm * decay


_CLASSES = {
    "sgd": keras.optimizers.SGD,
    "momentum": keras.optimizers.SGD,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "lazy_adam": LazyAdam,
    "adagrad": Adagrad,
    "lazy_momentum": LazyMomentum,
}


def from_flags(settings: Settings, global_step: tf.Variable):
  """The optimizer --optimizer names, on the --lr_schedule of the global
  step (not built yet: see build)."""
  lr = lambda: learning_rate_at(global_step, settings)  # noqa: E731
  kwargs = {}
  if settings.optimizer in ("momentum", "lazy_momentum"):
    kwargs["momentum"] = settings.momentum
  if settings.optimizer == "lazy_momentum" and not settings.momentum > 0:
    raise UserError(f"--optimizer=lazy_momentum needs --momentum > 0 (got "
                    f"{settings.momentum}); for plain SGD use --optimizer=sgd.")
  if settings.optimizer == "adamw":
    kwargs["weight_decay"] = settings.weight_decay
  return _CLASSES[settings.optimizer](learning_rate=lr, **kwargs)


def prepare(optimizer, variables):
  """Adapts any Keras optimizer to the step and builds its slots. Call
  inside strategy.scope(). Slots are built eagerly here: created lazily
  inside strategy.run they break multi-replica steps (keras-team/keras
  #23085)."""
  _refuse_own_averaging(optimizer)
  optimizer = compat.prereduced(optimizer)
  optimizer.build(variables)
  return optimizer


# Keras optimizer options that redo what the step already does, by name of
# the attribute that holds them: what goes wrong, and what to use instead.
_REFUSED = {
    "gradient_accumulation_steps": (
        "accumulates on its own, outside the step's single reduction "
        "(under several replicas it fails in merge_call)",
        "--grad_accum_steps=K (the global batch split K ways)"),
    "use_ema": (
        "keeps a moving average the checkpoint, evaluation and export "
        "do not know about", "--ema_decay=D"),
    "loss_scale_factor": (
        "divides the gradients by a factor the step's loss was never "
        "multiplied by", "--mixed_precision=mixed_float16 (the step "
        "scales the loss itself)"),
}


def _refuse_own_averaging(optimizer) -> None:
  """One UserError line for an option that fights the step's own
  accumulation, averaging or loss scaling (any strategy: the check runs
  before the first step is traced). clipnorm, clipvalue and
  global_clipnorm stay allowed: the step hands Keras the update's reduced
  gradient, so they clip the global gradient once per update."""
  name = type(optimizer).__name__
  if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
    raise UserError(
        f"{name} scales the loss itself; the step does that under "
        "--mixed_precision=mixed_float16: return the inner optimizer.")
  for option, (wrong, instead) in _REFUSED.items():
    if getattr(optimizer, option, None):
      raise UserError(
          f"{name}({option}={getattr(optimizer, option)!r}) {wrong}; drop "
          f"the option and use {instead}.")


def build(settings: Settings, global_step: tf.Variable, variables):
  """The --optimizer, adapted and built. Call inside strategy.scope()."""
  return prepare(from_flags(settings, global_step), variables)
