"""The framework's own traced code runs without AutoGraph's rewrite
(trainer.compat.plain: it saves ~3 s of every start), yet a user's hooks
that branch on a tensor with a Python `if` keep working: train_step,
eval_step, preprocess, loss, transform_gradients, a Source's gather. Each
hook below takes the branch that leaves the result unchanged, so the run
equals the built-in task's bit for bit; without `compat.user_code` at the
call sites the trace fails ("using a tf.Tensor as a Python bool")."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from trainer import compat
from trainer import controller as controller_lib
from trainer.config import Config
from trainer.build import task_of

pytestmark = pytest.mark.timeout(300)


def _config(tmp_path, name, **kw):
  settings = dict(model="mlp", dataset="digits", global_batch_size=16,
                  train_steps=6, steps_per_loop=3, summary_every=3,
                  checkpoint_every=6, eval_every=6, mode="train", seed=3,
                  model_dir=str(tmp_path / name))
  settings.update(kw)
  return Config(**settings)


class Branchy:
  """Mixed into the built-in task: every hook branches on a tensor."""

  def source(self, split):
    inner = super().source(split)

    def gather(indices):
      features, labels = inner.gather(indices)
      if tf.reduce_min(indices) < 0:          # never: indices are >= 0
        features = features * 0
      return features, labels
    return dataclasses.replace(inner, gather=gather)

  def preprocess(self, features, labels, meta, training):
    images, labels = super().preprocess(features, labels, meta, training)
    if tf.reduce_max(images) > 1.0:            # never: pixels are in [0, 1]
      images = images * 0.0
    return images, labels

  def loss(self, labels, outputs):
    per_example = super().loss(labels, outputs)
    if tf.reduce_min(per_example) < 0.0:       # never: cross-entropy >= 0
      per_example = -per_example
    return per_example

  def train_step(self, batch, ctx):
    features, labels = batch
    with tf.GradientTape() as tape:
      outputs = ctx.model(features, training=True)
      per_example = self.loss(labels, outputs)
      if tf.size(per_example) > 0:             # always
        loss = ctx.scale_loss(per_example, ctx.model)
      else:
        loss = 2.0 * ctx.scale_loss(per_example, ctx.model)
    ctx.minimize(tape, loss)
    return {"loss": per_example, **self.metric_values(labels, outputs)}

  def eval_step(self, batch, ctx):
    features, labels = batch
    outputs = ctx.model(features, training=False)
    per_example = self.loss(labels, outputs)
    if tf.size(per_example) == 0:              # never
      per_example = per_example + 1.0
    return {"loss": per_example, **self.metric_values(labels, outputs)}

  def transform_gradients(self, gradients, variables):
    del variables
    norm = tf.linalg.global_norm(gradients)
    if norm < 0.0:                             # never
      gradients = [g * 0 for g in gradients]
    return gradients


def _train(config, wrap):
  task = task_of(config)
  if wrap:
    task.__class__ = type("Branchy", (Branchy, type(task)), {})
  run = controller_lib.create(config, task)
  result = run.train()
  return [np.array(w) for w in run.model.get_weights()], result


@pytest.mark.parametrize("accum", [1, 2])
def test_hooks_branching_on_tensors_equal_the_builtin_task(tmp_path, accum):
  reference, plain_result = _train(
      _config(tmp_path, f"plain{accum}", grad_accum_steps=accum), False)
  weights, result = _train(
      _config(tmp_path, f"branchy{accum}", grad_accum_steps=accum), True)
  for a, b in zip(weights, reference):
    np.testing.assert_array_equal(a, b)
  assert result["eval_loss"] == plain_result["eval_loss"]
  assert result["global_step"] == 6


def test_plain_code_fails_loudly_on_a_tensor_condition():
  # What `plain` gives up: AutoGraph's rewrite. A tensor used as a Python
  # bool then fails at the trace; it is never silently taken as True.
  @compat.plain
  def helper(x):
    if x > 0:
      return x
    return -x

  @tf.function
  def traced(x):
    return helper(x)

  with pytest.raises(Exception, match="bool"):
    traced(tf.constant(1.0))
