"""A folder of text files written as byte-level token ArrayRecord files.

The same documents (BOS, the file's bytes, EOS) and the same train/test
split as readers.text, stored by readers.token_records: what the text
source reads from many small files, one look-up by number instead.
"""

import glob
import os

import numpy as np

from trainer.data.readers import text, token_records
from trainer.errors import UserError


def _document(root: str, path: str) -> np.ndarray:
  with open(os.path.join(root, path), "rb") as f:
    data = np.frombuffer(f.read(), np.uint8).astype(np.int32)
  return np.concatenate([[text.BOS], data, [text.EOS]]).astype(np.int32)


def convert_text(root: str, out_dir: str, shards: int = 1,
                 pattern: str = "*.py", heldout_fraction: float = 0.05,
                 skip_dirs: tuple = text.SKIP_DIRS) -> dict:
  """Writes OUT/{train,test}-{i:05d}-of-{N:05d}.array_record, each shard a
  contiguous run of the split's files in path order, one read at a time.
  Returns {split: shard paths}."""
  if not 0.0 < heldout_fraction < 1.0:
    raise UserError(f"heldout_fraction ({heldout_fraction}) must be between "
                    "0 and 1.")
  corpus = text.list_corpus(os.path.abspath(root), pattern, tuple(skip_dirs))
  os.makedirs(out_dir, exist_ok=True)
  written = {}
  for split in text.SPLITS:
    paths = [p for p in corpus.paths
             if text.is_heldout(p, heldout_fraction) == (split == "test")]
    if not 1 <= shards <= len(paths):
      raise UserError(f"shards ({shards}) must be between 1 and the "
                      f"{len(paths)} files of split {split!r}.")
    out = [os.path.join(out_dir, f"{split}-{i:05d}-of-{shards:05d}"
                        f"{token_records.SUFFIX}") for i in range(shards)]
    stale = set(glob.glob(os.path.join(out_dir, f"{split}-*"
                                       f"{token_records.SUFFIX}"))) - set(out)
    if stale:
      # A reader globs SPLIT-*: old shards would be read as well.
      raise UserError(f"{out_dir} already holds {sorted(stale)[0]} (another "
                      f"shard set of {split!r}); delete it or write elsewhere.")
    for i, path in enumerate(out):
      mine = paths[i * len(paths) // shards:(i + 1) * len(paths) // shards]
      token_records.write_shard((_document(corpus.root, p) for p in mine),
                                path)
    written[split] = out
  return written
