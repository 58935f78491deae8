"""A custom-training-loop framework for TensorFlow 2.

The Python API: subclass `Task`, build a `Config`, call `train` or
`evaluate`; `load(model_dir)` gives a finished run's task and model. The
CLI (`python -m trainer.main`) runs the same loop. Names load lazily so
that `import trainer.config` (flag checks) does not import TensorFlow.

  >>> import tempfile, trainer
  >>> run = tempfile.mkdtemp()
  >>> result = trainer.train(trainer.Config(
  ...     model="mlp", train_steps=3, eval_every=0, model_dir=run))
  >>> result["global_step"], 0.0 <= result["eval_accuracy"] <= 1.0
  (3, True)
  >>> task, model = trainer.load(run)
  >>> len(trainer.load.weights(model)) > 0
  True
"""

import importlib

_EXPORTS = {
    "Config": "trainer.config",
    "UserError": "trainer.errors",
    "Source": "trainer.data.source",
    "array_source": "trainer.data.source",
    "Task": "trainer.task",
    "ClassificationTask": "trainer.task",
}


def train(config, task=None) -> dict:
  """Trains `task` (default: the one the config names), resuming from
  config.model_dir; returns the summary dict the CLI prints as JSON."""
  from trainer import controller
  return controller.train(config, task)


def evaluate(config, task=None, checkpoint: str | None = None) -> dict:
  """Evaluates the latest (or given) checkpoint; returns the metrics dict."""
  from trainer import controller
  return controller.evaluate(config, task, checkpoint)


def __getattr__(name):
  if name == "load":
    # The module is callable: trainer.load(model_dir, checkpoint=None)
    # returns (task, model); see trainer/load.py.
    return importlib.import_module("trainer.load")
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'trainer' has no attribute {name!r}")


__all__ = ["ClassificationTask", "Config", "Source", "Task", "UserError",
           "array_source", "evaluate", "load", "train"]
