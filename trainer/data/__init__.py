"""Datasets: readers registered by name, and the deterministic tf.data pipeline."""

from trainer.data import registry
from trainer.errors import UserError


def data_args(config) -> registry.DataArgs:
  """The slice of the Config that dataset readers see."""
  patterns = []
  for item in filter(None, config.file_patterns.split(",")):
    split, sep, pattern = item.partition("=")
    if not sep or not split or not pattern:
      raise UserError(f"--file_patterns item {item!r} must be SPLIT=GLOB, "
                      "e.g. train=/data/train-*.tfrecord.")
    patterns.append((split, pattern))
  return registry.DataArgs(
      data_dir=config.data_dir or None,
      skip_corrupt=config.skip_corrupt,
      seed=config.seed,
      synthetic_shape=tuple(int(x) for x in config.synthetic_shape.split(",")),
      synthetic_classes=config.synthetic_classes,
      synthetic_examples=config.synthetic_examples,
      file_patterns=tuple(patterns),
      any_size=bool(config.image_size),
      cache_dir=config.data_cache_dir)


def readers_for(config, split: str):
  """The Source of `split` of --dataset."""
  try:
    reader = registry.get(config.dataset)
  except KeyError:
    raise UserError(f"--dataset={config.dataset!r} has no reader; known: "
                    f"{', '.join(registry.names())}.") from None
  try:
    return reader(split, data_args(config))
  except ValueError as e:   # split syntax and selection errors
    raise UserError(f"--dataset={config.dataset}: {e}") from None
