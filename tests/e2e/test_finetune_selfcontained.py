"""A run whose task loads another run at build time (examples/frozen.py, as
the SimCLR linear probe does) stands alone after its first start: with the
base run deleted, --mode=eval, trainer.load and trainer.export of it work
from another directory and give the metrics the run had before.

References: the fine-tuned run's own final evaluation (before the deletion),
an accuracy counted with NumPy from trainer.load's model, and that model's
outputs against the SavedModel's.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import env, last_json

pytestmark = pytest.mark.timeout(240)

SMALL = dict(dataset="digits", global_batch_size=32, steps_per_loop=10,
             eval_every=0, summary_every=10, train_steps=10)


def _run(module, *args, cwd):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                        env=env(), capture_output=True, text=True,
                        timeout=180)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return last_json(proc)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """runs/ft (a linear probe on the frozen runs/base), both trained in this
  process from one directory with relative paths; then runs/base is
  deleted."""
  from trainer import controller
  from trainer.config import Config
  first = tmp_path_factory.mktemp("first_cwd")
  before = os.getcwd()
  os.chdir(first)
  try:
    controller.run(Config(model="mlp", model_dir="runs/base", **SMALL))
    trained = controller.run(Config(
        task="examples.simclr:LinearProbe", task_args="encoder_dir=runs/base",
        model_dir="runs/ft", **SMALL))
  finally:
    os.chdir(before)
  shutil.rmtree(first / "runs" / "base")
  return first / "runs" / "ft", trained, tmp_path_factory.mktemp("elsewhere")


def test_the_base_run_is_recorded_in_the_run(finetuned):
  model_dir, _, _ = finetuned
  records = list((model_dir / "bases").glob("*/config.json"))
  assert [p.parent.name.split("-")[0] for p in records] == ["runs_base"]
  assert '"model": "mlp"' in records[0].read_text()


def test_eval_load_and_export_without_the_base_run(finetuned, monkeypatch):
  model_dir, trained, elsewhere = finetuned
  evaluated = _ok(_run("trainer.main", "--mode=eval",
                       f"--model_dir={model_dir}", cwd=elsewhere))
  assert evaluated["global_step"] == 10
  assert evaluated["eval_loss"] == pytest.approx(trained["eval_loss"],
                                                 rel=1e-6)
  assert evaluated["eval_accuracy"] == pytest.approx(
      trained["eval_accuracy"], rel=1e-6)

  import tensorflow as tf
  import trainer
  from trainer.data import pipeline
  monkeypatch.chdir(elsewhere)
  task, model = trainer.load(str(model_dir))
  ds, _, _ = pipeline.eval_dataset(task, task.config.eval_split, 4096)
  correct = total = 0
  first_batch = None
  for images, labels, meta in ds:
    images, labels = images.numpy(), labels.numpy()
    weights = meta["weight"].numpy()   # 0 for the last batch's padding
    first_batch = images if first_batch is None else first_batch
    predicted = np.argmax(model(images, training=False).numpy(), axis=-1)
    correct += float(np.sum((predicted == labels) * weights))
    total += float(np.sum(weights))
  assert correct / total == pytest.approx(trained["eval_accuracy"],
                                          abs=1e-6)

  from trainer import export
  export_dir = elsewhere / "export"
  export.export(str(model_dir), str(export_dir))
  served = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
  name = list(served.structured_input_signature[1])[0]
  outputs = served(**{name: tf.constant(first_batch[:8])})
  logits = model(first_batch[:8], training=False).numpy()
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(outputs["probabilities"].numpy(), probabilities,
                             rtol=1e-5, atol=1e-6)


def test_without_base_or_record_the_error_says_why(finetuned, tmp_path,
                                                   monkeypatch):
  import trainer
  from trainer.errors import UserError
  model_dir, _, elsewhere = finetuned
  bare = tmp_path / "ft_without_record"
  shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("bases"))
  monkeypatch.chdir(elsewhere)
  with pytest.raises(UserError) as raised:
    trainer.load(str(bare))
  line = str(raised.value)
  assert "\n" not in line
  assert line.startswith("--task_args=encoder_dir=runs/base: the task of "
                         f"the run in {bare} loads runs/base when it builds")
  assert f"neither recorded in {bare}/bases/runs_base-" in line
  assert f"relative to {model_dir.parent.parent} where that run trained" in line


def test_training_resumes_without_the_base_run(finetuned, tmp_path,
                                               monkeypatch):
  from trainer import controller
  from trainer.config import Config
  model_dir, _, elsewhere = finetuned
  copy = tmp_path / "ft"
  shutil.copytree(model_dir, copy)
  monkeypatch.chdir(elsewhere)
  resumed = controller.run(Config(
      task="examples.simclr:LinearProbe", task_args="encoder_dir=runs/base",
      model_dir=str(copy), **{**SMALL, "train_steps": 20}))
  assert resumed["global_step"] == 20
