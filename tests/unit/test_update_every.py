"""Task.update_every: an optimizer that applies on every N-th update only,
against a hand-written loop that applies it on updates N, 2N, ... (Adam
state and the --ema_decay averages included), under the default strategy
and mirrored(2) (a child process: logical CPU devices must be configured
before TensorFlow starts), K = 1 and 2; a resumed run bit-identical to an
uninterrupted one; refusals."""

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
from trainer.step import steps as steps_lib  # noqa: E402

pytestmark = pytest.mark.timeout(300)

DIM, EXAMPLES, BATCH, UPDATES, EVERY, LR, DECAY = 4, 256, 16, 12, 3, 0.05, 0.5


def _adam():
  # A larger epsilon: on entries whose gradient is near zero Adam's step
  # is ~lr whatever the gradient's last bits, which differ between the
  # fused kernel the framework uses and Keras' formula.
  return keras.optimizers.Adam(LR, epsilon=1e-3)


def _critic():
  return keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(1)],
                          name="critic")


def _generator():
  return keras.Sequential([keras.Input((DIM,)),
                           keras.layers.Dense(DIM, activation="tanh")],
                          name="g")


def _critic_loss(critic, g, x, y):
  """Per example: fit y on real rows, push fakes to 0."""
  return (tf.square(critic(x)[:, 0] - y) +
          0.5 * tf.square(critic(g(x))[:, 0]))


def _g_loss(critic, g, x):
  fake = g(x)
  return tf.square(critic(fake)[:, 0] - 1.0) + 0.1 * tf.reduce_sum(
      tf.square(fake), -1)


class Duel(Task):
  """Two players: "critic" every update, "g" every EVERY-th; g's loss is
  computed only on its turns (ctx.updates)."""

  def source(self, split):
    rng = np.random.default_rng(0 if split == "train" else 1)
    x = rng.normal(size=(EXAMPLES, DIM)).astype(np.float32)
    y = (x @ np.arange(1, DIM + 1, dtype=np.float32)) / DIM
    return array_source(f"duel:{split}", x, y.astype(np.float32))

  def build_model(self, input_spec):
    del input_spec
    return {"critic": _critic(), "g": _generator()}

  def optimizers(self):
    return {"critic": _adam(), "g": _adam()}

  def update_every(self, name):
    return EVERY if name == "g" else 1

  def train_step(self, batch, ctx):
    x, y = batch
    critic, g = ctx.models["critic"], ctx.models["g"]
    with tf.GradientTape() as tape:
      per_example = _critic_loss(critic, g, x, y)
      loss = ctx.scale_loss(per_example)
    ctx.minimize(tape, loss, "critic")

    def g_gradients():
      with tf.GradientTape() as g_tape:
        g_loss = ctx.scale_loss(_g_loss(critic, g, x))
      return ctx.gradients(g_tape, g_loss, "g")

    turn = ctx.updates("g")
    ctx.apply_gradients(
        tf.cond(turn, g_gradients, lambda: self.off_turn(ctx)), "g")
    return {"loss": per_example, "g_turn": tf.cast(turn, tf.float32)}

  def off_turn(self, ctx):
    return [tf.zeros(v.shape) for v in ctx.variables("g")]

  def eval_step(self, batch, ctx):
    x, y = batch
    return {"loss": _critic_loss(ctx.models["critic"], ctx.models["g"], x, y)}


class NaNOffTurn(Duel):
  """Hands g NaN gradients on the updates it does not apply."""

  def off_turn(self, ctx):
    return [tf.fill(v.shape, float("nan")) for v in ctx.variables("g")]


def _config(tmp_path, name="run", **kw):
  base = dict(global_batch_size=BATCH, train_steps=UPDATES, steps_per_loop=4,
              summary_every=UPDATES, checkpoint_every=UPDATES, eval_every=0,
              mode="train", seed=1, ema_decay=DECAY,
              model_dir=str(tmp_path / name))
  base.update(kw)
  return Config(**base)


def _values(variables) -> list:
  return [np.array(tf.convert_to_tensor(v)) for v in variables]


def _hand_written(config, task, initial) -> dict:
  """Plain Keras: both gradients at the start of each update on its full
  batch; the critic's Adam every update, g's on updates 3, 6, 9, ...; the
  moving average of each player's weights after each of its updates."""
  critic, g = _critic(), _generator()
  critic.set_weights(initial["critic"])
  g.set_weights(initial["g"])
  opt_c, opt_g = _adam(), _adam()
  opt_c.build(critic.trainable_variables)
  opt_g.build(g.trainable_variables)
  ema = {"critic": _values(critic.trainable_variables),
         "g": _values(g.trainable_variables)}
  data = iter(pipeline.train_dataset(task, config.train_split, BATCH,
                                     config.seed, 0))
  for update in range(1, UPDATES + 1):
    x, y, meta = next(data)
    w = meta["weight"]
    with tf.GradientTape(persistent=True) as tape:
      c_loss = tf.reduce_sum(_critic_loss(critic, g, x, y) * w) / BATCH
      g_loss = tf.reduce_sum(_g_loss(critic, g, x) * w) / BATCH
    c_grads = tape.gradient(c_loss, critic.trainable_variables)
    g_grads = tape.gradient(g_loss, g.trainable_variables)
    opt_c.apply(c_grads, critic.trainable_variables)
    players = [("critic", critic)]
    if update % EVERY == 0:
      opt_g.apply(g_grads, g.trainable_variables)
      players.append(("g", g))
    for name, model in players:
      ema[name] = [DECAY * e + (1 - DECAY) * v for e, v in
                   zip(ema[name], _values(model.trainable_variables))]
  return {"critic": critic.get_weights(), "g": g.get_weights(),
          "g_optimizer": _values(opt_g.variables),
          "ema": ema["critic"] + ema["g"]}


def _run(config, task_class=None):
  task = (task_class or Duel)(config)
  run = controller_lib.create(config, task)
  initial = {n: m.get_weights() for n, m in run.models.items()}
  result = run.train(evaluate=False)
  return run, task, initial, result


def _check_equals_hand_written(tmp_path, task_class=Duel, **kw):
  config = _config(tmp_path, **kw)
  run, task, initial, result = _run(config, task_class)
  reference = _hand_written(config, task, initial)
  g_optimizer = run.parts.optimizers["g"]
  # g applied on updates 3, 6, 9 and 12 only; its Adam counted 4 steps.
  assert int(g_optimizer.iterations.numpy()) == UPDATES // EVERY
  assert int(run.parts.optimizers["critic"].iterations.numpy()) == UPDATES
  np.testing.assert_allclose(result["train_g_turn"], 1.0 / EVERY, rtol=1e-6)
  for name in ("critic", "g"):
    assert _rel(run.models[name].get_weights(), reference[name]) < 2e-5, name
    assert _rel(initial[name], reference[name]) > 1e-2, name   # they moved
  # Adam's state (iterations, learning rate, moments) in the same order.
  mine = _values(g_optimizer.variables)
  assert len(mine) == len(reference["g_optimizer"])
  assert _rel(mine, reference["g_optimizer"]) < 2e-5
  assert _rel(_values(run.parts.ema.averages), reference["ema"]) < 5e-5
  return result


def _rel(a, b) -> float:
  """Worst over variables of |a - b| / |b| (norms of whole variables:
  Adam's steps on near-zero entries differ in the last bits between its
  fused kernel and Keras' formula)."""
  worst = max(float(np.linalg.norm(np.asarray(x, np.float64) - y) /
                    max(np.linalg.norm(y), 1e-12)) for x, y in zip(a, b))
  assert np.isfinite(worst)
  return worst


@pytest.mark.parametrize("accum", [1, 2])
def test_g_every_third_update_equals_hand_written_loop(tmp_path, accum):
  _check_equals_hand_written(tmp_path, grad_accum_steps=accum)


def test_gradients_off_turn_never_spoil_the_update(tmp_path):
  # NaN gradients handed to g when it does not apply: no update is
  # dropped (the run equals the loop that never computes them), and g's
  # state, which its apply made NaN, is put back exactly.
  result = _check_equals_hand_written(tmp_path, NaNOffTurn)
  assert result["nonfinite_steps"] == 0


def _state(run) -> list:
  return ([w for m in run.models.values() for w in m.get_weights()] +
          [v for o in run.parts.optimizers.values() for v in _values(o.variables)] +
          _values(run.parts.ema.averages))


def test_resume_mid_run_is_bit_identical(tmp_path):
  # Stopped after update 7 (g's turns 3 and 6 done, 9 next): a new run's
  # state restored from the checkpoint continues to 12.
  whole, *_ = _run(_config(tmp_path, "whole"))
  _run(_config(tmp_path, "resumed", train_steps=7, checkpoint_every=7))
  resumed, _, _, result = _run(_config(tmp_path, "resumed"))
  assert result["global_step"] == UPDATES
  assert int(resumed.parts.optimizers["g"].iterations.numpy()) == UPDATES // EVERY
  for a, b in zip(_state(resumed), _state(whole)):
    np.testing.assert_array_equal(a, b)


class BadEvery(Duel):
  def update_every(self, name):
    return 0 if name == "g" else 1


def test_bad_update_every_is_one_line(tmp_path):
  with pytest.raises(UserError, match=r"update_every\('g'\) returned 0"):
    _run(_config(tmp_path), BadEvery)


def test_parameter_servers_refuse_with_one_line():
  # Workers apply asynchronously: there is no shared count to take turns on.
  with pytest.raises(UserError, match="parameter_server"):
    steps_lib._schedules(Duel(None), {"critic": None, "g": None},
                         True)
  assert steps_lib._schedules(Task(None), {"a": None}, True) == {}


# ---- examples/wgan_gp.py ------------------------------------------------
def test_wgan_gp_example_steps_the_generator_every_fifth_update(tmp_path):
  config = Config(task="examples.wgan_gp:WGANGP", train_steps=50,
                  global_batch_size=32, steps_per_loop=25, summary_every=25,
                  checkpoint_every=50, eval_every=0, mode="train", seed=3,
                  model_dir=str(tmp_path / "wgan"))
  run = controller_lib.create(config)
  before = run.models["generator"].get_weights()
  result = run.train(evaluate=False)
  assert result["global_step"] == 50 and result["nonfinite_steps"] == 0
  assert int(run.parts.optimizers["critic"].iterations.numpy()) == 50
  assert int(run.parts.optimizers["generator"].iterations.numpy()) == 50 // 5
  assert _rel(before, run.models["generator"].get_weights()) > 1e-3
  assert np.isfinite(result["train_w_distance"])


def test_gradient_penalty_of_a_linear_critic_equals_numpy():
  # critic(x) = w.x + b: its input gradient is w everywhere, so the
  # penalty is (|w| - 1)^2 and its gradient in w is 2 (|w| - 1) w / |w|.
  from examples.wgan_gp import gradient_penalty
  critic = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(1)])
  w = np.array([[0.5], [-1.5], [2.0], [0.25]], np.float32)
  critic.layers[-1].kernel.assign(w)
  rng = np.random.default_rng(0)
  real, fake = (tf.constant(rng.normal(size=(3, 2, 2, 1)), tf.float32)
                for _ in range(2))
  mix = tf.constant(rng.uniform(size=(3, 1, 1, 1)), tf.float32)
  kernel = critic.layers[-1].kernel
  with tf.GradientTape() as tape:
    penalty = gradient_penalty(critic, real, fake, mix)
    total = tf.reduce_sum(penalty)
  norm = np.linalg.norm(w)
  np.testing.assert_allclose(penalty.numpy(), [(norm - 1) ** 2] * 3,
                             rtol=1e-5)
  np.testing.assert_allclose(tape.gradient(total, kernel).numpy(),
                             3 * 2 * (norm - 1) * w / norm, rtol=1e-5)


# ---- mirrored(2), in a child process -----------------------------------
@pytest.mark.skipif(not _CHILD, reason="runs in the mirrored child process")
@pytest.mark.parametrize("accum", [1, 2])
def test_child_mirrored(tmp_path, accum):
  _check_equals_hand_written(tmp_path, strategy="mirrored", cpu_replicas=2,
                             grad_accum_steps=accum)
