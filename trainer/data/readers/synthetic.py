"""`--dataset=synthetic`: random uint8 images and labels, for benchmarks ONLY.

Nothing can be learned from it; it exists to measure the step without any
input cost. Deterministic in --seed and the split name.
"""

import zlib

import numpy as np

from trainer.data.args import DataArgs
from trainer.data.source import Source, array_source


def synthetic(split: str, args: DataArgs) -> Source:
  rng = np.random.default_rng([args.seed, zlib.crc32(split.encode())])
  n = args.synthetic_examples
  images = rng.integers(0, 256, size=(n,) + tuple(args.synthetic_shape),
                        dtype=np.uint8)
  labels = rng.integers(0, args.synthetic_classes, size=(n,), dtype=np.int32)
  return array_source(f"synthetic:{split}", images, labels,
                      args.synthetic_classes)
