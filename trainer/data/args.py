"""What dataset readers may depend on: a slice of the run configuration."""

import dataclasses


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
