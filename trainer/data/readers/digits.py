"""`--dataset=digits`: the 1797 8x8 handwritten digits that scikit-learn ships.

Embedded in the scikit-learn package, so it needs no download: the default
dataset, and the one every quick test trains on.
"""

import importlib.util
import os

import numpy as np

from trainer.data.args import DataArgs
from trainer.data.readers.choose import select_arrays
from trainer.data.source import Source

# A fixed, seed-independent split so that "test" is the same set for every
# run: 1500 train and 297 test examples after one fixed shuffle.
_NUM_TRAIN = 1500


def _digits() -> tuple[np.ndarray, np.ndarray]:
  """(images float64 [1797, 8, 8] in 0..16, labels [1797]) as
  sklearn.datasets.load_digits gives them, read from the CSV file that
  scikit-learn ships, found without importing scikit-learn: its import costs
  ~0.8 s of every start-up (trainer.tfimport). load_digits where the file
  is not where scikit-learn keeps it today."""
  spec = importlib.util.find_spec("sklearn")
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(spec.submodule_search_locations[0], "datasets",
                        "data", "digits.csv.gz")
    if os.path.isfile(path):
      # load_digits' own parse: 64 pixel columns and the label, comma-separated.
      data = np.loadtxt(path, delimiter=",")
      return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
  from sklearn.datasets import load_digits
  bunch = load_digits()
  return bunch.images, bunch.target


def load_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{"train": (images uint8 [N,8,8,1], labels int32 [N]), "test": ...}."""
  pixels, target = _digits()
  # Pixel values are 0..16; scale to the 0..255 range of every other image set.
  images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = target.astype(np.int32)
  order = np.random.default_rng(20240601).permutation(len(labels))
  images, labels = images[order], labels[order]
  return {
      "train": (images[:_NUM_TRAIN], labels[:_NUM_TRAIN]),
      "test": (images[_NUM_TRAIN:], labels[_NUM_TRAIN:]),
  }


def digits(split: str, args: DataArgs) -> Source:
  del args  # embedded: no files, no options
  return select_arrays("digits", load_arrays(), split, num_classes=10)
