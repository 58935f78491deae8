"""A folder of text files as byte-level token sequences, read lazily.

Tokens are bytes 0-255 plus BOS, EOS and PAD (VOCAB_SIZE 259): no tokenizer
to download. A file of s bytes is the document BOS, its bytes, EOS (s + 1
prediction slots), cut into pieces of at most `max_len` slots that overlap
by one token, so every next-byte prediction of the file is in exactly one
piece. Empty files are left out.

Start-up lists the folder and stats each file; nothing is read until a batch
asks for it, and everything kept is O(files), never O(bytes): example
index -> (file, piece) is a search in cumulative piece counts. A file is
held out (split "test") when a hash of its relative path says so, so the
split is stable across machines, runs and new files elsewhere in the
folder.

Two layouts (see trainer.data.sequence for the batch dict):
- padded (packed=False): one piece an example; a batch is padded to its
  longest piece rounded up to `pad_multiple` (or a bucket);
- packed (packed=True): one row of `max_len` slots an example. Whole pieces
  (a file's full-length ones) are rows alone; the shorter last piece of
  every file is packed with others, next-fit, in an order hashed from
  (seed, path). Which pieces share a row is fixed by the file sizes and
  seed alone, and the pipeline orders rows by (seed, epoch, position), so
  a global batch's rows do not depend on replicas, workers or resume.
"""

import dataclasses
import fnmatch
import functools
import hashlib
import os

import numpy as np
import tensorflow as tf

from trainer.data import sequence, splits
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


def piece_bytes(k: int, size: int, max_len: int):
  """Piece k of a file of `size` bytes: (first byte, end byte, starts with
  BOS, ends with EOS). Tokens of the file are t = 0 (BOS), 1..size (byte
  t - 1), size + 1 (EOS); piece k holds tokens [k L, min(k L + L + 1,
  size + 2))."""
  start = k * max_len
  return (max(start - 1, 0), min(start + max_len, size), start == 0,
          start + max_len >= size + 1)


def _read_piece(root: str, path: str, size: int, k: int,
                max_len: int) -> np.ndarray:
  first, end, bos, eos = piece_bytes(k, size, max_len)
  full = os.path.join(root, path)
  fd = os.open(full, os.O_RDONLY)
  try:
    now = os.fstat(fd).st_size
    data = os.pread(fd, end - first, first) if end > first else b""
  finally:
    os.close(fd)
  if now != size or len(data) != end - first:
    # Pieces were planned from the listed sizes: reading a changed file
    # would silently shift every later piece and break exact resume.
    raise ValueError(f"{full} has {now} bytes, {size} when the corpus was "
                     "listed; the corpus changed under the run: restart it.")
  tokens = np.frombuffer(data, np.uint8).astype(np.int32)
  return np.concatenate([[BOS]] * bos + [tokens] + [[EOS]] * eos).astype(
      np.int32)


class _Pieces:
  """Example index -> the (file, piece) pairs it is made of."""

  def __init__(self, sizes: np.ndarray, max_len: int, packed: bool,
                 order_keys):
    slots = sizes + 1
    if not packed:
      self.counts = -(-slots // max_len)
      self.starts = np.concatenate([[0], np.cumsum(self.counts)])
      self.num_full, self.tail_first = 0, None
    else:
      self.counts = slots // max_len       # full pieces, a row each
      self.starts = np.concatenate([[0], np.cumsum(self.counts)])
      tails = np.flatnonzero(slots % max_len)
      self.tail_files = tails[np.argsort(
          np.asarray([order_keys[i] for i in tails]), kind="stable")]
      self.tail_first = sequence.pack_rows(
          slots[self.tail_files] % max_len, max_len)
      self.num_full = int(self.starts[-1])
    self.packed = packed

  def __len__(self) -> int:
    if not self.packed:
      return int(self.starts[-1])
    return self.num_full + len(self.tail_first) - 1

  def of(self, index: int) -> list:
    if not self.packed or index < self.num_full:
      f = int(np.searchsorted(self.starts, index, side="right")) - 1
      return [(f, index - int(self.starts[f]))]
    row = index - self.num_full
    files = self.tail_files[self.tail_first[row]:self.tail_first[row + 1]]
    return [(int(f), int(self.counts[f])) for f in files]


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
  if max_len < 2:
    raise UserError(f"text corpus: max_len ({max_len}) must be at least 2.")
  if not 0.0 < heldout_fraction < 1.0:
    raise UserError(f"text corpus: heldout_fraction ({heldout_fraction}) "
                    "must be between 0 and 1.")
  if pad_multiple < 1:
    raise UserError(f"text corpus: pad_multiple ({pad_multiple}) must be "
                    ">= 1.")
  if buckets and max(buckets) < max_len:
    raise UserError(f"text corpus: the largest bucket ({max(buckets)}) must "
                    f"hold max_len ({max_len}) slots.")
  name, part = _select(split)
  corpus = list_corpus(os.path.abspath(root), pattern, tuple(skip_dirs))
  held = np.asarray([is_heldout(p, heldout_fraction) for p in corpus.paths])
  files = np.flatnonzero(held if name == "test" else ~held)
  if not len(files):
    raise UserError(f"text corpus {root!r}: none of its {len(corpus.paths)} "
                    f"files falls in split {name!r} at heldout_fraction "
                    f"{heldout_fraction}; add files or change the fraction.")
  keys = ([_hash_unit(f"pack:{seed}:{corpus.paths[f]}") for f in files]
          if packed else None)
  pieces = _Pieces(corpus.sizes[files], max_len, packed, keys)
  chosen = splits.indices(part, len(pieces))
  if not chosen.size:
    raise UserError(f"text corpus: split {split!r} selects none of the "
                    f"{len(pieces)} examples of {name!r}.")
  first, end = int(chosen[0]), int(chosen[-1]) + 1
  paths = [corpus.paths[f] for f in files]
  sizes = corpus.sizes[files].tolist()

  def docs_of(index: int) -> list:
    return [_read_piece(corpus.root, paths[f], sizes[f], k, max_len)
            for f, k in pieces.of(first + index)]

  def pick(indices):
    rows = [docs_of(int(i)) for i in indices]
    if packed:
      batch = sequence.packed_batch(rows, max_len, PAD)
    else:
      batch = sequence.pad_batch([r[0] for r in rows], PAD, pad_multiple,
                                 buckets)
    return [batch[k] for k in sequence.KEYS]

  length = max_len if packed else None
  dtypes = [tf.int32, tf.int32, tf.float32, tf.int32, tf.int32]

  def gather(indices):
    found = tf.numpy_function(pick, [indices], dtypes, stateful=False)
    batch = {k: tf.ensure_shape(t, [None, length])
             for k, t in zip(sequence.KEYS, found)}
    features = {k: batch[k] for k in ("tokens", "segment_ids", "positions")}
    return features, {k: batch[k] for k in ("targets", "weights")}

  def describe(index: int) -> str:
    parts = []
    for f, k in pieces.of(first + index):
      lo, hi, _, _ = piece_bytes(k, sizes[f], max_len)
      parts.append(f"{os.path.join(corpus.root, paths[f])} bytes {lo}-{hi}")
    return "; ".join(parts)

  spec = lambda dtype: tf.TensorSpec([length], dtype)  # noqa: E731
  return Source(
      name=f"text:{split}",
      num_examples=end - first,
      gather=gather,
      feature_spec={"tokens": spec(tf.int32), "segment_ids": spec(tf.int32),
                    "positions": spec(tf.int32)},
      label_spec={"targets": spec(tf.int32), "weights": spec(tf.float32)},
      describe=describe)
