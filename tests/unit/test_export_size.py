"""A SavedModel stores each variable once: its size is about the weights'
bytes (Keras' ExportArchive.track stored each twice), and it serves what
trainer.load's model computes."""

import os

import numpy as np
import tensorflow as tf

import trainer
from export_runs import digits_run

MB = 1 << 20


def _bytes(root) -> int:
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(root) for f in files)


def _check_size(out, model):
  weights = sum(v.numpy().nbytes for v in model.weights)
  total, stored = _bytes(out), _bytes(out / "variables")
  assert total <= 1.05 * weights + 5 * MB, (total, weights)
  # The variables alone: the graph aside, a few bytes of index per weight.
  assert stored <= 1.05 * weights + 16 * 1024, (stored, weights)
  return weights, total


def test_cnn_export_stores_each_weight_once(tmp_path):
  from trainer import export
  run = digits_run("cnn")
  out = tmp_path / "served"
  export.export(str(run), str(out))
  _, model = trainer.load(str(run))
  _check_size(out, model)
  images = np.random.default_rng(0).random((5, 8, 8, 1), np.float32)
  served = tf.saved_model.load(str(out))
  got = served.signatures["serving_default"](images=tf.constant(images))
  np.testing.assert_allclose(got["probabilities"].numpy(),
                             tf.nn.softmax(model(images)).numpy(), atol=1e-6)
  # Loaded, the archive still lists its weights (each once).
  assert sorted(v.shape.num_elements() for v in served.variables) == sorted(
      v.numpy().size for v in model.weights)


def test_million_row_table_export_stores_it_once(tmp_path):
  from trainer import export
  from trainer.config import Config
  run = tmp_path / "run"
  trainer.train(Config(task="export_tasks:Recommender", optimizer="sgd",
                       global_batch_size=64, train_steps=1, steps_per_loop=1,
                       summary_every=1, eval_every=0, mode="train",
                       model_dir=str(run), progress="log"))
  out = tmp_path / "served"
  export.export(str(run), str(out))
  _, model = trainer.load(str(run))
  weights, total = _check_size(out, model)
  assert weights >= 1_000_000 * 16 * 4
  ids = np.array([[0, 1], [999_999, 5], [123, 123]], np.int32)
  served = tf.saved_model.load(str(out)).signatures["serving_default"]
  np.testing.assert_allclose(served(features=tf.constant(ids))["score"].numpy(),
                             model(ids).numpy(), rtol=1e-6, atol=1e-7)
