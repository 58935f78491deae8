"""A folder of text files as byte-level token sequences, read lazily.

Tokens are bytes 0-255 plus BOS, EOS and PAD (VOCAB_SIZE 259): no tokenizer
to download. A file of s bytes is the document BOS, its bytes, EOS (s + 1
prediction slots), cut into pieces of at most `max_len` slots that overlap
by one token, so every next-byte prediction of the file is in exactly one
piece. Empty files are left out.

Start-up lists the folder and stats each file; nothing is read until a batch
asks for it, and everything kept is O(files), never O(bytes). A file is
held out (split "test") when a hash of its relative path says so, so the
split is stable across machines, runs and new files elsewhere in the
folder. Pieces, padding and packing: trainer.data.documents (packed rows
take files' last pieces in an order hashed from (seed, path)).
"""

import dataclasses
import fnmatch
import functools
import hashlib
import os

import numpy as np

from trainer.data import documents, splits
from trainer.data.source import Source
from trainer.errors import UserError

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259
SPLITS = ("train", "test")
SKIP_DIRS = ("site-packages", "__pycache__")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Files of a folder: relative paths (posix, sorted) and their sizes."""
  root: str
  paths: tuple
  sizes: np.ndarray


@functools.lru_cache(maxsize=8)
def list_corpus(root: str, pattern: str = "*.py",
                skip_dirs: tuple = SKIP_DIRS) -> Corpus:
  """The non-empty files under `root` whose name matches `pattern`, in
  folders none of which is named in `skip_dirs`. Stats, never reads."""
  if not os.path.isdir(root):
    raise UserError(f"text corpus {root!r} is not a folder; give the folder "
                    "that holds the text files.")
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in skip_dirs]
    for name in fnmatch.filter(files, pattern):
      path = os.path.join(folder, name)
      size = os.stat(path).st_size
      if size > 0:
        found.append((os.path.relpath(path, root).replace(os.sep, "/"), size))
  if not found:
    raise UserError(f"text corpus {root!r} has no non-empty file matching "
                    f"{pattern!r}; check the folder and the pattern.")
  found.sort()
  return Corpus(root, tuple(p for p, _ in found),
                np.asarray([s for _, s in found], np.int64))


def _hash_unit(text: str) -> float:
  """A stable number in [0, 1) from `text` (Python's hash() is salted)."""
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def is_heldout(path: str, fraction: float) -> bool:
  """Whether relative `path` belongs to the held-out split."""
  return _hash_unit("heldout:" + path) < fraction


def _read_tokens(root: str, path: str, size: int, start: int,
                 end: int) -> np.ndarray:
  """Tokens [start, end) of a file of `size` bytes: token 0 is BOS, token t
  byte t - 1, token size + 1 EOS."""
  first, stop = max(start - 1, 0), min(end - 1, size)
  full = os.path.join(root, path)
  fd = os.open(full, os.O_RDONLY)
  try:
    now = os.fstat(fd).st_size
    data = os.pread(fd, stop - first, first) if stop > first else b""
  finally:
    os.close(fd)
  if now != size or len(data) != stop - first:
    # Pieces were planned from the listed sizes: reading a changed file
    # would silently shift every later piece and break exact resume.
    raise ValueError(f"{full} has {now} bytes, {size} when the corpus was "
                     "listed; the corpus changed under the run: restart it.")
  tokens = np.frombuffer(data, np.uint8).astype(np.int32)
  return np.concatenate([[BOS]] * (start == 0) + [tokens]
                        + [[EOS]] * (end == size + 2)).astype(np.int32)


def _select(spec: str) -> tuple[str, splits.SplitPart]:
  """(split name, its part) of a one-part split spec."""
  try:
    parts = splits.parse(spec)
  except ValueError as e:
    raise UserError(f"text corpus: {e}") from None
  if len(parts) != 1:
    raise UserError(f"text corpus: split {spec!r} joins splits with '+'; "
                    "give one, e.g. 'train' or 'test[:50%]'.")
  if parts[0].name not in SPLITS:
    raise UserError(f"text corpus: split {spec!r} names {parts[0].name!r}; "
                    f"the corpus has {list(SPLITS)}.")
  return parts[0].name, parts[0]


def text_source(root: str, split: str, max_len: int, *, packed: bool = True,
                pattern: str = "*.py", heldout_fraction: float = 0.05,
                pad_multiple: int = 16, buckets=None, seed: int = 0,
                skip_dirs: tuple = SKIP_DIRS) -> Source:
  """The Source of `split` ("train", "test", or a slice such as
  "train[:10%]") of the text files under `root`. Its gather returns
  features {"tokens", "segment_ids", "positions"} and labels {"targets",
  "weights"} (trainer.data.sequence), [B, max_len] when packed, else
  [B, padded length of the batch]."""
  if not 0.0 < heldout_fraction < 1.0:
    raise UserError(f"text corpus: heldout_fraction ({heldout_fraction}) "
                    "must be between 0 and 1.")
  name, part = _select(split)
  corpus = list_corpus(os.path.abspath(root), pattern, tuple(skip_dirs))
  held = np.asarray([is_heldout(p, heldout_fraction) for p in corpus.paths])
  files = np.flatnonzero(held if name == "test" else ~held)
  if not len(files):
    raise UserError(f"text corpus {root!r}: none of its {len(corpus.paths)} "
                    f"files falls in split {name!r} at heldout_fraction "
                    f"{heldout_fraction}; add files or change the fraction.")
  paths = [corpus.paths[f] for f in files]
  sizes = corpus.sizes[files].tolist()
  keys = [_hash_unit(f"pack:{seed}:{p}") for p in paths] if packed else None
  try:
    return documents.documents_source(
        f"text:{split}", corpus.sizes[files] + 2,
        lambda doc, start, end: _read_tokens(corpus.root, paths[doc],
                                             sizes[doc], start, end),
        max_len, PAD, packed=packed, pad_multiple=pad_multiple,
        buckets=buckets, order_keys=keys, part=part,
        where=lambda doc: os.path.join(corpus.root, paths[doc]))
  except ValueError as e:
    raise UserError(f"text corpus {root!r}: {e}") from None
