"""Config -> Task: a plug-in task, or the built-in classification task."""

import layers
from trainer import plugins
from trainer.config import Config
from trainer.errors import UserError
from trainer.task import ClassificationTask, Task


def from_config(config: Config) -> Task:
  if config.task:
    factory = plugins.load(config.task, "task")
    if not callable(factory):
      raise UserError(f"--task={config.task!r} is a {type(factory).__name__}, "
                      "not a Task class or a function config -> Task.")
    task = factory(config)
    if not isinstance(task, Task):
      raise UserError(f"--task={config.task!r} made a {type(task).__name__}, "
                      "not a trainer.Task; subclass trainer.Task.")
    return task
  if ":" in config.model:
    model_fn = plugins.load(config.model, "model")
  else:
    model_fn = layers.get(config.model)
  return ClassificationTask(config, model_fn)
