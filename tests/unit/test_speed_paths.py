"""The fast paths of the step (README "Speed") give the results of the plain
ones: the per-chunk non-finite guard equals the per-update guard, and the
fused optimizer kernels equal Keras' own update_step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import controller, guard, optim
from trainer.config import Config

import plugin_tasks  # noqa: F401  (tests/ is on sys.path: the NaN task)


def _nan_run(tmp_path, nonfinite: str, chunk_guard: bool):
  """NanDigits (a NaN in the batch at position 100, update 3 of the first
  chunk of 5); returns the runner after training (or after the failure)."""
  config = Config(task="plugin_tasks:NanDigits", optimizer="adam",
                  global_batch_size=32, train_steps=12, steps_per_loop=5,
                  summary_every=100, checkpoint_every=100, eval_every=0,
                  mode="train", nonfinite=nonfinite, input_wait_steps=0,
                  model_dir=str(tmp_path / f"{nonfinite}_{chunk_guard}"))
  runner = controller.create(config)
  runner.steps.chunk_guard = chunk_guard
  if nonfinite == "fail":
    with pytest.raises(guard.NonFiniteError, match="position 96"):
      runner.train(evaluate=False)
  else:
    runner.train(evaluate=False)
  return runner


def _everything(runner) -> dict:
  state = runner.state
  values = {f"model/{i}": v.numpy() for i, v in enumerate(runner.model.variables)}
  values.update({f"optimizer/{i}": np.asarray(v.numpy())
                 for i, v in enumerate(runner.optimizer.variables)})
  values.update({name: getattr(state, name).numpy() for name in (
      "global_step", "position", "nonfinite_steps", "last_bad_position")})
  values.update({f"sums/{k}": v for k, v in
                 runner.steps.train_sums.read_and_reset().items()})
  return values


@pytest.mark.parametrize("nonfinite", ["skip", "fail"])
def test_chunk_guard_equals_the_per_update_guard(tmp_path, nonfinite):
  fast = _nan_run(tmp_path, nonfinite, chunk_guard=True)
  guarded = _nan_run(tmp_path, nonfinite, chunk_guard=False)
  # The chunk with the NaN ran unguarded, was undone and replayed.
  assert fast.steps.unguarded_chunk.experimental_get_tracing_count() == 1
  assert fast.steps.guarded_loop.experimental_get_tracing_count() == 1
  assert int(fast.state.nonfinite_steps.numpy()) == 1
  assert int(fast.state.last_bad_position.numpy()) == 96
  a, b = _everything(fast), _everything(guarded)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=0,
                               err_msg=name)
  weights = [v.numpy() for v in fast.model.trainable_variables]
  assert all(np.isfinite(w).all() for w in weights)


def _numpy_reference(name, init, grads, lr=0.05, momentum=0.9, wd=1e-2,
                     b1=0.9, b2=0.999, eps=1e-7):
  """The Keras formulas, in float64 NumPy."""
  out = []
  for w, gs in zip(init, zip(*grads)):
    w = w.astype(np.float64)
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(gs, 1):
      g = g.astype(np.float64)
      if name == "sgd":
        w -= lr * g
      elif name == "momentum":
        m = m * momentum - lr * g
        w += m
      else:
        if name == "adamw":
          w -= w * wd * lr
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        w -= m * (lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)) / (
            np.sqrt(v) + eps)
    out.append(w)
  return out


@pytest.mark.parametrize("name, keras_optimizer", [
    ("sgd", lambda: keras.optimizers.SGD(learning_rate=0.05)),
    ("momentum", lambda: keras.optimizers.SGD(learning_rate=0.05,
                                              momentum=0.9)),
    ("adam", lambda: keras.optimizers.Adam(learning_rate=0.05)),
    ("adamw", lambda: keras.optimizers.AdamW(learning_rate=0.05,
                                             weight_decay=1e-2)),
])
def test_fused_optimizer_equals_the_formula_and_keras(name, keras_optimizer):
  """Five updates of two variables with random gradients through the
  framework's optimizer (one fused TF kernel per variable), against the
  formulas in float64 NumPy and against Keras' own update_step."""
  config = Config(optimizer=name, learning_rate=0.05, momentum=0.9,
                  weight_decay=1e-2)
  rng = np.random.default_rng(3)
  init = [rng.normal(size=(7, 5)).astype(np.float32),
          rng.normal(size=(5,)).astype(np.float32)]
  grads = [[rng.normal(size=w.shape).astype(np.float32) for w in init]
           for _ in range(5)]

  def train(make):
    variables = [keras.Variable(w) for w in init]
    opt = make(variables)

    @tf.function
    def step(g):
      opt.apply(g, variables)
    for g in grads:
      step([tf.constant(x) for x in g])
    graph = step.get_concrete_function(
        [tf.constant(x) for x in grads[0]]).graph
    ops = {op.type for op in graph.get_operations()}
    for f in graph.as_graph_def().library.function:
      ops.update(n.op for n in f.node_def)
    return [v.numpy() for v in variables], ops

  kernel = {"sgd": "ResourceApplyGradientDescent",
            "momentum": "ResourceApplyKerasMomentum"}.get(name,
                                                          "ResourceApplyAdam")
  step_var = tf.Variable(0, dtype=tf.int64)
  fused, ops = train(lambda vs: optim.build(config, step_var, vs))
  assert kernel in ops
  unfused, ops = train(lambda vs: _built(keras_optimizer(), vs))
  assert kernel not in ops
  # float32 rounding over 5 steps of lr 0.05: Keras' element-wise Adam
  # lands ~2e-6 from the float64 values, the fused kernel ~4e-7.
  for got, keras_got, want in zip(fused, unfused,
                                  _numpy_reference(name, init, grads)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, keras_got, rtol=0, atol=5e-6)
  # The run moved the weights: the comparison is not between two no-ops.
  assert np.abs(fused[0] - init[0]).max() > 0.05


def _built(opt, variables):
  opt.build(variables)
  return opt
