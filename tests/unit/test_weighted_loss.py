"""Per-token losses exact under every split: ctx.scale_loss(mean_over=
"weights") against a hand-written full-batch loop that divides by the
update's real-token count; weighted (values, weights) metrics against
NumPy. Mirrored(2) runs in the child process that
test_sparse_step.py::test_mirrored_two_replicas starts (logical CPU devices
must be configured before TensorFlow starts)."""

import os

import numpy as np
import pytest

from conftest import event_values
from two_replicas import IN_CHILD as _CHILD

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tiny_lm import (BATCH, LENGTH, ExampleMeanLM,  # noqa: E402
                     PackedExampleMeanLM, PackedLM, RefusedAccumulation,
                     TinyLM, hand_written,
                     rel, tiny_config)
from trainer import controller as controller_lib  # noqa: E402
from trainer.data import pipeline  # noqa: E402
from trainer.errors import UserError  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def _config(tmp_path, **kw):
  return tiny_config(tmp_path / "run", **kw)


def _run(tmp_path, task_class, **kw):
  config = _config(tmp_path, **kw)
  task = task_class(config)
  run = controller_lib.create(config, task)
  initial = run.model.get_weights()
  result = run.train(evaluate=False)
  return config, task, initial, run.model.get_weights(), result


def _check_split(tmp_path, task_class=TinyLM, **kw):
  config, task, initial, weights, _ = _run(tmp_path, task_class, **kw)
  reference = hand_written(config, task, initial)
  assert rel(weights, reference) < 2e-5, kw
  assert rel(reference, initial) > 1e-2   # the weights moved


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_per_token_mean_equals_full_batch_loop(tmp_path, accum):
  _check_split(tmp_path, grad_accum_steps=accum)


_SLOW = pytest.mark.skipif(not os.environ.get("TRAINER_SLOW"),
                           reason="suite budget; set TRAINER_SLOW=1")


@pytest.mark.parametrize("accum", [pytest.param(1, marks=_SLOW), 2, 4])
def test_packed_rows_per_token_mean_equals_full_batch_loop(tmp_path, accum):
  # Several documents a row, attention masked by segment: the weights are
  # the rows' real tokens, fewer in some rows than in others. (K = 1: the
  # step without accumulation, checked by the padded rows above.)
  _check_split(tmp_path, PackedLM, grad_accum_steps=accum)


@pytest.mark.parametrize("task_class", [
    ExampleMeanLM, pytest.param(PackedExampleMeanLM, marks=_SLOW)])
def test_per_example_normalisation_differs(tmp_path, task_class):
  # The test can see the bug it guards against: a per-example mean of
  # token means is not the per-token mean of the update.
  config, task, initial, weights, _ = _run(tmp_path, task_class,
                                           grad_accum_steps=2)
  assert rel(weights, hand_written(config, task, initial)) > 1e-3


def _first_batch(config, task):
  return next(iter(pipeline.train_dataset(task, config.train_split, BATCH,
                                          config.seed, 0)))


def test_weighted_metric_is_sum_vw_over_sum_w(tmp_path):
  config, task, initial, weights, result = _run(
      tmp_path, TinyLM, train_steps=1, summary_every=1, checkpoint_every=1)
  # The one update's loss, at the initial weights, by NumPy.
  model = task.build_model(None)
  model.set_weights(initial)
  features, targets, meta = _first_batch(config, task)
  per_token, mask = TinyLM.per_token(model, features, targets)
  w = mask.numpy() * meta["weight"].numpy()[:, None]
  np.testing.assert_allclose(result["train_loss"],
                             np.sum(per_token.numpy() * w) / np.sum(w),
                             rtol=1e-5)
  positions = np.broadcast_to(np.arange(LENGTH, dtype=np.float32), w.shape)
  expected = float(np.sum(positions * w) / np.sum(w))
  np.testing.assert_allclose(result["train_pos"], expected, rtol=1e-6)
  assert abs(expected - float(np.mean(positions))) > 0.5   # not the mean
  # tokens/s: examples/s times the real tokens per row, in the JSON line
  # and as a TensorBoard train scalar of its own.
  tokens_per_row = float(np.sum(w) / BATCH)
  np.testing.assert_allclose(result["train_tokens_per_row"], tokens_per_row,
                             rtol=1e-6)
  assert tokens_per_row < LENGTH - 1   # padding is not counted
  np.testing.assert_allclose(
      result["tokens_per_sec"], result["examples_per_sec"] * tokens_per_row,
      rtol=1e-5)
  train_dir = f"{config.model_dir}/train"
  logged = {tag: event_values(train_dir, tag)[1]
            for tag in ("tokens_per_sec", "examples_per_sec")}
  np.testing.assert_allclose(logged["tokens_per_sec"],
                             logged["examples_per_sec"] * tokens_per_row,
                             rtol=1e-5)
  assert logged["tokens_per_sec"] > 0


def test_weighted_metric_reaches_eval(tmp_path):
  config = _config(tmp_path, train_steps=1, checkpoint_every=1,
                   summary_every=1, eval_batch_size=64)
  task = TinyLM(config)
  run = controller_lib.create(config, task)
  metrics = run.evaluate()
  source = task.source(config.eval_split)
  features, targets = source.gather(tf.range(source.num_examples,
                                             dtype=tf.int64))
  per_token, mask = TinyLM.per_token(run.model, features, targets)
  per_token, mask = per_token.numpy(), mask.numpy()
  np.testing.assert_allclose(metrics["loss"],
                             np.sum(per_token * mask) / np.sum(mask),
                             rtol=1e-5)


def _aux(logits):
  """A per-example term: an L2 on the logits of the first position."""
  return 0.1 * tf.reduce_sum(tf.square(logits[:, 0]), -1)


class MixedLM(TinyLM):
  """A per-token term plus a per-example auxiliary term: each normalised
  by its own total."""

  PERSISTENT = True

  def train_step(self, batch, ctx):
    features, targets = batch
    mask = features["mask"]
    with tf.GradientTape(persistent=self.PERSISTENT) as tape:
      logits = ctx.model(features["tokens"], training=True)
      per_token = keras.losses.sparse_categorical_crossentropy(
          targets, logits, from_logits=True)
      loss = (ctx.scale_loss(per_token, mask, mean_over="weights") +
              ctx.scale_loss(_aux(logits)))
    ctx.minimize(tape, loss)
    return {"loss": (per_token, mask)}


def _mixed_loss(model, features, targets, weight):
  mask = features["mask"] * weight[:, None]
  logits = model(features["tokens"], training=True)
  per_token = keras.losses.sparse_categorical_crossentropy(
      targets, logits, from_logits=True)
  return (tf.reduce_sum(per_token * mask) / tf.reduce_sum(mask) +
          tf.reduce_sum(_aux(logits) * weight) / BATCH)


def test_mixed_terms_each_by_its_own_total(tmp_path):
  config, task, initial, weights, _ = _run(tmp_path, MixedLM,
                                           grad_accum_steps=2)
  reference = hand_written(config, task, initial, _mixed_loss)
  assert rel(weights, reference) < 2e-5


class MixedNotPersistent(MixedLM):
  PERSISTENT = False


def test_mixed_terms_without_persistent_tape_is_one_line(tmp_path):
  with pytest.raises(UserError, match="persistent=True"):
    _run(tmp_path, MixedNotPersistent)


# ---- mirrored(2): test_sparse_step.py's child process runs these --------
@pytest.mark.skipif(not _CHILD, reason="runs in the mirrored child process")
def test_child_mirrored(tmp_path):
  # Two replicas and two micro-batches: the totals cross both.
  _check_split(tmp_path, strategy="mirrored", cpu_replicas=2,
               grad_accum_steps=2)


@pytest.mark.skipif(not _CHILD, reason="runs in the mirrored child process")
def test_child_mirrored_packed(tmp_path):
  _check_split(tmp_path, PackedLM, strategy="mirrored", cpu_replicas=2,
               grad_accum_steps=2)


@pytest.mark.skipif(not _CHILD, reason="runs in the mirrored child process")
def test_child_mirrored_refuses_keras_gradient_accumulation(tmp_path):
  # Keras' own accumulation crashes inside a replica context under
  # mirrored(2); the framework refuses it before building, with one line.
  config = _config(tmp_path, strategy="mirrored", cpu_replicas=2)
  with pytest.raises(UserError, match="--grad_accum_steps") as info:
    controller_lib.create(config, RefusedAccumulation(config))
  assert "gradient_accumulation_steps=5" in str(info.value)
  assert "\n" not in str(info.value)


class RawTape(TinyLM):
  """Differentiates the unnormalised sum itself: refused, not K x wrong."""

  def train_step(self, batch, ctx):
    features, targets = batch
    with tf.GradientTape() as tape:
      per_token, mask = self.per_token(ctx.model, features, targets)
      loss = ctx.scale_loss(per_token, mask, mean_over="weights")
    ctx.apply_gradients(tape.gradient(loss, ctx.variables()), loss=loss)
    return {"loss": (per_token, mask)}


def test_weighted_term_outside_ctx_gradients_is_one_line(tmp_path):
  with pytest.raises(UserError, match="ctx.gradients or ctx.minimize"):
    _run(tmp_path, RawTape)
