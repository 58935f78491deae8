"""`--dataset=digits`: the 1797 8x8 handwritten digits that scikit-learn ships.

Embedded in the scikit-learn package, so it needs no download: the default
dataset, and the one every quick test trains on.
"""

import numpy as np

from trainer.data import registry, splits
from trainer.data.source import Source, array_source

# A fixed, seed-independent split so that "test" is the same set for every
# run: 1500 train and 297 test examples after one fixed shuffle.
_NUM_TRAIN = 1500


def load_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{"train": (images uint8 [N,8,8,1], labels int32 [N]), "test": ...}."""
  from sklearn.datasets import load_digits  # heavy import: only when used
  bunch = load_digits()
  # Pixel values are 0..16; scale to the 0..255 range of every other image set.
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  order = np.random.default_rng(20240601).permutation(len(labels))
  images, labels = images[order], labels[order]
  return {
      "train": (images[:_NUM_TRAIN], labels[:_NUM_TRAIN]),
      "test": (images[_NUM_TRAIN:], labels[_NUM_TRAIN:]),
  }


def select_arrays(name: str, parts: dict[str, tuple[np.ndarray, np.ndarray]],
                  split: str, num_classes: int) -> Source:
  """A Source over the examples that `split` selects from in-memory `parts`."""
  sizes = {k: len(v[1]) for k, v in parts.items()}
  chosen = splits.select(split, sizes)
  images = np.concatenate([parts[k][0][idx] for k, idx in chosen])
  labels = np.concatenate([parts[k][1][idx] for k, idx in chosen])
  return array_source(f"{name}:{split}", images, labels, num_classes)


@registry.register("digits")
def digits(split: str, args: registry.DataArgs) -> Source:
  del args  # embedded: no files, no options
  return select_arrays("digits", load_arrays(), split, num_classes=10)
