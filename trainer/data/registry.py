"""Dataset registry: name -> function(split, DataArgs) -> Source.

Every built-in reader is listed here, in one place, and imported only when
its name is asked for: `import trainer.data` stays cheap (flag checks run
before TensorFlow loads), and no reader imports the registry or another
reader.
"""

import importlib
from typing import Callable

from trainer.data.args import DataArgs  # noqa: F401  (the readers' input)
from trainer.data.source import Source

Reader = Callable[[str, DataArgs], Source]

# name -> (module under trainer.data.readers, its function(split, args)).
_READERS: dict[str, tuple[str, str]] = {
    "array_record": ("array_record", "array_record"),
    "cifar10": ("cifar10", "cifar10"),
    "digits": ("digits", "digits"),
    "fashion_mnist": ("mnist", "fashion_mnist"),
    "image_folder": ("image_folder", "image_folder"),
    "mnist": ("mnist", "mnist"),
    "synthetic": ("synthetic", "synthetic"),
    "tfrecord": ("tfrecord", "tfrecord"),
}


def names() -> list[str]:
  return sorted(_READERS)


def get(name: str) -> Reader:
  if name not in _READERS:
    raise KeyError(name)
  module, function = _READERS[name]
  return getattr(importlib.import_module(f"trainer.data.readers.{module}"),
                 function)
