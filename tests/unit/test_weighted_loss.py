"""Per-token losses exact under every split: ctx.scale_loss(mean_over=
"weights") against a hand-written full-batch loop that divides by the
update's real-token count; weighted (values, weights) metrics against
NumPy. Mirrored(2) runs in the child process that
test_sparse_step.py::test_mirrored_two_replicas starts (logical CPU devices
must be configured before TensorFlow starts)."""

import numpy as np
import pytest

from two_replicas import IN_CHILD as _CHILD

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer import Task, array_source  # noqa: E402
from trainer import controller as controller_lib  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.data import pipeline  # noqa: E402
from trainer.errors import UserError  # noqa: E402

pytestmark = pytest.mark.timeout(300)

VOCAB, LENGTH, EXAMPLES, BATCH, UPDATES, LR = 40, 12, 512, 16, 12, 0.5


def _sequences(seed: int = 3):
  """Token rows of random lengths 2..LENGTH padded with 0; the target is
  the next token; mask 1 on real targets."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, LENGTH + 1, EXAMPLES)
  tokens = rng.integers(1, VOCAB, (EXAMPLES, LENGTH + 1)).astype(np.int32)
  mask = (np.arange(LENGTH)[None, :] < lengths[:, None] - 1).astype(
      np.float32)
  inputs = tokens[:, :-1] * (np.arange(LENGTH)[None] < lengths[:, None])
  return {"tokens": inputs.astype(np.int32), "mask": mask}, tokens[:, 1:]


def _model():
  return keras.Sequential([keras.Input((LENGTH,), dtype="int32"),
                           keras.layers.Embedding(VOCAB, 8),
                           keras.layers.Dense(VOCAB)])


def _per_token(model, features, targets):
  logits = model(features["tokens"], training=True)
  return keras.losses.sparse_categorical_crossentropy(targets, logits,
                                                      from_logits=True)


def _positions(mask):
  """Each token's position in its row: a metric whose weighted mean is
  far from its plain one."""
  return tf.zeros_like(mask) + tf.range(LENGTH, dtype=tf.float32)


class TinyLM(Task):
  """Next-token loss, the mean over real tokens of the whole update."""

  MEAN_OVER = "weights"

  def source(self, split):
    features, targets = _sequences(3 if split == "train" else 4)
    return array_source(f"tiny_lm:{split}", features, targets)

  def build_model(self, input_spec):
    del input_spec
    return _model()

  def train_step(self, batch, ctx):
    features, targets = batch
    mask = features["mask"]
    with tf.GradientTape() as tape:
      per_token = _per_token(ctx.model, features, targets)
      if self.MEAN_OVER == "weights":
        loss = ctx.scale_loss(per_token, mask, mean_over="weights")
      else:
        # Per-example normalisation: each row's token mean, averaged
        # over the update's examples.
        per_example = (tf.reduce_sum(per_token * mask, 1) /
                       tf.maximum(tf.reduce_sum(mask, 1), 1.0))
        loss = ctx.scale_loss(per_example)
    ctx.minimize(tape, loss)
    return {"loss": (per_token, mask), "pos": (_positions(mask), mask)}

  def eval_step(self, batch, ctx):
    features, targets = batch
    return {"loss": (_per_token(ctx.model, features, targets),
                     features["mask"])}


class ExampleMeanLM(TinyLM):
  MEAN_OVER = "examples"


def _config(tmp_path, **kw):
  base = dict(global_batch_size=BATCH, train_steps=UPDATES,
              steps_per_loop=UPDATES, summary_every=UPDATES,
              checkpoint_every=UPDATES, eval_every=0, mode="train",
              optimizer="sgd", learning_rate=LR, seed=1,
              model_dir=str(tmp_path / "run"))
  base.update(kw)
  return Config(**base)


def _hand_written(config, task, initial):
  """Plain TF: each update's full batch, loss = sum(token losses * mask) /
  the update's real tokens, SGD."""
  model = _model()
  model.set_weights(initial)
  data = iter(pipeline.train_dataset(task, config.train_split, BATCH,
                                     config.seed, 0))

  @tf.function
  def step(features, targets, weight):
    mask = features["mask"] * weight[:, None]
    with tf.GradientTape() as tape:
      loss = (tf.reduce_sum(_per_token(model, features, targets) * mask) /
              tf.reduce_sum(mask))
    grads = tape.gradient(loss, model.trainable_variables)
    for v, g in zip(model.trainable_variables, grads):
      v.assign_sub(LR * tf.convert_to_tensor(g))

  for _ in range(UPDATES):
    features, targets, meta = next(data)
    step(features, targets, meta["weight"])
  return model.get_weights()


def _rel(a, b) -> float:
  """Worst over variables of |a - b| / |b| (norms of whole variables)."""
  worst = max(float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12))
              for x, y in zip(a, b))
  assert np.isfinite(worst)
  return worst


def _run(tmp_path, task_class, **kw):
  config = _config(tmp_path, **kw)
  task = task_class(config)
  run = controller_lib.create(config, task)
  initial = run.model.get_weights()
  result = run.train(evaluate=False)
  return config, task, initial, run.model.get_weights(), result


def _check_split(tmp_path, **kw):
  config, task, initial, weights, _ = _run(tmp_path, TinyLM, **kw)
  reference = _hand_written(config, task, initial)
  assert _rel(weights, reference) < 2e-5, kw
  assert _rel(reference, initial) > 1e-2   # the weights moved


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_per_token_mean_equals_full_batch_loop(tmp_path, accum):
  _check_split(tmp_path, grad_accum_steps=accum)


def test_per_example_normalisation_differs(tmp_path):
  # The test can see the bug it guards against: a per-example mean of
  # token means is not the per-token mean of the update.
  config, task, initial, weights, _ = _run(tmp_path, ExampleMeanLM,
                                           grad_accum_steps=2)
  assert _rel(weights, _hand_written(config, task, initial)) > 1e-3


def test_weighted_metric_is_sum_vw_over_sum_w(tmp_path):
  config, task, initial, weights, result = _run(
      tmp_path, TinyLM, train_steps=1, summary_every=1, checkpoint_every=1)
  # The one update's loss, at the initial weights, by NumPy.
  model = _model()
  model.set_weights(initial)
  features, targets, meta = next(iter(pipeline.train_dataset(
      task, config.train_split, BATCH, config.seed, 0)))
  per_token = _per_token(model, features, targets).numpy()
  w = features["mask"].numpy() * meta["weight"].numpy()[:, None]
  np.testing.assert_allclose(result["train_loss"],
                             np.sum(per_token * w) / np.sum(w), rtol=1e-5)
  positions = np.broadcast_to(np.arange(LENGTH, dtype=np.float32), w.shape)
  expected = float(np.sum(positions * w) / np.sum(w))
  np.testing.assert_allclose(result["train_pos"], expected, rtol=1e-6)
  assert abs(expected - float(np.mean(positions))) > 0.5   # not the mean


def test_weighted_metric_reaches_eval(tmp_path):
  config = _config(tmp_path, train_steps=1, checkpoint_every=1,
                   summary_every=1, eval_batch_size=64)
  task = TinyLM(config)
  run = controller_lib.create(config, task)
  metrics = run.evaluate()
  source = task.source(config.eval_split)
  features, targets = source.gather(tf.range(source.num_examples,
                                             dtype=tf.int64))
  per_token = _per_token(run.model, features, targets).numpy()
  mask = features["mask"].numpy()
  np.testing.assert_allclose(metrics["loss"],
                             np.sum(per_token * mask) / np.sum(mask),
                             rtol=1e-5)


class MixedLM(TinyLM):
  """A per-token term plus a per-example auxiliary term (an L2 on the
  logits of the first position): each normalised by its own total."""

  PERSISTENT = True

  def train_step(self, batch, ctx):
    features, targets = batch
    mask = features["mask"]
    with tf.GradientTape(persistent=self.PERSISTENT) as tape:
      logits = ctx.model(features["tokens"], training=True)
      per_token = keras.losses.sparse_categorical_crossentropy(
          targets, logits, from_logits=True)
      aux = 0.1 * tf.reduce_sum(tf.square(logits[:, 0]), -1)
      loss = (ctx.scale_loss(per_token, mask, mean_over="weights") +
              ctx.scale_loss(aux))
    ctx.minimize(tape, loss)
    return {"loss": (per_token, mask)}


def _hand_written_mixed(config, task, initial):
  model = _model()
  model.set_weights(initial)
  data = iter(pipeline.train_dataset(task, config.train_split, BATCH,
                                     config.seed, 0))

  @tf.function
  def step(features, targets, weight):
    mask = features["mask"] * weight[:, None]
    with tf.GradientTape() as tape:
      logits = model(features["tokens"], training=True)
      per_token = keras.losses.sparse_categorical_crossentropy(
          targets, logits, from_logits=True)
      aux = 0.1 * tf.reduce_sum(tf.square(logits[:, 0]), -1)
      loss = (tf.reduce_sum(per_token * mask) / tf.reduce_sum(mask) +
              tf.reduce_sum(aux * weight) / BATCH)
    grads = tape.gradient(loss, model.trainable_variables)
    for v, g in zip(model.trainable_variables, grads):
      v.assign_sub(LR * tf.convert_to_tensor(g))

  for _ in range(UPDATES):
    features, targets, meta = next(data)
    step(features, targets, meta["weight"])
  return model.get_weights()


def test_mixed_terms_each_by_its_own_total(tmp_path):
  config, task, initial, weights, _ = _run(tmp_path, MixedLM,
                                           grad_accum_steps=2)
  assert _rel(weights, _hand_written_mixed(config, task, initial)) < 2e-5


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


class RawTape(TinyLM):
  """Differentiates the unnormalised sum itself: refused, not K x wrong."""

  def train_step(self, batch, ctx):
    features, targets = batch
    with tf.GradientTape() as tape:
      per_token = _per_token(ctx.model, features, targets)
      loss = ctx.scale_loss(per_token, features["mask"], mean_over="weights")
    ctx.apply_gradients(tape.gradient(loss, ctx.variables()), loss=loss)
    return {"loss": (per_token, features["mask"])}


def test_weighted_term_outside_ctx_gradients_is_one_line(tmp_path):
  with pytest.raises(UserError, match="ctx.gradients or ctx.minimize"):
    _run(tmp_path, RawTape)
