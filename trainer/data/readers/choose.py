"""Split selection for file-based readers, with errors a user can act on."""

import glob
import os

import numpy as np

from trainer.data import splits
from trainer.data.source import Source, array_source
from trainer.errors import UserError


def names(dataset: str, split: str) -> list[str]:
  """The split names that the split string `split` reads, in order."""
  try:
    return [part.name for part in splits.parse(split)]
  except ValueError as e:
    raise UserError(f"--dataset={dataset}: {e}") from None


def require(dataset: str, split: str, available, missing: dict[str, str]):
  """UserError when `split` reads a split whose files are absent.

  `missing` maps each split name the dataset normally has to a phrase naming
  the files it needs, so that "train" on a directory holding only the test
  files says which files to add, and how to slice the split that is there.
  """
  available = list(available)
  for name in names(dataset, split):
    if name not in available and name in missing:
      example = available[0] if available else "test"
      raise UserError(
          f"--dataset={dataset}: split {split!r} reads {name!r}, which needs "
          f"{missing[name]}; found only {available or 'nothing'}. Add those "
          f"files, or slice what is there, e.g. --train_split='{example}[:80%]'"
          f" --eval_split='{example}[80%:]'.")


def select_arrays(name: str, parts: dict[str, tuple[np.ndarray, np.ndarray]],
                  split: str, num_classes: int) -> Source:
  """A Source over the examples that `split` selects from in-memory `parts`."""
  sizes = {k: len(v[1]) for k, v in parts.items()}
  chosen = splits.select(split, sizes)
  images = np.concatenate([parts[k][0][idx] for k, idx in chosen])
  labels = np.concatenate([parts[k][1][idx] for k, idx in chosen])
  return array_source(f"{name}:{split}", images, labels, num_classes)


def select(dataset: str, parts: dict[str, tuple[np.ndarray, np.ndarray]],
           split: str, num_classes: int | None) -> Source:
  """A Source over what `split` selects from `parts` (split -> arrays)."""
  try:
    return select_arrays(dataset, parts, split, num_classes)
  except ValueError as e:
    raise UserError(f"--dataset={dataset}: {e}") from None


def split_files(dataset: str, suffix: str, split_name: str, args) -> list[str]:
  """Sorted record files of one split name; UserError when none match.

  The globs given for it in --file_patterns, else DATA_DIR/SPLIT-*SUFFIX
  (trainer.convert's shards) and DATA_DIR/SPLIT{SUFFIX}*."""
  patterns = [p for s, p in args.file_patterns if s == split_name]
  if not args.file_patterns:
    if not args.data_dir:
      raise UserError(f"--dataset={dataset} needs --data_dir=DIR holding "
                      f"SPLIT-*{suffix} files (e.g. from trainer.convert), or "
                      "--file_patterns=SPLIT=GLOB,...")
    patterns = [os.path.join(args.data_dir, f"{split_name}-*{suffix}"),
                os.path.join(args.data_dir, f"{split_name}{suffix}*")]
  elif not patterns:
    raise UserError(f"--dataset={dataset}: no file pattern for split "
                    f"{split_name!r}; --file_patterns names "
                    f"{sorted({s for s, _ in args.file_patterns})}.")
  files = sorted({f for p in patterns for f in glob.glob(p)
                  if os.path.isfile(f)})
  if not files:
    raise UserError(f"--dataset={dataset}: no files match "
                    f"{' or '.join(patterns)} for split {split_name!r}; check "
                    "the path, or write them with python -m trainer.convert.")
  return files
