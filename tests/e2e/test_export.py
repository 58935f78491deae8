"""`python -m trainer.export`: the SavedModel and the TFLite model predict
what the training checkpoint's model predicts."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, env, run_trainer

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  model_dir, out = root / "run", root / "served"
  run_trainer("--model=cnn", "--train_steps=30", "--global_batch_size=32",
              "--input_wait_steps=0",
              "--steps_per_loop=10", "--summary_every=10", "--eval_every=0",
              "--checkpoint_every=10", f"--model_dir={model_dir}")
  proc = subprocess.run(
      [sys.executable, "-m", "trainer.export", f"--model_dir={model_dir}",
       f"--export_dir={out}", "--tflite"], cwd=REPO, env=env(),
      capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  return model_dir, out, info


def _reference(model_dir, checkpoint):
  """Inputs (eval images as the model sees them) and the probabilities of
  the training code's own model restored from `checkpoint`."""
  import tensorflow as tf
  from trainer import controller
  from trainer.config import Config
  from trainer.data import pipeline
  config = Config(**json.loads((model_dir / "config.json").read_text()))
  runner = controller.create(config)
  assert runner.checkpointer.restore(config, str(checkpoint))
  ds, _, _ = pipeline.eval_dataset(runner.task, config.eval_split, 16)
  images = next(iter(ds))[0].numpy()
  logits = runner.model(images, training=False)
  return images, tf.nn.softmax(logits).numpy()


def test_savedmodel_and_tflite_match_the_checkpoint(exported, tmp_path):
  import tensorflow as tf
  model_dir, out, info = exported
  assert info["checkpoint"] == str(model_dir / "ckpt-30") and info["step"] == 30
  # The run as trained: the built-in task, its model and data, raw weights.
  assert {k: info[k] for k in ("task", "model", "dataset", "image_size",
                               "weights", "ema_decay")} == {
      "task": "classification", "model": "cnn", "dataset": "digits",
      "image_size": "", "weights": "raw", "ema_decay": 0.0}
  assert json.loads((out / "assets.extra" / "export.json").read_text()) \
      == info
  assert info["inputs"] == {"images": {"dtype": "float32",
                                       "shape": [None, 8, 8, 1]}}
  assert info["outputs"] == {"probabilities": {"dtype": "float32",
                                               "shape": [None, 10]}}
  images, expected = _reference(model_dir, model_dir / "ckpt-30")
  assert images.dtype == np.float32 and 0 <= images.min() and \
      images.max() <= 1 and images.max() > 0.9
  np.testing.assert_allclose(expected.sum(-1), 1.0, atol=1e-5)

  served = tf.saved_model.load(str(out))
  signature = served.signatures["serving_default"]
  got = signature(images=tf.constant(images))["probabilities"].numpy()
  np.testing.assert_allclose(got, expected, atol=1e-5)

  # The same through saved_model_cli, the tool TF Serving users reach for.
  np.save(tmp_path / "x.npy", images)
  cli = subprocess.run(
      [str(Path(sys.executable).parent / "saved_model_cli"), "run",
       "--dir", str(out), "--tag_set", "serve",
       "--signature_def", "serving_default",
       "--inputs", f"images={tmp_path / 'x.npy'}",
       "--outdir", str(tmp_path / "cli")], env=env(), capture_output=True,
      text=True, timeout=120)
  assert cli.returncode == 0, cli.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "cli" / "probabilities.npy"),
                             expected, atol=1e-5)

  # ai-edge-litert: tf.lite.Interpreter is deprecated since TF 2.19.
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(model_path=str(out / "model.tflite"))
  runner = interpreter.get_signature_runner("serving_default")
  lite = runner(images=images)["probabilities"]
  np.testing.assert_allclose(lite, expected, atol=1e-5)


def test_export_of_another_checkpoint_and_errors(exported, tmp_path):
  import tensorflow as tf
  from trainer import export
  from trainer.errors import UserError
  model_dir, _, _ = exported
  out = tmp_path / "older"
  info = export.export(str(model_dir), str(out),
                       checkpoint=str(model_dir / "ckpt-10"))
  assert info["step"] == 10 and not (out / "model.tflite").exists()
  images, expected = _reference(model_dir, model_dir / "ckpt-10")
  served = tf.saved_model.load(str(out)).signatures["serving_default"]
  np.testing.assert_allclose(
      served(images=tf.constant(images))["probabilities"].numpy(), expected,
      atol=1e-5)
  with pytest.raises(UserError, match="no such checkpoint"):
    export.export(str(model_dir), str(tmp_path / "x"),
                  checkpoint=str(model_dir / "ckpt-99"))
  with pytest.raises(UserError, match="has no config.json"):
    export.export(str(tmp_path / "nothing"), str(tmp_path / "y"))
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
