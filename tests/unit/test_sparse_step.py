"""Sparse gradients through the step: an embedding table of 100,000 rows
looked up a few rows at a time reaches the optimizer as tf.IndexedSlices
of those rows (never the table's dense shape), and the weights equal a
hand-written loop that makes every gradient dense.
Mirrored(2) runs in one child process, with test_weighted_loss.py's
mirrored checks (logical CPU devices must exist before TensorFlow starts)."""

import numpy as np
import pytest

import two_replicas  # noqa: E402
from two_replicas import IN_CHILD as _CHILD
from tiny_lm import BATCH, LR, hand_written, tiny_config  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer import Task, array_source  # noqa: E402
from trainer import controller as controller_lib  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.optim import prepare  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ROWS, DIM, IDS, UPDATES = 100_000, 8, 3, 6   # BATCH, LR: tiny_lm's
# The few rows the data touches, spread over the table (repeats included).
TOUCHED = np.array([5, 17, 40_000, 40_001, 99_999, 12_345], np.int32)


class Recording(keras.optimizers.SGD):
  """SGD that notes, while the step is traced, what reaches apply."""

  seen = []

  def apply(self, grads, trainable_variables=None):
    Recording.seen.append([(type(g).__name__,
                            tuple(g.values.shape) if isinstance(
                                g, tf.IndexedSlices) else tuple(g.shape))
                           for g in grads])
    checks = [tf.debugging.assert_less_equal(
        tf.shape(g.values)[0], len(TOUCHED),
        message="more slices than touched rows")
              for g in grads if isinstance(g, tf.IndexedSlices)]
    with tf.control_dependencies(checks):
      return super().apply(grads, trainable_variables)


class Lookups(Task):
  def source(self, split):
    rng = np.random.default_rng(0 if split == "train" else 1)
    ids = TOUCHED[rng.integers(0, len(TOUCHED), (256, IDS))]
    target = rng.normal(size=(256, 1)).astype(np.float32)
    return array_source(f"lookups:{split}", ids, target)

  def build_model(self, input_spec):
    del input_spec
    return _model()

  def optimizers(self):
    return Recording(learning_rate=LR)

  def loss(self, labels, outputs):
    return tf.reduce_mean(tf.square(outputs - labels), -1)


def _model():
  ids = keras.Input((IDS,), dtype="int32")
  pooled = keras.ops.mean(keras.layers.Embedding(ROWS, DIM)(ids), axis=1)
  return keras.Model(ids, keras.layers.Dense(1)(pooled))


def _dense_mean(task):
  """The full batch's mean loss (hand_written makes every gradient dense
  with tf.convert_to_tensor before SGD)."""
  def loss_of(model, ids, target, weight):
    per_example = task.loss(target, model(ids, training=True))
    return tf.reduce_sum(per_example * weight) / BATCH
  return loss_of


def _check(tmp_path, **kw):
  config = tiny_config(tmp_path / "run", train_steps=UPDATES,
                       steps_per_loop=UPDATES, summary_every=UPDATES,
                       checkpoint_every=UPDATES, seed=3, **kw)
  task = Lookups(config)
  run = controller_lib.create(config, task)
  initial = run.model.get_weights()
  Recording.seen = []
  run.train(evaluate=False)
  seen = Recording.seen
  assert seen, "the optimizer was never traced"
  for grads in seen:
    kind, shape = grads[0]     # the table's gradient
    assert kind == "IndexedSlices", grads
    # Each touched row once (repeated look-ups summed: Recording asserts
    # it at run time), never the table.
    assert shape[0] is None and shape[1:] == (DIM,), grads
  weights = run.model.get_weights()
  reference = hand_written(config, task, initial, _dense_mean(task))
  for a, b in zip(weights, reference):
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 1e-6, (kw, rel)
  moved = np.linalg.norm(weights[0] - initial[0])
  assert moved > 1e-3, (kw, moved)


@pytest.mark.parametrize("accum", [1, 2])
def test_sparse_equals_dense(tmp_path, accum):
  _check(tmp_path, grad_accum_steps=accum)


@pytest.mark.parametrize("option,fix", [
    ({"gradient_accumulation_steps": 5}, "--grad_accum_steps"),
    ({"use_ema": True}, "--ema_decay"),
    ({"loss_scale_factor": 128.0}, "--mixed_precision=mixed_float16"),
])
def test_keras_options_that_fight_the_step_are_refused(option, fix):
  optimizer = keras.optimizers.Adam(**option)
  with pytest.raises(UserError, match=fix) as info:
    prepare(optimizer, [tf.Variable(tf.zeros([2]))])
  assert "\n" not in str(info.value)


def test_clipnorm_stays_allowed():
  prepare(keras.optimizers.SGD(global_clipnorm=1.0),
          [tf.Variable(tf.zeros([2]))])


# ---- mirrored(2): one child process runs these and test_weighted_loss's --
@pytest.mark.skipif(not _CHILD, reason="runs in the mirrored child process")
@pytest.mark.parametrize("accum", [1, 2])
def test_child_mirrored_sparse(tmp_path, accum):
  _check(tmp_path, strategy="mirrored", cpu_replicas=2,
         grad_accum_steps=accum)


@pytest.mark.skipif(_CHILD, reason="the parent of the mirrored child")
@pytest.mark.timeout(600)
def test_mirrored_two_replicas():
  # This file's, test_weighted_loss.py's, test_update_every.py's and
  # test_topology.py's mirrored(2) checks, in one child process.
  two_replicas.run_child(
      ["tests/unit/test_sparse_step.py::test_child_mirrored_sparse",
       "tests/unit/test_weighted_loss.py::test_child_mirrored",
       "tests/unit/test_weighted_loss.py::test_child_mirrored_packed",
       "tests/unit/test_weighted_loss.py::"
       "test_child_mirrored_refuses_keras_gradient_accumulation",
       "tests/unit/test_update_every.py::test_child_mirrored",
       "tests/unit/test_topology.py::test_child_mirrored"], passed=8,
      timeout_s=550)
