"""The examples run with one command each and learn their tasks."""

import ast
import subprocess
import sys

import pytest

from conftest import (REPO, assert_weights_close, checkpoint_weights, env,
                      last_json, run_trainer)

pytestmark = pytest.mark.timeout(600)


def test_spirals_custom_pipeline_learns(tmp_path):
  proc = run_trainer("--task=examples.spirals:Spirals", "--train_steps=600",
                     "--learning_rate=0.003", "--eval_every=0",
                     f"--model_dir={tmp_path / 'run'}")
  assert last_json(proc)["eval_accuracy"] >= 0.9


def test_custom_pipeline_resumes_exactly(tmp_path):
  """A task's own tf.data pipeline honours start_position: 40 + 40 steps
  equal 80 straight steps."""
  common = ["--task=examples.spirals:Spirals", "--eval_every=0",
            "--mode=train", "--checkpoint_every=40", "--steps_per_loop=20"]
  run_trainer(*common, "--train_steps=80", f"--model_dir={tmp_path / 'a'}")
  run_trainer(*common, "--train_steps=40", f"--model_dir={tmp_path / 'b'}")
  run_trainer(*common, "--train_steps=80", f"--model_dir={tmp_path / 'b'}")
  assert_weights_close(checkpoint_weights(tmp_path / "b" / "ckpt-80"),
                       checkpoint_weights(tmp_path / "a" / "ckpt-80"),
                       rtol=1e-6)


def test_text_classifier_example_script(tmp_path):
  """`python examples/text_classifier.py`: the Python API path."""
  proc = subprocess.run(
      [sys.executable, "examples/text_classifier.py",
       f"--model_dir={tmp_path / 'run'}"],
      cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
  assert result["global_step"] == 800
  assert result["eval_accuracy"] >= 0.9
