"""In-process checks of user-written steps (issue 14), against references
computed another way: a hand-written GAN loop, a NumPy EMA, NumPy losses,
the first update of Adam and Lion. One default strategy per process."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_weights_close, checkpoint_weights
import plugin_tasks
from bench import gan
from trainer import controller as controller_lib
from trainer.config import Config

pytestmark = pytest.mark.timeout(300)

# The example's GAN step; Adam with a larger epsilon (plugin_tasks.GAN_EPSILON).
GAN = dict(task="plugin_tasks:ExactDCGAN", global_batch_size=32, train_steps=20,
           steps_per_loop=10, summary_every=10, checkpoint_every=20,
           eval_every=0, mode="train", seed=5)


def _weights(model):
  return [np.array(w) for w in model.get_weights()]


# ---- the GAN step equals a hand-written GAN loop ------------------------
def _raw_gan(config, initial, steps):
  """Plain tf.function + GradientTape + two Keras Adam, simultaneous
  updates (both gradients at the weights of the start of the update), the
  same batches (the framework's position stream) and the same per-example
  noise ((seed, first position) keyed, as ctx.normal draws it)."""
  from examples import dcgan
  from trainer.data import pipeline
  from trainer.build import task_of
  task = task_of(config)
  spec = pipeline.input_spec(task, config.train_split)
  g, d = dcgan.generator(), dcgan.discriminator(tuple(spec.shape))
  g.set_weights(initial["generator"])
  d.set_weights(initial["discriminator"])
  opt_d, opt_g = plugin_tasks.gan_adam(), plugin_tasks.gan_adam()
  batch = config.global_batch_size
  update = tf.function(gan.simultaneous_step(g, d, opt_d, opt_g))

  def step(images, start):
    seed = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(config.seed, tf.int64), start]), 1000)
    # ctx.normal's draw: 2x the update's rows, this update's first ones.
    z = tf.random.stateless_normal([2 * batch, dcgan.LATENT],
                                   seed=seed)[:batch]
    update(images, z)

  data = iter(pipeline.train_dataset(task, config.train_split, batch,
                                     config.seed, 0))
  for _ in range(steps):
    images, _, meta = next(data)
    step(images, meta["start"][0])
  return {"generator": _weights(g), "discriminator": _weights(d)}


def test_gan_step_equals_hand_written_loop(tmp_path):
  config = Config(**GAN, model_dir=str(tmp_path / "run"))
  run = controller_lib.create(config)
  initial = {n: _weights(m) for n, m in run.models.items()}
  run.train(evaluate=False)
  raw = _raw_gan(config, initial, GAN["train_steps"])
  moved = 0.0
  for name in ("generator", "discriminator"):
    framework = _weights(run.models[name])
    assert len(framework) == len(raw[name])
    for a, b, w0 in zip(framework, raw[name], initial[name]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
      moved = max(moved, float(np.max(np.abs(a - w0))))
  assert moved > 1e-3   # the weights did move: not two initializations


# ---- EMA: a NumPy recurrence over the raw weights of every step ---------
def _eval_accuracy(run, weights):
  """Accuracy of the main model with `weights` on the eval split, by hand."""
  task = run.task
  source = task.source(run.parts.config.eval_split)
  features, labels = source.gather(tf.range(source.num_examples,
                                            dtype=tf.int64))
  images, labels = task.preprocess(features, labels, {}, False)
  model = run.model
  saved = model.get_weights()
  model.set_weights(weights)
  logits = model(images, training=False)
  model.set_weights(saved)
  return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


def test_ema_equals_numpy_recurrence_and_eval_reports_both(tmp_path):
  decay, steps = 0.5, 5
  config = Config(model="cnn", dataset="digits", global_batch_size=32,
                  train_steps=steps, steps_per_loop=1, checkpoint_every=1,
                  keep_checkpoints=10, summary_every=5, eval_every=0,
                  mode="train_and_eval", ema_decay=decay, seed=2,
                  model_dir=str(tmp_path / "run"))
  run = controller_lib.create(config)
  variables = run.model.trainable_variables
  ema = [np.array(v) for v in variables]    # ema_0 = the initial weights
  result = run.train(evaluate=True)
  final_raw = run.model.get_weights()
  final_ema = [np.array(a) for a in run.parts.ema.averages]
  for t in range(1, steps + 1):
    run.checkpointer.restore(config, str(tmp_path / "run" / f"ckpt-{t}"))
    ema = [decay * e + (1 - decay) * np.array(v)
           for e, v in zip(ema, variables)]
    for mine, theirs in zip(ema, run.parts.ema.averages):
      np.testing.assert_allclose(np.array(theirs), mine, rtol=1e-6,
                                 atol=1e-7, err_msg=f"step {t}")
  # The average differs from the raw weights, and eval reports both.
  assert max(float(np.max(np.abs(a - b))) for a, b in
             zip(final_ema, [np.array(v) for v in variables])) > 1e-4
  model_weights = run.model.get_weights()
  trainable = {id(v) for v in run.model.trainable_variables}
  ema_weights, k = [], 0
  for v, w in zip(run.model.weights, model_weights):
    if id(v) in trainable:
      ema_weights.append(final_ema[k])
      k += 1
    else:
      ema_weights.append(w)
  assert result["eval_raw_accuracy"] == pytest.approx(
      _eval_accuracy(run, final_raw), abs=1e-6)
  assert result["eval_accuracy"] == pytest.approx(
      _eval_accuracy(run, ema_weights), abs=1e-6)


def test_resume_restores_the_ema(tmp_path):
  common = dict(model="cnn", dataset="digits", global_batch_size=32,
                steps_per_loop=2, checkpoint_every=2, summary_every=2,
                eval_every=0, mode="train", ema_decay=0.7, seed=4)
  straight = Config(**common, train_steps=6, model_dir=str(tmp_path / "a"))
  controller_lib.create(straight).train(evaluate=False)
  first = Config(**common, train_steps=4, model_dir=str(tmp_path / "b"))
  controller_lib.create(first).train(evaluate=False)
  controller_lib.create(first.replace(train_steps=6)).train(evaluate=False)
  a = checkpoint_weights(tmp_path / "a" / "ckpt-6")
  b = checkpoint_weights(tmp_path / "b" / "ckpt-6")
  assert any(k.startswith("ema/") for k in a), sorted(a)
  assert_weights_close(b, a, rtol=1e-6)


# ---- per-group optimizers: the first update of Adam and of Lion --------
def test_lr_groups_first_update_is_adam_body_and_lion_head(tmp_path):
  config = Config(task="examples.lr_groups:LrGroups", train_steps=1,
                  task_args="body_lr=0.001,head_lr=0.0003",
                  global_batch_size=32, steps_per_loop=1, eval_every=0,
                  mode="train", model_dir=str(tmp_path / "run"))
  run = controller_lib.create(config)
  head = run.model.layers[-1].trainable_variables
  assert set(map(id, run.parts.steps.optimizer_variables["head"])) == set(
      map(id, head))
  body = run.parts.steps.optimizer_variables["body"]
  before = {id(v): np.array(v) for v in run.model.trainable_variables}
  run.train(evaluate=False)
  # Lion's first update is lr * sign(gradient): exactly 3e-4 per entry.
  for v in head:
    delta = np.abs(np.array(v) - before[id(v)])
    moved = delta[delta > 0]
    assert moved.size > 0.5 * delta.size   # dead ReLU units: no gradient
    np.testing.assert_allclose(moved, 3e-4, rtol=1e-3)
  # Adam's first update is lr * g / (|g| + eps): at most 1e-3, and ~1e-3
  # wherever the gradient is far above eps.
  deltas = np.concatenate([np.abs(np.array(v) - before[id(v)]).ravel()
                           for v in body])
  assert deltas.max() <= 1e-3 * (1 + 1e-4)
  assert np.median(deltas[deltas > 0]) > 0.9e-3


# ---- the losses of the examples against NumPy ---------------------------
def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kd_loss_equals_numpy():
  from examples.distill import kd_loss
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(6, 10)), rng.normal(size=(6, 10))
  labels = rng.integers(0, 10, 6)
  temperature, alpha = 3.0, 0.3
  pt, ps = _np_log_softmax(t / temperature), _np_log_softmax(s / temperature)
  kl = (np.exp(pt) * (pt - ps)).sum(-1)
  ce = -_np_log_softmax(s)[np.arange(6), labels]
  expected = alpha * temperature ** 2 * kl + (1 - alpha) * ce
  got = kd_loss(tf.constant(labels), tf.constant(s, tf.float32),
                tf.constant(t, tf.float32), temperature, alpha)
  np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def _np_nt_xent(a, b, temperature):
  """SimCLR's NT-Xent, per example, the textbook way: row i of [A; B] has
  its positive at i + N (mod 2N) and every other row but itself as a
  negative; an example's loss is the mean of its two rows."""
  z = np.concatenate([a, b])
  n = len(a)
  sim = z @ z.T / temperature
  np.fill_diagonal(sim, -np.inf)
  log_prob = sim - np.log(np.exp(sim).sum(1, keepdims=True))
  rows = -log_prob[np.arange(2 * n), (np.arange(2 * n) + n) % (2 * n)]
  return 0.5 * (rows[:n] + rows[n:])


def test_nt_xent_equals_numpy_and_does_not_depend_on_the_split():
  from examples.simclr import nt_xent
  rng = np.random.default_rng(1)
  n, temperature = 8, 0.2
  a, b = (x / np.linalg.norm(x, axis=1, keepdims=True)
          for x in rng.normal(size=(2, n, 5)))
  expected = _np_nt_xent(a, b, temperature)
  positions = np.arange(100, 100 + n, dtype=np.int64)
  ones = np.ones(n, np.float32)
  args = [tf.constant(x, tf.float32) for x in (a, b)]
  full = nt_xent(*args, tf.constant(positions), *args, tf.constant(positions),
                 tf.constant(ones), temperature)
  np.testing.assert_allclose(full.numpy(), expected, rtol=1e-5)
  # A replica holding rows 3..5 of the gathered batch gets their losses.
  part = nt_xent(args[0][3:6], args[1][3:6], tf.constant(positions[3:6]),
                 *args, tf.constant(positions), tf.constant(ones), temperature)
  np.testing.assert_allclose(part.numpy(), expected[3:6], rtol=1e-5)
  # A padding row (weight 0) is nobody's negative.
  weight = ones.copy()
  weight[7] = 0
  padded = nt_xent(*[x[:7] for x in args], tf.constant(positions[:7]), *args,
                   tf.constant(positions), tf.constant(weight), temperature)
  np.testing.assert_allclose(padded.numpy(),
                             _np_nt_xent(a[:7], b[:7], temperature),
                             rtol=1e-5)


# ---- a NaN in one optimizer's gradients drops the whole update ---------
def _everything(run):
  """Every variable an update may change, read eagerly, by position."""
  variables = [v for m in run.models.values() for v in m.variables]
  variables += [v for o in run.parts.optimizers.values() for v in o.variables]
  return [np.array(v) for v in variables]


def test_nan_in_one_optimizer_drops_the_whole_update_on_both_paths(tmp_path):
  """NanDCGAN: the generator's loss and gradient are NaN in the 4th
  update (stream position 100), the discriminator's finite. The unguarded
  chunk (the executor's first try) reports it and its start is restored;
  the guarded loop (the replay) drops it: neither optimizer applied, not
  even the finite discriminator's, not even Adam's iteration count."""
  config = Config(task="plugin_tasks:NanDCGAN", global_batch_size=32,
                  train_steps=3, steps_per_loop=3, summary_every=3,
                  eval_every=0, mode="train", model_dir=str(tmp_path / "r"))
  run = controller_lib.create(config)
  run.train(evaluate=False)
  state, steps, one = run.state, run.parts.steps, tf.constant(1, tf.int64)
  assert int(state.position.numpy()) == 96   # the next batch holds 100
  before = _everything(run)
  # The unguarded chunk applies unconditionally and says it went bad.
  assert not bool(steps.unguarded_chunk(run.executor.train_iterator(), one))
  assert any(not np.all(np.isfinite(a)) for a in _everything(run))
  steps.shadow.restore()
  for a, b in zip(_everything(run), before):
    np.testing.assert_array_equal(a, b)
  assert int(state.position.numpy()) == 96
  # The guarded loop drops the update whole.
  steps.guarded_loop(run.executor.train_iterator(), one)
  for a, b in zip(_everything(run), before):
    np.testing.assert_array_equal(a, b)
  assert int(state.global_step.numpy()) == 3
  assert int(state.nonfinite_steps.numpy()) == 1
  assert int(state.position.numpy()) == 128
  # The next (finite) update applies both optimizers again.
  steps.guarded_loop(run.executor.train_iterator(), one)
  assert int(state.global_step.numpy()) == 4
  after = _everything(run)
  assert sum(not np.array_equal(a, b) for a, b in zip(after, before)) > 10


def test_export_uses_the_moving_average(tmp_path):
  """trainer.export of a run with --ema_decay rebuilds the model with the
  averages (what its evaluation used), not the raw weights."""
  from trainer import load
  config = Config(model="cnn", dataset="digits", global_batch_size=32,
                  train_steps=4, steps_per_loop=2, summary_every=2,
                  eval_every=0, mode="train", ema_decay=0.5,
                  model_dir=str(tmp_path / "run"))
  run = controller_lib.create(config)
  run.train(evaluate=False)
  averages = [np.array(a) for a in run.parts.ema.averages]
  raw = [np.array(v) for v in run.model.trainable_variables]
  restored = load.restore(config.model_dir)
  model, path = restored.model, restored.checkpoint
  assert path.endswith("ckpt-4")
  exported = [np.array(v) for v in model.trainable_variables]
  for e, a in zip(exported, averages):
    np.testing.assert_array_equal(e, a)
  assert any(not np.array_equal(e, r) for e, r in zip(exported, raw))


def test_per_example_draws_keep_the_static_batch_dimension():
  """ctx.normal/uniform slice a whole update's draw with tensor bounds;
  their batch dimension must stay the local batch's static size: models
  traced on an unknown one ran the GAN step ~10% slower (bench.paired
  --gan: 0.84 -> 0.95). Values: this micro-batch's rows of the update's
  draw, as in a NumPy slice."""
  from trainer.step.context import StepContext

  class Steps:
    update_batch, seed = 8, 3

  seen = {}

  @tf.function
  def draw(pos, start):
    ctx = StepContext(Steps(), {"pos": pos, "start": start}, training=True)
    seen["shape"] = ctx.normal([5]).shape
    return ctx.normal([5]), ctx.uniform([2], salt=1)

  pos = tf.range(12, 16, dtype=tf.int64)  # 2nd micro-batch of update 8..15
  normal, uniform = draw(pos, tf.fill([4], tf.constant(12, tf.int64)))
  assert seen["shape"] == (4, 5) and uniform.shape == (4, 2)
  full, _ = draw(tf.range(8, 16, dtype=tf.int64),
                 tf.fill([8], tf.constant(8, tf.int64)))
  np.testing.assert_array_equal(normal.numpy(), full.numpy()[4:])
