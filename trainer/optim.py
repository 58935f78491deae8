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


def _handle(variable):
  """The resource handle of a Keras or tf variable (in an update() call:
  the current device's copy of a mirrored one)."""
  if isinstance(variable, keras.Variable):
    variable = variable.value
  return variable.handle


class _Fused:
  """Updates each variable with TF's fused training kernel (one op per
  variable: ResourceApplyAdam, ResourceApplyKerasMomentum,
  ResourceApplyGradientDescent) instead of Keras 3's ~15-20 element-wise
  ops per variable. Same formulas as Keras' update_step (Keras 2 used
  these kernels); on a small model's CPU step the per-op overhead of the
  unfused update is a measurable share of the step (bench/, README Speed).
  Parameter-server shards (ShardedVariable) keep Keras' own update."""

  def _distributed_tf_update_step(self, distribution, grads_and_vars,
                                  learning_rate):
    pairs = list(grads_and_vars)
    sharded = tf.__internal__.distribute.ShardedVariable
    if any(isinstance(v, sharded) for _, v in pairs) or not self._fusable():
      return super()._distributed_tf_update_step(distribution, pairs,
                                                  learning_rate)
    shared = self._shared_scalars()

    def apply(variable, gradient, lr):
      cast = lambda x: tf.cast(x, variable.dtype)  # noqa: E731
      scalars = {k: cast(v) for k, v in shared.items()}
      scalars["lr"] = cast(lr)
      return self._fused_update(variable, cast(gradient), scalars)

    # The learning rate goes through `args` as Keras passes it: under a
    # merge_call it is a per-replica value that update() unwraps per device.
    for gradient, variable in pairs:
      distribution.extended.update(variable, apply,
                                   args=(gradient, learning_rate), group=False)
    return None

  def _fusable(self) -> bool:
    return True

  def _slot(self, slots, variable):
    return _handle(slots[self._get_variable_index(variable)])


class _FusedAdam(_Fused):

  def _fusable(self):
    return not self.amsgrad

  def _shared_scalars(self):
    # Keras' update_step computes these per variable; once per update here.
    step = tf.cast(self.iterations + 1, tf.float32)
    return {"beta1_power": tf.pow(tf.cast(self.beta_1, tf.float32), step),
            "beta2_power": tf.pow(tf.cast(self.beta_2, tf.float32), step),
            "beta1": self.beta_1, "beta2": self.beta_2,
            "epsilon": self.epsilon}

  def _fused_update(self, variable, gradient, s):
    return tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=self._slot(self._momentums, variable),
        v=self._slot(self._velocities, variable),
        beta1_power=s["beta1_power"], beta2_power=s["beta2_power"],
        lr=s["lr"], beta1=s["beta1"], beta2=s["beta2"],
        epsilon=s["epsilon"], grad=gradient)


class _FusedSGD(_Fused):

  def _shared_scalars(self):
    return {"momentum": self.momentum}

  def _fused_update(self, variable, gradient, s):
    if self.momentum == 0:
      return tf.raw_ops.ResourceApplyGradientDescent(
          var=variable.handle, alpha=s["lr"], delta=gradient)
    # accum = accum * momentum - lr * grad; var += accum (Nesterov:
    # var += accum * momentum - lr * grad): Keras' SGD exactly.
    return tf.raw_ops.ResourceApplyKerasMomentum(
        var=variable.handle, accum=self._slot(self.momentums, variable),
        lr=s["lr"], grad=gradient, momentum=s["momentum"],
        use_nesterov=self.nesterov)


_FUSED = {"sgd": _FusedSGD, "momentum": _FusedSGD, "adam": _FusedAdam,
          "adamw": _FusedAdam}

_CLASSES = {
    "sgd": keras.optimizers.SGD,
    "momentum": keras.optimizers.SGD,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
}
_PREREDUCED = {name: type(f"PreReduced{cls.__name__}",
                          (_PreReduced, _FUSED[name], cls), {})
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
