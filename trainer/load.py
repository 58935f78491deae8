"""`trainer.load(model_dir)`: a finished run's task and restored model(s).

    import trainer
    task, model = trainer.load("runs/make_run")
    probabilities = tf.nn.softmax(model(images))  # images as after preprocess

The task, model and data flags come from MODEL_DIR/config.json (keyword
overrides replace single fields, e.g. data_dir=... when the data moved); the
weights from the latest checkpoint, or `checkpoint` (a prefix DIR/ckpt-N or
a directory such as DIR/best). The model is built in float32 whatever
--mixed_precision the run used (the checkpoint's weights are float32).
"""

import dataclasses
import os
import sys
import types

from trainer import rundir
from trainer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Restored:
  """Everything trainer.export needs beside the model."""
  task: object
  model: object          # a keras.Model, or a dict of them by name
  input_spec: object     # features of one example after preprocess
  checkpoint: str
  config: object


def find_checkpoint(model_dir: str, checkpoint: str = "") -> str:
  """The checkpoint prefix to restore: `checkpoint` (a prefix or a
  directory, whose latest is used), else the latest in model_dir."""
  import tensorflow as tf
  path = checkpoint or model_dir
  if os.path.isdir(path):
    found = tf.train.latest_checkpoint(path)
    if found is None:
      raise UserError(f"no checkpoint in {path}: train first, or pass "
                      "--checkpoint=PREFIX.")
    return found
  if not tf.io.gfile.exists(path + ".index"):
    raise UserError(f"--checkpoint={path}: no such checkpoint ({path}.index "
                    "is missing).")
  return path


def checkpoint_objects(model) -> dict:
  """How the training checkpoint names the model(s): `model` for one model,
  each name of a dict of models (the multi-model Task API)."""
  if isinstance(model, dict):
    return dict(model)
  return {"model": model}


def restore(model_dir: str, checkpoint: str | None = None,
            **overrides) -> Restored:
  """Rebuilds the run's task and model(s) and restores their weights."""
  import keras
  import tensorflow as tf
  from trainer import tasks
  from trainer.data import pipeline
  config = rundir.load_config(model_dir, **overrides)
  path = find_checkpoint(model_dir, checkpoint or "")
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("float32")
  try:
    task = tasks.from_config(config)
    spec = pipeline.input_spec(task, config.train_split)
    model = task.build_model(spec)
  finally:
    keras.mixed_precision.set_global_policy(previous)
  status = tf.train.Checkpoint(**checkpoint_objects(model)).restore(
      path).expect_partial()
  try:
    status.assert_existing_objects_matched()
  except AssertionError as e:
    raise UserError(f"{path} does not hold this model's weights "
                    f"({str(e).splitlines()[0][:200]}).") from None
  return Restored(task, model, spec, path, config)


def load(model_dir: str, checkpoint: str | None = None, **overrides):
  """(task, model): the run's Task and its model(s) with the checkpoint's
  weights, ready for `model(x)` on features as after Task.preprocess.
  A dict of models comes back as the dict."""
  restored = restore(model_dir, checkpoint, **overrides)
  return restored.task, restored.model


def weights(model) -> dict:
  """{variable path: numpy array} of a loaded model (or dict of models):
  the weights by their Keras names. (In the checkpoint files the trainable
  ones sit under optimizer/_trainable_variables/N, which no name ties to a
  layer: read them through load(), not tf.train.load_checkpoint.)"""
  models = model if isinstance(model, dict) else {"": model}
  out = {}
  for name, m in models.items():
    for v in m.weights:
      out[f"{name}/{v.path}" if name else v.path] = v.numpy()
  return out


class _CallableModule(types.ModuleType):
  """`trainer.load` is both this module and its `load` function: importing
  the submodule rebinds the package attribute `trainer.load` to the module,
  so the module itself must be callable for `trainer.load(dir)` to work."""

  def __call__(self, model_dir: str, checkpoint: str | None = None,
               **overrides):
    return load(model_dir, checkpoint, **overrides)


sys.modules[__name__].__class__ = _CallableModule
