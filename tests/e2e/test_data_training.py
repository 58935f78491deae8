"""Training on real files: MNIST accuracy, TFRecord == IDX batches."""

import subprocess
import sys

import pytest

from conftest import (REPO, assert_weights_close, checkpoint_weights, env,
                      last_json, run_trainer)

pytestmark = pytest.mark.timeout(900)


def test_cnn_on_real_mnist_reaches_97_percent(tmp_path, mnist_dir):
  proc = run_trainer("--dataset=mnist", f"--data_dir={mnist_dir}",
                     "--train_split=test[:8000]", "--eval_split=test[8000:]",
                     "--model=cnn", "--global_batch_size=64",
                     "--train_steps=2000", "--eval_every=0",
                     "--checkpoint_every=2000", f"--model_dir={tmp_path / 'r'}")
  result = last_json(proc)
  assert result["eval_examples"] == 2000
  assert result["eval_accuracy"] >= 0.97, result


def test_tfrecord_training_equals_idx_training(tmp_path, mnist_dir):
  out = tmp_path / "tfr"
  convert = subprocess.run(
      [sys.executable, "-m", "trainer.convert", "--dataset=mnist",
       f"--data_dir={mnist_dir}", "--split=train=test[:8000],test=test[8000:]",
       f"--out={out}", "--shards=3"],
      cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
  assert convert.returncode == 0, convert.stderr[-3000:]
  common = ["--model=cnn", "--optimizer=sgd", "--learning_rate=0.05",
            "--global_batch_size=32", "--train_steps=30", "--eval_every=0",
            "--mode=train", "--checkpoint_every=30", "--seed=9"]
  run_trainer(*common, "--dataset=mnist", f"--data_dir={mnist_dir}",
              "--train_split=test[:8000]", f"--model_dir={tmp_path / 'idx'}")
  run_trainer(*common, "--dataset=tfrecord", f"--data_dir={out}",
              "--train_split=train", f"--model_dir={tmp_path / 'rec'}")
  assert_weights_close(checkpoint_weights(tmp_path / "rec" / "ckpt-30"),
                       checkpoint_weights(tmp_path / "idx" / "ckpt-30"),
                       rtol=1e-6, atol=1e-7)
