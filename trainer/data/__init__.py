"""Datasets: readers registered by name, and the deterministic tf.data pipeline."""

import dataclasses

from trainer.data import registry
from trainer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Settings:
  """What choosing and opening a dataset reads (field names are the
  flags'); trainer.build cuts it from the Config."""
  dataset: str = "digits"
  data_dir: str = ""
  skip_corrupt: bool = False
  seed: int = 0
  synthetic_shape: str = "28,28,1"
  synthetic_classes: int = 10
  synthetic_examples: int = 4096
  file_patterns: str = ""
  image_size: str = ""
  data_cache_dir: str = ""


def data_args(settings: Settings) -> registry.DataArgs:
  """The slice of the data settings that dataset readers see."""
  patterns = []
  for item in filter(None, settings.file_patterns.split(",")):
    split, sep, pattern = item.partition("=")
    if not sep or not split or not pattern:
      raise UserError(f"--file_patterns item {item!r} must be SPLIT=GLOB, "
                      "e.g. train=/data/train-*.tfrecord.")
    patterns.append((split, pattern))
  return registry.DataArgs(
      data_dir=settings.data_dir or None,
      skip_corrupt=settings.skip_corrupt,
      seed=settings.seed,
      synthetic_shape=tuple(
          int(x) for x in settings.synthetic_shape.split(",")),
      synthetic_classes=settings.synthetic_classes,
      synthetic_examples=settings.synthetic_examples,
      file_patterns=tuple(patterns),
      any_size=bool(settings.image_size),
      cache_dir=settings.data_cache_dir)


def readers_for(settings: Settings, split: str):
  """The Source of `split` of --dataset."""
  try:
    reader = registry.get(settings.dataset)
  except KeyError:
    raise UserError(f"--dataset={settings.dataset!r} has no reader; known: "
                    f"{', '.join(registry.names())}.") from None
  try:
    return reader(split, data_args(settings))
  except ValueError as e:   # split syntax and selection errors
    raise UserError(f"--dataset={settings.dataset}: {e}") from None
