"""`trainer.load(model_dir)`: a finished run's task and restored model(s).

    import trainer
    task, model = trainer.load("runs/make_run")
    probabilities = tf.nn.softmax(model(images))  # images as after preprocess

The task, model and data flags come from MODEL_DIR/config.json (keyword
overrides replace single fields, e.g. data_dir=... when the data moved); the
weights from the latest checkpoint, or `checkpoint` (a prefix DIR/ckpt-N or
a directory such as DIR/best). The model is built in float32 whatever
--mixed_precision the run used (the checkpoint's weights are float32).
A run trained with --ema_decay gives its moving-average weights (the ones
its evaluation used); `ema=False` gives the raw weights instead.
"""

import dataclasses
import os
import sys
import types

from trainer import bases, rundir, saved_config
from trainer.errors import UserError, first_line


@dataclasses.dataclass(frozen=True)
class Restored:
  """Everything trainer.export needs beside the model."""
  task: object
  model: object          # a keras.Model, or a dict of them by name
  input_spec: object     # features of one example after preprocess
  checkpoint: str
  config: object
  # "ema": the moving average's (see restore); "none": not read, as the run
  # being built restores them from its own checkpoint right after.
  weights: str = "raw"


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


def restore(model_dir: str, checkpoint: str | None = None, ema: bool = True,
            **overrides) -> Restored:
  """Rebuilds the run's task and model(s) and restores their weights (the
  checkpoint's `model` object: one model, or a module of named ones).

  Called while another run's models are being built (a task's build_model
  loading a base or a teacher), `model_dir` is looked up as that run
  records it (see trainer.bases); when that run's own checkpoint will
  restore every weight, the architecture alone is built and no weight is
  read, so a run deleted after the first start is not needed."""
  outer = bases.current()
  if outer is not None:
    return _restore_loaded(outer, model_dir, checkpoint, ema, overrides)
  config = saved_config.load_config(model_dir, **overrides)
  path = find_checkpoint(model_dir, checkpoint or "")
  cwd = rundir.training_cwd(model_dir) or os.getcwd()
  with bases.building(model_dir, restores=True, cwd=cwd):
    task, spec, models = _build(config)
  return _restored(task, spec, models, config, path, ema)


def _build(config):
  """(task, input spec, {name: model}) of a run's Config, in float32."""
  import keras
  from trainer import build, compat
  from trainer.data import pipeline
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("float32")
  try:
    # Layers named as a new process names them: the same weight names
    # however many runs this process loaded before.
    with compat.fresh_layer_names():
      task = build.task_of(config)
      spec = pipeline.input_spec(task, config.train_split)
      models = build.models_of(task, spec)
  finally:
    keras.mixed_precision.set_global_policy(previous)
  return task, spec, models


def _restored(task, spec, models, config, path, ema) -> Restored:
  """The checkpoint at `path` restored into `models` (and its averages)."""
  import tensorflow as tf
  from trainer import build, ema as ema_lib
  objects = {"model": build.trackable(models, build.MAIN)}
  averages = None
  if ema and config.ema_decay:
    averages = ema_lib.EMA([v for m in models.values()
                            for v in m.trainable_variables], config.ema_decay)
    objects["ema"] = averages
  status = tf.train.Checkpoint(**objects).restore(path).expect_partial()
  try:
    status.assert_existing_objects_matched()
  except AssertionError as e:
    raise UserError(f"{path} does not hold this model's weights "
                    f"({first_line(e, 200)}).") from None
  if averages is not None:
    averages.copy_to_model()
  return Restored(task, _main_or_all(models), spec, path, config,
                  "ema" if averages is not None else "raw")


def _restore_loaded(outer, given: str, checkpoint, ema, overrides) -> Restored:
  """restore() of the run `given` while `outer`'s models are being built:
  from outer's record of it when there is one and outer restores, else
  from `given` (relative to outer's working directory). Its fields go into
  outer's record."""
  record = bases.record_dir(outer, given)
  original = os.path.join(outer.cwd, given)   # `given` if absolute
  why = (f"the task of the run in {outer.run_dir} loads {given} when it "
         "builds its models")
  if outer.restores and saved_config.saved_fields(record) is not None:
    source = record
  elif saved_config.saved_fields(original) is not None:
    source = original
  elif outer.restores:
    where = (f"{original}, relative to {outer.cwd} where that run trained"
             if not os.path.isabs(given) else original)
    raise UserError(f"{why}: it is neither recorded in {record} (written "
                    f"when a run starts training) nor at {where}; put that "
                    "run back, or train this one again from it.")
  else:
    raise UserError(f"{why}: {original} has no {rundir.CONFIG_FILE}; train "
                    "that run first, or give its --model_dir.")
  config = saved_config.load_config(source, **overrides)
  key = bases.key(given)
  outer.found[f"{outer.prefix}{bases.DIR}/{key}"] = (
      saved_config.saved_fields(source))
  cwd = rundir.training_cwd(source) or outer.cwd
  if outer.restores:
    # Its weights come with outer's checkpoint: build, read nothing.
    with bases.building_loaded(outer, key, source, True, cwd):
      task, spec, models = _build(config)
    return Restored(task, _main_or_all(models), spec, "", config, "none")
  path = find_checkpoint(source, checkpoint or "")
  with bases.building_loaded(outer, key, source, True, cwd):
    task, spec, models = _build(config)
  return _restored(task, spec, models, config, path, ema)


def _main_or_all(models: dict):
  """The only model if it is the main one, else the dict."""
  from trainer import build
  return models[build.MAIN] if list(models) == [build.MAIN] else models


def load(model_dir: str, checkpoint: str | None = None, ema: bool = True,
         **overrides):
  """(task, model): the run's Task and its model(s) with the checkpoint's
  weights (the moving average's, if the run kept one and `ema`), ready for
  `model(x)` on features as after Task.preprocess. A dict of models comes
  back as the dict."""
  restored = restore(model_dir, checkpoint, ema, **overrides)
  return restored.task, restored.model


def weights(model) -> dict:
  """{variable path: numpy array} of a loaded model (or dict of models):
  the weights by their Keras names, the same in every load (load() names
  layers as a new process would). (In the checkpoint files the trainable
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
               ema: bool = True, **overrides):
    return load(model_dir, checkpoint, ema, **overrides)


sys.modules[__name__].__class__ = _CallableModule
