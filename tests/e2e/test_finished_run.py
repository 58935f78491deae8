"""Using a finished run from its --model_dir alone: evaluate, load, export.

Each check compares against a value computed another way: the restored
model (trainer.load) against the SavedModel and TFLite model, served
classes against --mode=eval's accuracy, config.json bytes before and after.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, env, last_json, run_trainer

pytestmark = pytest.mark.timeout(300)

TASKS_ENV = {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}


def _run(module, *args, cwd=REPO, extra_env=None, timeout=180):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                        env=env(**(extra_env or {})), capture_output=True,
                        text=True, timeout=timeout)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return last_json(proc)


def _eval_inputs(task, split, n):
  """The first n examples of `split` as the model sees them (preprocessed)."""
  import tensorflow as tf
  from trainer.data import pipeline
  ds, _, _ = pipeline.eval_dataset(task, split, n)
  features, labels = next(iter(ds))[:2]
  return tf.nest.map_structure(lambda t: t.numpy(), features), labels.numpy()


def _served(out, **inputs):
  import tensorflow as tf
  signature = tf.saved_model.load(str(out)).signatures["serving_default"]
  return {k: v.numpy() for k, v in signature(
      **{k: tf.constant(v) for k, v in inputs.items()}).items()}


def _lite(path, **inputs):
  from ai_edge_litert.interpreter import Interpreter
  runner = Interpreter(model_path=str(path)).get_signature_runner(
      "serving_default")
  return runner(**inputs)


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory):
  """A LinearRegression run trained by the CLI, then evaluated with no other
  flag than --mode and --model_dir."""
  model_dir = tmp_path_factory.mktemp("regression") / "run"
  trained = _ok(run_trainer(
      "--task=plugin_tasks:LinearRegression", "--train_steps=30",
      "--steps_per_loop=10", "--eval_every=0", "--learning_rate=0.05",
      "--global_batch_size=32", f"--model_dir={model_dir}",
      extra_env=TASKS_ENV))
  before = (model_dir / "config.json").read_bytes()
  evaluated = _ok(run_trainer("--mode=eval", f"--model_dir={model_dir}",
                              extra_env=TASKS_ENV))
  return model_dir, trained, evaluated, before


def test_eval_takes_the_run_config_and_never_rewrites_it(regression_run):
  model_dir, trained, evaluated, before = regression_run
  assert (model_dir / "config.json").read_bytes() == before
  assert evaluated["global_step"] == 30
  # The same checkpoint and eval split as the training run's final eval.
  assert evaluated["eval_loss"] == pytest.approx(trained["eval_loss"],
                                                 rel=1e-6)
  # A regression task has no accuracy: absent from the JSON line, not null.
  for result in (trained, evaluated):
    assert "eval_accuracy" not in result and "train_accuracy" not in result
    assert None not in result.values()
  history = [json.loads(l) for l in
             (model_dir / "history.jsonl").read_text().splitlines()]
  assert [h["mode"] for h in history] == ["train_and_eval", "eval"]
  assert "--task=plugin_tasks:LinearRegression" in history[1]["command"]
  assert history[1]["argv"][1:] == ["--mode=eval", f"--model_dir={model_dir}"]
  # An evaluation adds no train/ event file to the finished run.
  assert len(list((model_dir / "train").iterdir())) == 1


def test_regression_export_serves_the_restored_model(regression_run,
                                                     tmp_path):
  import trainer
  from trainer import export
  model_dir = regression_run[0]
  out = tmp_path / "served"
  info = export.export(str(model_dir), str(out), tflite=True)
  assert info["inputs"] == {"features": {"dtype": "float32",
                                         "shape": [None, 4]}}
  assert info["outputs"] == {"linear": {"dtype": "float32",
                                        "shape": [None, 1]}}
  task, model = trainer.load(str(model_dir))
  x, y = _eval_inputs(task, "test", 16)
  expected = model(x).numpy()
  # Not a constant (the old softmax over one unit served 1.0 everywhere).
  assert np.ptp(expected) > 1.0
  got = _served(out, features=x)
  assert list(got) == ["linear"]
  np.testing.assert_allclose(got["linear"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_lite(out / "model.tflite", features=x)["linear"],
                             expected, rtol=1e-5, atol=1e-5)
  # load() restored the checkpoint's weights: W, b read from the file.
  weights = trainer.load.weights(model)
  import tensorflow as tf
  reader = tf.train.load_checkpoint(str(model_dir / "ckpt-30"))
  stored = [reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith("optimizer/_trainable_variables/")
            and k.endswith("VARIABLE_VALUE")]
  for value in weights.values():
    assert any(s.shape == value.shape and np.array_equal(s, value)
               for s in stored)


def test_two_input_export(tmp_path):
  import trainer
  from trainer import export
  from trainer.config import Config
  model_dir = tmp_path / "two"
  trainer.train(Config(task="plugin_tasks:TwoInputs", train_steps=20,
                       steps_per_loop=10, eval_every=0, mode="train",
                       model_dir=str(model_dir), progress="log"))
  out = tmp_path / "served"
  info = export.export(str(model_dir), str(out), tflite=True)
  assert info["inputs"] == {"scale": {"dtype": "float32", "shape": [None, 1]},
                            "x": {"dtype": "float32", "shape": [None, 4]}}
  task, model = trainer.load(str(model_dir))
  features, _ = _eval_inputs(task, "test", 8)
  expected = model(features).numpy()
  got = _served(out, **features)
  np.testing.assert_allclose(got["scaled"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_lite(out / "model.tflite", **features)["scaled"],
                             expected, rtol=1e-5, atol=1e-5)


def test_load_and_export_refusals(regression_run, tmp_path):
  from trainer import export
  from trainer.errors import UserError
  model_dir = regression_run[0]
  with pytest.raises(UserError, match="--image_bytes needs a task whose data "
                     "are single uint8 images"):
    export.export(str(model_dir), str(tmp_path / "x"), image_bytes=True)
  with pytest.raises(UserError, match="one model, not a dict"):
    export.export(str(model_dir), str(tmp_path / "y"), model_name="gen")
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
  assert not list(tmp_path.glob("*.tmp-*"))


def _mnist_pngs(task, split):
  """PNG bytes of `split`'s raw uint8 images, and their labels."""
  import tensorflow as tf
  source = task.source(split)
  images, labels = source.gather(tf.range(source.num_examples,
                                          dtype=tf.int64))
  return [tf.io.encode_png(i).numpy() for i in images], labels.numpy()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_mnist_eval_and_image_bytes_export(tmp_path, mnist_dir):
  import trainer
  from trainer import export
  model_dir = tmp_path / "mnist"
  _ok(run_trainer("--dataset=mnist", f"--data_dir={mnist_dir}",
                  "--train_split=test[:2000]", "--eval_split=test[9000:]",
                  "--train_steps=40", "--steps_per_loop=20",
                  "--eval_every=0", "--global_batch_size=32",
                  "--input_wait_steps=0", f"--model_dir={model_dir}"))
  before = (model_dir / "config.json").read_bytes()
  full = _ok(run_trainer("--mode=eval", f"--model_dir={model_dir}"))
  assert full["eval_examples"] == 1000 and full["global_step"] == 40
  split = "test[9000:9200]"
  part = _ok(run_trainer("--mode=eval", f"--model_dir={model_dir}",
                         f"--eval_split={split}"))
  assert part["eval_examples"] == 200
  assert (model_dir / "config.json").read_bytes() == before

  out = tmp_path / "served"
  proc = _run("trainer.export", f"--model_dir={model_dir}",
              f"--export_dir={out}", "--image_bytes")
  info = _ok(proc)
  assert info["inputs"] == {"image_bytes": {"dtype": "string",
                                            "shape": [None]}}
  assert sorted(info["signatures"]) == ["features", "serving_default"]
  assert info["signatures"]["features"]["inputs"] == {
      "images": {"dtype": "float32", "shape": [None, 28, 28, 1]}}
  assert (info["task"], info["model"], info["dataset"], info["image_bytes"]) \
      == ("classification", "cnn", "mnist", True)
  task, model = trainer.load(str(model_dir))
  pngs, labels = _mnist_pngs(task, split)
  served = _served(out, image_bytes=np.array(pngs, dtype=object))
  classes = served["probabilities"].argmax(-1)
  # What --mode=eval counted on the same images, image by image.
  assert np.mean(classes == labels) == pytest.approx(part["eval_accuracy"],
                                                     abs=1e-9)
  images, _ = _eval_inputs(task, split, 200)
  np.testing.assert_array_equal(classes, model(images).numpy().argmax(-1))

  # saved_model_cli (a TF Serving client's view) on two PNG files.
  np.save(tmp_path / "x.npy", np.array(pngs[:2], dtype=object))
  cli = subprocess.run(
      [str(os.path.join(os.path.dirname(sys.executable), "saved_model_cli")),
       "run", "--dir", str(out), "--tag_set", "serve", "--signature_def",
       "serving_default", "--inputs", f"image_bytes={tmp_path / 'x.npy'}",
       "--outdir", str(tmp_path / "cli")], env=env(), capture_output=True,
      text=True, timeout=120)
  assert cli.returncode == 0, cli.stderr[-3000:]
  np.testing.assert_array_equal(
      np.load(tmp_path / "cli" / "probabilities.npy").argmax(-1), classes[:2])


def _image_folder(root, shape=(8, 8, 3)):
  """Class folders of PNGs whose mean brightness tells the class."""
  import tensorflow as tf
  rng = np.random.default_rng(0)
  for split, count in (("train", 24), ("test", 6)):
    for c, name in enumerate(("dark", "mid", "light")):
      for i in range(count):
        image = np.clip(rng.normal(40 + 80 * c, 20, shape), 0, 255)
        path = root / split / name / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tf.io.write_file(str(path), tf.io.encode_png(image.astype(np.uint8)))


@pytest.mark.slow
def test_image_folder_eval_with_a_relative_data_dir(tmp_path):
  """Trained from one directory with a relative --data_dir, evaluated from
  another with no data flag: the run history says where the data were."""
  _image_folder(tmp_path / "pics")
  work = tmp_path / "work"
  work.mkdir()
  model_dir = tmp_path / "run"
  trained = _ok(_run("trainer.main", "--dataset=image_folder",
                     "--data_dir=../pics", "--model=mlp", "--train_steps=10",
                     "--steps_per_loop=10", "--eval_every=0",
                     "--global_batch_size=8", f"--model_dir={model_dir}",
                     cwd=work))
  before = (model_dir / "config.json").read_bytes()
  assert json.loads(before)["data_dir"] == "../pics"
  evaluated = _ok(run_trainer("--mode=eval", f"--model_dir={model_dir}"))
  assert evaluated["eval_examples"] == 18
  assert evaluated["eval_accuracy"] == pytest.approx(
      trained["eval_accuracy"], abs=1e-9)
  assert (model_dir / "config.json").read_bytes() == before
  # A flag on the command line overrides what it names, and only that.
  bad = run_trainer("--mode=eval", f"--model_dir={model_dir}",
                    "--data_dir=/nonexistent", check=False)
  assert bad.returncode == 2 and "/nonexistent" in bad.stderr
  assert (model_dir / "config.json").read_bytes() == before


def test_epochs_give_ceil_of_examples_over_batch(tmp_path):
  """digits' train split has 1500 examples: 2 epochs of 64 are
  ceil(3000 / 64) = 47 updates, one evaluation per epoch (24 updates)."""
  from trainer import plot
  model_dir = tmp_path / "run"
  proc = run_trainer("--epochs=2", "--global_batch_size=64",
                     "--steps_per_loop=10", "--summary_every=10",
                     "--input_wait_steps=0", f"--model_dir={model_dir}")
  assert _ok(proc)["global_step"] == 47
  assert ("data | train (train): 1500 examples | eval (test): 297 examples | "
          "global batch: 64 | steps per epoch: 24 | train_steps: 47") \
      in proc.stderr
  eval_steps, _ = plot.read_scalars(str(model_dir / "eval"))["loss"]
  assert eval_steps == [24, 47]
  config = json.loads((model_dir / "config.json").read_text())
  assert config["epochs"] == 2 and config["train_steps"] == 47
  both = run_trainer("--epochs=2", "--train_steps=10",
                     f"--model_dir={tmp_path / 'x'}", check=False)
  assert both.returncode == 2 and both.stderr.count("\n") == 1
  assert "give one of them" in both.stderr


def test_epochs_steps_are_exact():
  from trainer.epochs import steps_for
  assert steps_for(2, 1500, 64) == 47
  assert steps_for(0.1, 1500, 50) == 3          # 0.1 x 1500 = 150, not 150.0001
  assert steps_for(1, 1536, 64) == 24
  assert steps_for(0.5, 10, 64) == 1


CLIS = {
    "trainer.main": [], "trainer.export": [], "trainer.plot": [],
    "trainer.convert": [], "launch.local": [], "launch.kubernetes": [],
    "launch.slurm": [], "launch.server": [],
}


@pytest.mark.parametrize("module", sorted(CLIS))
def test_unknown_flag_exits_2_with_one_line(module, tmp_path):
  # Unset TF_CPP_MIN_LOG_LEVEL: what a user sees, C++ start-up lines included.
  proc = _run(module, "--no_such_flag=1", cwd=tmp_path,
              extra_env={"TF_CPP_MIN_LOG_LEVEL": "0",
                         "PYTHONPATH": str(REPO)}, timeout=120)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(module) and "no_such_flag" in lines[0]
  assert not list(tmp_path.iterdir())


def test_hparams_written_anew_on_resume(tmp_path):
  """TensorBoard keeps a run dir's FIRST hparams session: a resumed run with
  other flags must replace it."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.plugins.hparams import metadata
  from trainer import summary
  from trainer.config import Config
  model_dir = tmp_path / "run"

  def hparams():
    acc = event_accumulator.EventAccumulator(str(model_dir))
    acc.Reload()
    content = acc.SummaryMetadata(metadata.SESSION_START_INFO_TAG) \
        .plugin_data.content
    info = metadata.parse_session_start_info_plugin_data(content)
    return {k: v.number_value for k, v in info.hparams.items()
            if k == "train_steps"}

  for steps in (20, 50):
    writers = summary.Writers(str(model_dir), is_chief=True)
    writers.config(0, Config(model_dir=str(model_dir), train_steps=steps))
    writers.close()
    assert hparams() == {"train_steps": steps}


def test_plot_refuses_a_metric_no_run_has(tmp_path):
  from trainer import plot, summary
  from trainer.errors import UserError
  writers = summary.Writers(str(tmp_path / "run"), is_chief=True)
  writers.scalars(writers.train, 10, {"loss": 1.0})
  writers.close()
  with pytest.raises(UserError, match="no run has nope; the runs have: loss"):
    plot.plot([str(tmp_path / "run")], str(tmp_path / "c.png"),
              metrics=["loss", "nope"])
  assert not (tmp_path / "c.png").exists()


def test_eval_config_merges_saved_and_given_flags(tmp_path):
  """config.json's run fields, the command line's process fields and the
  flags it names; an early-stopped run's settings do not block --mode=eval."""
  from trainer import config as config_lib, saved_config
  from trainer.config import Config
  from trainer.errors import UserError
  saved = Config(model_dir="elsewhere", dataset="mnist", data_dir="d",
                 global_batch_size=32, train_steps=1250, strategy="mirrored",
                 cpu_replicas=2, early_stopping_patience=3, keep_best=True)
  (tmp_path / "config.json").write_text(saved.to_json())
  given = Config(model_dir=str(tmp_path), mode="eval", eval_split="test[:9]",
                 learning_rate=0.5)
  config = saved_config.config_for(str(tmp_path), given,
                             {"mode", "model_dir", "eval_split", "verbosity"})
  assert (config.dataset, config.data_dir, config.global_batch_size,
          config.train_steps) == ("mnist", "d", 32, 1250)
  assert config.learning_rate == 1e-3            # not given: the run's own
  assert config.eval_split == "test[:9]" and config.mode == "eval"
  assert config.model_dir == str(tmp_path)
  assert (config.strategy, config.cpu_replicas) == ("default", 0)
  assert config.early_stopping_patience == 0 and not config.keep_best
  config_lib.validate(config)
  # No config.json: refused, never this command line's defaults.
  with pytest.raises(UserError, match=r"has no config\.json .*start "
                     "--mode=continuous_eval, which waits for it"):
    saved_config.config_for(str(tmp_path / "none"), given, {"mode"})


def test_epochs_resolve_and_refusal():
  """resolve() in-process: steps from the split size; a task that streams
  its own data (no size) refuses epoch flags with one line."""
  import types
  from trainer import epochs
  from trainer.errors import UserError
  sized = types.SimpleNamespace(
      source=lambda split: types.SimpleNamespace(num_examples=1500),
      own_train_dataset=lambda: None)
  settings = epochs.Settings(epochs=2, eval_every_epochs=0.5,
                             summary_every_epochs=0.25, global_batch_size=64,
                             mode="train")
  # ceil(2 x 1500 / 64), ceil(0.5 x 1500 / 64), ceil(0.25 x 1500 / 64)
  assert epochs.resolve(settings, sized, log=False) == {
      "train_steps": 47, "eval_every": 12, "summary_every": 6}
  assert epochs.resolve(epochs.Settings(), sized, log=False) == {}
  streaming = types.SimpleNamespace(
      own_train_dataset=lambda: (lambda **kw: None))
  with pytest.raises(UserError, match="this task streams train_dataset"):
    epochs.resolve(settings, streaming)
  assert epochs.resolve(epochs.Settings(), streaming) == {}
