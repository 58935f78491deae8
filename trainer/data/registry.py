"""Dataset registry: name -> function(split, DataArgs) -> Source."""

import dataclasses
from typing import Callable

from trainer.data.source import Source


@dataclasses.dataclass(frozen=True)
class DataArgs:
  """What dataset readers may depend on (a slice of the trainer Config)."""
  data_dir: str | None = None
  skip_corrupt: bool = False
  seed: int = 0
  # --dataset=synthetic only (benchmarks): shape of one image, class count
  # and examples per split.
  synthetic_shape: tuple[int, int, int] = (28, 28, 1)
  synthetic_classes: int = 10
  synthetic_examples: int = 4096
  # --dataset=tfrecord: glob patterns per split name, "train=a/*.tfrecord".
  file_patterns: tuple[tuple[str, str], ...] = ()
  # Set by --image_size: readers may hand out encoded images of any size
  # (Source.decode_channels; the task's preprocess decodes and resizes them)
  # and so read lazily, without decoding anything at start-up.
  any_size: bool = False
  # --data_cache_dir: where image_folder keeps its listing between runs
  # ("": the default location, "none": off; readers.folder_index).
  cache_dir: str = ""


Reader = Callable[[str, DataArgs], Source]
_READERS: dict[str, Reader] = {}


def register(name: str):
  """Decorator: register `fn(split, args) -> Source` under `name`."""
  def wrap(fn: Reader) -> Reader:
    _READERS[name] = fn
    return fn
  return wrap


def names() -> list[str]:
  _load_builtins()
  return sorted(_READERS)


def get(name: str) -> Reader:
  _load_builtins()
  if name not in _READERS:
    raise KeyError(name)
  return _READERS[name]


def _load_builtins():
  # Imported lazily so that `import trainer.data` stays cheap and the readers
  # register themselves in one place.
  from trainer.data import builtin  # noqa: F401
