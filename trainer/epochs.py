"""Epochs -> updates: --epochs, --eval_every_epochs and --summary_every_epochs
become step counts once the task (and so the size of its splits) is known,
and the start of a run says how big the splits are."""

import fractions
import math

from absl import logging

from trainer.config import Config
from trainer.errors import UserError


def steps_for(epochs: float, examples: int, global_batch: int) -> int:
  """ceil(epochs x examples / global batch), computed exactly (a float
  product such as 0.1 x 1500 must not round up one step too many)."""
  exact = fractions.Fraction(str(epochs)) * examples / global_batch
  return math.ceil(exact)


def split_size(task, split: str) -> int | None:
  """Examples in `split`, or None for a task that streams its own training
  data (Task.train_dataset) and so has no size."""
  if task.own_train_dataset() is not None:
    return None
  return int(task.source(split).num_examples)


def resolve(config: Config, task, log: bool = True) -> Config:
  """The config with epoch-based fields turned into steps; logs the examples
  per split and the updates per epoch."""
  train_examples = split_size(task, config.train_split)
  wants_epochs = (config.epochs > 0 or config.eval_every_epochs > 0 or
                  config.summary_every_epochs > 0)
  if train_examples is None:
    if wants_epochs:
      raise UserError("--epochs, --eval_every_epochs and "
                      "--summary_every_epochs need the size of the training "
                      "split, and this task streams train_dataset (no size): "
                      "give --train_steps, --eval_every and --summary_every.")
    return config
  if train_examples == 0:
    raise UserError(f"--train_split={config.train_split!r} has no examples; "
                    "choose a split with data.")
  per_epoch = steps_for(1, train_examples, config.global_batch_size)
  changes = {}
  if config.epochs > 0:
    changes["train_steps"] = steps_for(config.epochs, train_examples,
                                       config.global_batch_size)
  for name in ("eval_every", "summary_every"):
    epochs = getattr(config, f"{name}_epochs")
    if epochs > 0:
      changes[name] = max(1, steps_for(epochs, train_examples,
                                       config.global_batch_size))
  resolved = config.replace(**changes)
  if log:
    sizes = [f"train ({config.train_split}): {train_examples} examples"]
    if config.mode != "train":
      sizes.append(f"eval ({config.eval_split}): "
                   f"{split_size(task, config.eval_split)} examples")
    logging.info(
        "data | %s | global batch: %d | steps per epoch: %d | train_steps: %d "
        "(%.2f epochs) | eval_every: %d | summary_every: %d",
        " | ".join(sizes), config.global_batch_size, per_epoch,
        resolved.train_steps,
        resolved.train_steps * config.global_batch_size / train_examples,
        resolved.eval_every, resolved.summary_every)
  return resolved
