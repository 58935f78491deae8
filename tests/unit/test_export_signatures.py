"""Named signatures: Task.serving_signatures gives several, trainer.export
writes all or those --signatures names, a client with nothing but
TensorFlow calls each; export.json describes the run as it was trained."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import trainer
from conftest import env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from trainer.config import Config
  model_dir = tmp_path_factory.mktemp("signatures") / "run"
  trainer.train(Config(task="export_tasks:Recommender", task_args="rows=1000",
                       optimizer="sgd", learning_rate=0.5, ema_decay=0.5,
                       global_batch_size=64, train_steps=2, steps_per_loop=2,
                       summary_every=2, eval_every=0, mode="train",
                       model_dir=str(model_dir), progress="log"))
  return model_dir


_CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    served = tf.saved_model.load(sys.argv[1])
    pair = served.signatures["serving_default"](
        features=tf.constant([[0, 1], [999, 5], [7, 7]], tf.int32))
    top = served.signatures["top_items"](user=tf.constant([3, 999], tf.int32))
    print(json.dumps({"names": sorted(served.signatures),
                      "score": pair["score"].numpy().tolist(),
                      "items": top["items"].numpy().tolist(),
                      "scores": top["scores"].numpy().tolist()}))
""")


def test_both_signatures_served_to_a_tensorflow_only_client(run, tmp_path):
  from trainer import export
  out = tmp_path / "served"
  info = export.export(str(run), str(out))
  assert sorted(info["signatures"]) == ["serving_default", "top_items"]
  # Nothing of this project on the client's path: plain TensorFlow.
  client_env = {k: v for k, v in env().items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", _CLIENT, str(out)],
                        cwd=tmp_path, env=client_env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["names"] == ["serving_default", "top_items"]
  task, model = trainer.load(str(run))
  pairs = np.array([[0, 1], [999, 5], [7, 7]], np.int32)
  np.testing.assert_allclose(got["score"], model(pairs).numpy(), rtol=1e-5,
                             atol=1e-6)
  # top_items against NumPy on the loaded table.
  table = model.get_layer("table").embeddings.numpy()
  scores = table[[3, 999]] @ table.T
  best = np.argsort(-scores, axis=1)[:, :task.K]
  assert got["items"] == best.tolist()
  np.testing.assert_allclose(got["scores"],
                             np.take_along_axis(scores, best, 1), rtol=1e-5)

  # export.json: the run as trained, not the flags' defaults.
  written = json.loads((out / "assets.extra" / "export.json").read_text())
  assert written == json.loads(json.dumps(info))
  assert {k: written[k] for k in ("task", "task_args", "step", "weights",
                                  "ema_decay", "checkpoint")} == {
      "task": "export_tasks:Recommender", "task_args": "rows=1000",
      "step": 2, "weights": "ema", "ema_decay": 0.5,
      "checkpoint": str(run / "ckpt-2")}
  assert "model" not in written and "dataset" not in written
  assert written["signatures"] == {
      "serving_default": {
          "inputs": {"features": {"dtype": "int32", "shape": [None, 2]}},
          "outputs": {"score": {"dtype": "float32", "shape": [None, 1]}}},
      "top_items": {
          "inputs": {"user": {"dtype": "int32", "shape": [None]}},
          "outputs": {"items": {"dtype": "int32", "shape": [None, 3]},
                      "scores": {"dtype": "float32", "shape": [None, 3]}}}}


def test_signatures_flag_selects(run, tmp_path):
  from trainer import export
  only = export.export(str(run), str(tmp_path / "default"),
                       signatures=["serving_default"])
  assert list(only["signatures"]) == ["serving_default"]
  assert list(tf.saved_model.load(str(tmp_path / "default")).signatures) == [
      "serving_default"]
  top = export.export(str(run), str(tmp_path / "top"),
                      signatures=["top_items"])
  # serving_default always answers (TF Serving's default): here top_items.
  assert top["signatures"]["serving_default"]["same_as"] == "top_items"
  served = tf.saved_model.load(str(tmp_path / "top")).signatures
  assert sorted(served) == ["serving_default", "top_items"]
  np.testing.assert_array_equal(
      served["serving_default"](user=tf.constant([3]))["items"].numpy(),
      served["top_items"](user=tf.constant([3]))["items"].numpy())


def test_unknown_signature_is_refused_before_writing(run, tmp_path):
  """A UserError: the CLI prints it as its one line and exits 2 (as
  test_export_safety sees for its refusals)."""
  from trainer import export
  from trainer.errors import UserError
  with pytest.raises(UserError) as raised:
    export.export(str(run), str(tmp_path / "x"),
                  signatures=["top_items", "nope"])
  assert str(raised.value) == ("--signatures: the task has no signature "
                               "'nope'; it has serving_default, top_items.")
  assert not list(tmp_path.iterdir())
