"""In-process checks of what an evaluator and a user's mistakes meet: the
wait for config.json, an evaluator that evaluated nothing, a checkpoint
message that names the directory it means, the hint for a float32 value in
mixed-precision compute."""

import types

import pytest

from trainer.errors import UserError


def test_wait_for_config_logs_once_and_is_bounded(tmp_path, monkeypatch):
  from trainer import rundir
  # The log lines themselves (absl's handler setup varies across a suite run
  # in one process, so caplog may not see them).
  lines = []
  monkeypatch.setattr(rundir.logging, "info",
                      lambda fmt, *args: lines.append(fmt % args))
  now = [0.0]

  def sleep(seconds):
    now[0] += seconds
    if now[0] >= 3.0:   # the trainer starts after 3 s
      (tmp_path / "config.json").write_text("{}")

  rundir.wait_for_config(str(tmp_path), 10.0, poll_s=0.5,
                         clock=lambda: now[0], sleep=sleep)
  assert now[0] == 3.0
  assert len([l for l in lines if "waiting up to 10 s" in l]) == 1
  # Present: no wait, no line.
  lines.clear()
  rundir.wait_for_config(str(tmp_path), 10.0, clock=lambda: 1 / 0,
                         sleep=lambda s: 1 / 0)
  assert not lines
  # Never written: a UserError once the time is up, not a fallback.
  now[0] = 0.0
  with pytest.raises(UserError, match=r"no .*config\.json appeared within "
                     r"--eval_timeout_s=2; start the training run"):
    rundir.wait_for_config(str(tmp_path / "none"), 2.0, poll_s=0.5,
                           clock=lambda: now[0],
                           sleep=lambda s: now.__setitem__(0, now[0] + s))
  assert now[0] == 2.0


def test_continuous_eval_that_evaluated_nothing_raises(tmp_path):
  from trainer import controller
  evaluator = controller.Controller.__new__(controller.Controller)
  evaluator.settings = types.SimpleNamespace(
      train_steps=30, eval_timeout_s=0.05, model_dir=str(tmp_path))
  evaluator.checkpointer = types.SimpleNamespace(paths=lambda: [])
  with pytest.raises(UserError, match=r"--mode=continuous_eval evaluated no "
                     r"checkpoint: none appeared in --model_dir="):
    evaluator.continuous_eval(poll_s=0.01)
  # Every checkpoint refused: said so, still an error.
  evaluator.checkpointer = types.SimpleNamespace(
      paths=lambda: [str(tmp_path / "ckpt-10")])

  def refuse(path):
    raise UserError("written with --model='mlp', not 'cnn'")
  evaluator.evaluate_checkpoint = refuse
  with pytest.raises(UserError, match="evaluated no checkpoint: 1 skipped"):
    evaluator.continuous_eval(poll_s=0.01)


def test_checkpoint_mismatch_names_the_directory_it_means(tmp_path):
  from trainer import checkpoint
  run = tmp_path / "run"
  record = types.SimpleNamespace(
      model_dir=str(run), to_json=lambda: '{"task": "", "model": "cnn", '
      '"optimizer": "adam", "dataset": "digits"}')
  saved = {"model": "mlp"}
  with pytest.raises(UserError) as own:
    checkpoint.check_compatible(saved, record, str(run / "ckpt-5"))
  assert str(own.value).startswith(
      f"--model_dir={run} holds a checkpoint ({run / 'ckpt-5'}) that was "
      "written with --model='mlp', not 'cnn'; use a new --model_dir or "
      "--model=mlp.")
  other = tmp_path / "other" / "ckpt-5"
  with pytest.raises(UserError) as given:
    checkpoint.check_compatible(saved, record, str(other))
  assert str(given.value).startswith(
      f"--checkpoint={other} (in {other.parent}) was written with "
      "--model='mlp'")
  assert "--model_dir" not in str(given.value)


def test_float32_in_mixed_compute_gets_a_hint():
  """The TypeError this TF/Keras raises when a layer multiplies its float16
  input by a float32 constant, mapped by the CLI to exit 2 and one line;
  the same error under float32 stays a bug (traceback)."""
  import keras
  import tensorflow as tf
  from trainer import cli

  class Scale(keras.layers.Layer):
    def call(self, x):
      return x * tf.constant([2.0])

  previous = keras.config.dtype_policy()
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model = keras.Sequential([keras.layers.Dense(2), Scale()])
    with pytest.raises(TypeError) as raised:
      tf.function(model)(tf.zeros((1, 3), "float16"))
    code, message, hard = cli.exit_code(raised.value)
  finally:
    keras.mixed_precision.set_global_policy(previous)
  assert (code, hard) == (2, False)
  assert message.startswith("layer Scale mixes float32 into float16 compute "
                            "under --mixed_precision=mixed_float16 (Input ")
  assert "tf.cast(value, x.dtype)" in message and "\n" not in message
  # Outside a mixed policy the same error is not ours to explain: a bug,
  # whose traceback is the report.
  assert keras.config.dtype_policy().name == "float32"
  assert cli.exit_code(raised.value) is None
