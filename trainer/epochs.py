"""Epochs -> updates: --epochs, --eval_every_epochs and --summary_every_epochs
become step counts once the task (and so the size of its splits) is known,
and the start of a run says how big the splits are."""

import dataclasses
import fractions
import math

from absl import logging

from trainer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Settings:
  """What turning epochs into steps reads (field names are the flags')."""
  train_split: str = "train"
  eval_split: str = "test"
  mode: str = "train_and_eval"
  global_batch_size: int = 64
  epochs: float = 0.0
  eval_every_epochs: float = 0.0
  summary_every_epochs: float = 0.0
  train_steps: int = 1000
  eval_every: int = 500
  summary_every: int = 100


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


def resolve(settings: Settings, task, log: bool = True) -> dict:
  """The step counts the epoch-based flags stand for, by the name of the
  flag they set (train_steps, eval_every, summary_every; {} when no epoch
  flag is given): trainer.build puts them into the run's Config. Logs the
  examples per split and the updates per epoch."""
  train_examples = split_size(task, settings.train_split)
  wants_epochs = (settings.epochs > 0 or settings.eval_every_epochs > 0 or
                  settings.summary_every_epochs > 0)
  if train_examples is None:
    if wants_epochs:
      raise UserError("--epochs, --eval_every_epochs and "
                      "--summary_every_epochs need the size of the training "
                      "split, and this task streams train_dataset (no size): "
                      "give --train_steps, --eval_every and --summary_every.")
    return {}
  if train_examples == 0:
    raise UserError(f"--train_split={settings.train_split!r} has no "
                    "examples; choose a split with data.")
  batch = settings.global_batch_size
  per_epoch = steps_for(1, train_examples, batch)
  changes = {}
  if settings.epochs > 0:
    changes["train_steps"] = steps_for(settings.epochs, train_examples, batch)
  for name in ("eval_every", "summary_every"):
    epochs = getattr(settings, f"{name}_epochs")
    if epochs > 0:
      changes[name] = max(1, steps_for(epochs, train_examples, batch))
  if log:
    resolved = dataclasses.replace(settings, **changes)
    sizes = [f"train ({settings.train_split}): {train_examples} examples"]
    if settings.mode != "train":
      sizes.append(f"eval ({settings.eval_split}): "
                   f"{split_size(task, settings.eval_split)} examples")
    logging.info(
        "data | %s | global batch: %d | steps per epoch: %d | train_steps: %d "
        "(%.2f epochs) | eval_every: %d | summary_every: %d",
        " | ".join(sizes), batch, per_epoch, resolved.train_steps,
        resolved.train_steps * batch / train_examples,
        resolved.eval_every, resolved.summary_every)
  return changes
