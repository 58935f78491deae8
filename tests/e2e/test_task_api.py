"""The Task API: plug-in tasks, beyond classification, the gradient hook."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import (REPO, assert_weights_close, checkpoint_weights, env,
                      last_json, run_trainer)
import plugin_tasks

pytestmark = pytest.mark.timeout(600)
TESTS = str(REPO / "tests")
TASK_ENV = {"PYTHONPATH": TESTS}
SGD = ["--optimizer=sgd", "--learning_rate=0.05", "--global_batch_size=32",
       "--train_steps=30", "--steps_per_loop=10", "--summary_every=10",
       "--checkpoint_every=30", "--eval_every=0", "--mode=train", "--seed=11"]


def test_plugin_task_same_weights_on_every_topology(tmp_path):
  task = "--task=plugin_tasks:TinyDigits"
  run_trainer(task, *SGD, f"--model_dir={tmp_path / 'one'}",
              extra_env=TASK_ENV)
  run_trainer(task, *SGD, f"--model_dir={tmp_path / 'mirrored'}",
              "--strategy=mirrored", "--cpu_replicas=2", extra_env=TASK_ENV)
  launcher = subprocess.run(
      [sys.executable, "-m", "launch.local", "--workers=2", "--",
       "--strategy=multiworker", task, *SGD,
       f"--model_dir={tmp_path / 'workers'}"],
      cwd=REPO, env=env(**TASK_ENV), capture_output=True, text=True,
      timeout=300)
  assert launcher.returncode == 0, launcher.stdout[-4000:]
  one = checkpoint_weights(tmp_path / "one" / "ckpt-30")
  assert_weights_close(checkpoint_weights(tmp_path / "mirrored" / "ckpt-30"),
                       one, rtol=1e-5)
  assert_weights_close(checkpoint_weights(tmp_path / "workers" / "ckpt-30"),
                       one, rtol=1e-5)


def _kernel_and_bias(weights, kernel_shape):
  # Model weights only, not the optimizer's slots of the same shape.
  weights = {k: w for k, w in weights.items()
             if "_trainable_variables" in k or k.startswith("model/")}
  kernel = [w for w in weights.values() if w.shape == kernel_shape]
  bias = [w for w in weights.values() if w.shape == (kernel_shape[1],)
          and w.dtype == np.float32]
  assert len(kernel) == 1, [w.shape for w in weights.values()]
  return kernel[0], bias


def test_regression_recovers_the_linear_target(tmp_path):
  proc = run_trainer("--task=plugin_tasks:LinearRegression", "--optimizer=sgd",
                     "--learning_rate=0.1", "--train_steps=300",
                     "--global_batch_size=64", "--eval_every=0",
                     f"--model_dir={tmp_path / 'run'}", extra_env=TASK_ENV)
  result = last_json(proc)
  assert result["eval_mae"] < 1e-2 and result["eval_loss"] < 1e-4
  kernel, biases = _kernel_and_bias(
      checkpoint_weights(tmp_path / "run" / "ckpt-300"), (4, 1))
  np.testing.assert_allclose(kernel, plugin_tasks.TRUE_W, atol=1e-2)
  assert any(abs(float(b[0]) - plugin_tasks.TRUE_B) < 1e-2 for b in biases)


def test_multi_output_weighted_losses_converge(tmp_path):
  # Cosine decay to 0 lets Adam settle instead of jittering at its step size.
  proc = run_trainer("--task=plugin_tasks:TwoHeads", "--optimizer=adam",
                     "--learning_rate=0.05", "--lr_schedule=cosine",
                     "--train_steps=1000",
                     "--global_batch_size=64", "--eval_every=0",
                     f"--model_dir={tmp_path / 'run'}", extra_env=TASK_ENV)
  result = last_json(proc)
  assert result["eval_value_mae"] < 2e-2, result
  assert result["eval_sign_accuracy"] > 0.95, result
  kernel, _ = _kernel_and_bias(
      checkpoint_weights(tmp_path / "run" / "ckpt-1000"), (4, 1))
  np.testing.assert_allclose(kernel, plugin_tasks.TRUE_W, atol=1e-2)


def _one_step_reference(model_dir_name, tmp_path, task_cls, clip_flag=0.0):
  """Runs ONE update in-process; returns (w0, b0, w1, b1, x, y)."""
  import tensorflow as tf
  from trainer import controller
  from trainer.config import Config
  from trainer.data import pipeline
  config = Config(task="plugin_tasks:" + task_cls.__name__, optimizer="sgd",
                  learning_rate=0.5, global_batch_size=16, train_steps=1,
                  steps_per_loop=1, summary_every=1, checkpoint_every=1,
                  eval_every=0, mode="train", clip_norm=clip_flag, seed=2,
                  model_dir=str(tmp_path / model_dir_name))
  runner = controller.create(config, task_cls(config))
  w0, b0 = (v.numpy() for v in runner.model.trainable_variables)
  runner.train(evaluate=False)
  w1, b1 = (v.numpy() for v in runner.model.trainable_variables)
  source = runner.task.source("train")
  idx = pipeline.example_indices(tf.range(16, dtype=tf.int64),
                                 source.num_examples, config.seed)
  x, y = (t.numpy() for t in source.gather(idx))
  return w0, b0, w1, b1, x, y


def test_gradient_clipping_hook_matches_hand_computed_step(tmp_path):
  w0, b0, w1, b1, x, y = _one_step_reference("hook", tmp_path,
                                             plugin_tasks.ClippedLinear)
  residual = x @ w0 + b0 - y                     # [16, 1]
  grad_w = 2.0 * x.T @ residual / 16.0
  grad_b = 2.0 * residual.sum(axis=0) / 16.0
  norm = np.sqrt((grad_w ** 2).sum() + (grad_b ** 2).sum())
  assert norm > 10 * plugin_tasks.ClippedLinear.CLIP   # clipping is active
  scale = plugin_tasks.ClippedLinear.CLIP / norm
  np.testing.assert_allclose(w1, w0 - 0.5 * scale * grad_w, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(b1, b0 - 0.5 * scale * grad_b, rtol=1e-5,
                             atol=1e-6)
  # --clip_norm does the same through the framework's own flag.
  _, _, w1_flag, b1_flag, _, _ = _one_step_reference(
      "flag", tmp_path, plugin_tasks.LinearRegression,
      clip_flag=plugin_tasks.ClippedLinear.CLIP)
  np.testing.assert_allclose(w1_flag, w1, rtol=1e-6)
  np.testing.assert_allclose(b1_flag, b1, rtol=1e-6)


@pytest.mark.parametrize("path, message", [
    ("plugin_tasks:NoSuchTask", "has no attribute 'NoSuchTask'"),
    ("no_such_module_abc:Task", "cannot import 'no_such_module_abc'"),
    ("plugin_tasks:TRUE_B", "not a Task class"),
    ("plugin_tasks", "must be 'package.module:Name'"),
])
def test_bad_plugin_path_is_one_line_exit_2(tmp_path, path, message):
  proc = run_trainer(f"--task={path}", f"--model_dir={tmp_path / 'run'}",
                     check=False, extra_env=TASK_ENV, timeout=120)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
