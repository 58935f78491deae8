"""`python -m trainer.plot`: curves of one or several runs as a PNG."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, env

pytestmark = pytest.mark.timeout(120)


def _fake_run(model_dir, scale: float, resumed: bool = False):
  """Event files shaped like a training run's (scalars as TF2 tensors)."""
  import tensorflow as tf
  for kind, every in (("train", 10), ("eval", 50)):
    writer = tf.summary.create_file_writer(str(model_dir / kind))
    with writer.as_default():
      for step in range(every, 201, every):
        tf.summary.scalar("loss", scale * 2.0 / (1 + step / 20), step=step)
        tf.summary.scalar("accuracy", 1 - 0.9 / (1 + step / 30), step=step)
      if resumed and kind == "train":   # a restart writes steps again
        tf.summary.scalar("loss", 123.0, step=10)
    writer.close()
  return model_dir


def _png_shape(path):
  import tensorflow as tf
  return tuple(tf.io.decode_png(tf.io.read_file(str(path))).shape)


def test_one_run(tmp_path):
  from trainer import plot
  run = _fake_run(tmp_path / "a", 1.0, resumed=True)
  curves = plot.read_scalars(str(run / "train"))
  steps, values = curves["loss"]
  assert steps == list(range(10, 201, 10))
  assert values[0] == 123.0          # the newest value of a repeated step
  out = plot.plot([str(run)], str(tmp_path / "one.png"))
  assert _png_shape(out)[:2] == (450, 1200)


def test_two_runs_from_the_command_line(tmp_path):
  _fake_run(tmp_path / "a", 1.0)
  _fake_run(tmp_path / "b", 0.5)
  out = tmp_path / "sub" / "curves.png"
  proc = subprocess.run(
      [sys.executable, "-m", "trainer.plot", f"--model_dir={tmp_path / 'a'}",
       f"--model_dir={tmp_path / 'b'}", f"--out={out}", "--width=800",
       "--height=300"], cwd=REPO, env=env(), capture_output=True, text=True,
      timeout=90)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == str(out)
  assert _png_shape(out)[:2] == (300, 800)
  import tensorflow as tf
  pixels = tf.io.decode_png(tf.io.read_file(str(out))).numpy()
  assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 8


def test_clear_errors(tmp_path):
  def plot(*args, code=""):
    return subprocess.run(
        [sys.executable, "-c", code + "from trainer import plot; plot.run()",
         *args], cwd=REPO, env=env(), capture_output=True, text=True,
        timeout=90)
  _fake_run(tmp_path / "a", 1.0)
  no_mpl = plot(f"--model_dir={tmp_path / 'a'}", f"--out={tmp_path / 'x.png'}",
                code="import sys; sys.modules['matplotlib'] = None; ")
  assert no_mpl.returncode == 2
  assert [l for l in no_mpl.stderr.splitlines() if "error" in l] == [
      "trainer.plot: error: matplotlib is not installed: pip install "
      "'tf-trainer[plot]' (or: pip install matplotlib)."]
  empty = plot(f"--model_dir={tmp_path / 'nothing'}")
  assert empty.returncode == 2 and "has no train/ or eval/ event files" in \
      empty.stderr.splitlines()[-1]
  assert not (tmp_path / "x.png").exists()


def test_default_panels_are_the_runs_own_metrics(tmp_path):
  """A regression run (no accuracy) plots with no --metrics: its own
  metrics, loss first; the framework's scalars are left out."""
  import tensorflow as tf
  from trainer import plot
  run = tmp_path / "regression"
  for kind, tags in (("train", ("mae", "loss", "learning_rate",
                                "steps_per_sec", "grad_norm",
                                "goodput/share")),
                     ("eval", ("mae", "loss", "raw/loss"))):
    writer = tf.summary.create_file_writer(str(run / kind))
    with writer.as_default():
      for step in (10, 20):
        for tag in tags:
          tf.summary.scalar(tag, 1.0 / step, step=step)
    writer.close()
  runs = [plot.load_run(str(run))]
  assert plot.run_metrics(runs) == ["loss", "mae"]
  out = plot.plot([str(run)], str(tmp_path / "c.png"))
  assert _png_shape(out)[:2] == (450, 1200)
  # Without eval/: train's tags less the framework's own.
  train_only = {"train": runs[0]["train"], "eval": {}}
  assert plot.run_metrics([train_only]) == ["loss", "mae"]
  # Several runs: the union, loss first.
  other = {"train": {}, "eval": {"loss": ([1], [1.0]), "accuracy": ([1], [0.5])}}
  assert plot.run_metrics([train_only, other]) == ["loss", "accuracy", "mae"]
