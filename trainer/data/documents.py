"""Documents of token ids as a random-access Source: cut, padded or packed.

A document of n tokens has n - 1 prediction slots. It is cut into pieces of
at most `max_len` slots that overlap by one token (piece k: tokens
[k L, min(k L + L + 1, n))), so each of its predictions is in exactly one
piece. Everything here is planned from document LENGTHS alone, held as
O(documents) arrays: example index -> (document, piece) is a search in
cumulative piece counts, and nothing is read until a batch asks for it.

Two layouts (the batch dict of trainer.data.sequence):
- padded (packed=False): one piece an example; a batch is padded to its
  longest piece rounded up to `pad_multiple` (or a bucket);
- packed (packed=True): one row of `max_len` slots an example. Full-length
  pieces are rows alone; the shorter last piece of each document is packed
  with others (sequence.pack_rows, next-fit) in the order of `order_keys`.
  Which pieces share a row is fixed by the lengths and keys alone, and the
  pipeline orders rows by (seed, epoch, position): a global batch's rows do
  not depend on replicas, workers, how many rows a call asks for, or resume.
"""

import numpy as np
import tensorflow as tf

from trainer.data import sequence, splits
from trainer.data.source import Source


def piece_range(k: int, length: int, max_len: int) -> tuple[int, int]:
  """Tokens [start, end) of piece k of a document of `length` tokens."""
  start = k * max_len
  return start, min(start + max_len + 1, length)


class Pieces:
  """Example index -> the (document, piece) pairs it is made of."""

  def __init__(self, lengths, max_len: int, packed: bool, order_keys=None):
    slots = np.asarray(lengths, np.int64) - 1
    if slots.size and slots.min() < 1:
      raise ValueError("every document needs at least 2 tokens (found one "
                       f"of {slots.min() + 1}).")
    self.packed = packed
    # Packed: only full pieces are rows alone; a document's shorter last
    # piece is packed with others below.
    self.counts = slots // max_len if packed else -(-slots // max_len)
    self.starts = np.concatenate([[0], np.cumsum(self.counts)])
    self.num_alone = int(self.starts[-1])
    self.tails = self.first = np.zeros(1, np.int64)
    if packed:
      tails = np.flatnonzero(slots % max_len)
      keys = np.asarray(order_keys)[tails] if order_keys is not None else tails
      self.tails = tails[np.argsort(keys, kind="stable")]
      self.first = sequence.pack_rows(slots[self.tails] % max_len, max_len)

  def __len__(self) -> int:
    return self.num_alone + len(self.first) - 1

  def of(self, index: int) -> list:
    if index < self.num_alone:
      doc = int(np.searchsorted(self.starts, index, side="right")) - 1
      return [(doc, index - int(self.starts[doc]))]
    row = index - self.num_alone
    docs = self.tails[self.first[row]:self.first[row + 1]]
    return [(int(d), int(self.counts[d])) for d in docs]


def documents_source(name: str, lengths, read, max_len: int, pad_id: int, *,
                     packed: bool = True, pad_multiple: int = 16,
                     buckets=None, order_keys=None, part=None,
                     where=None) -> Source:
  """A Source over documents of `lengths` tokens.

  read(doc, start, end) -> int array of tokens [start, end) of document
  `doc` (called inside the tf.data map, on the host). pad_id: the token
  that fills padding (weight 0 wherever it is). order_keys: one number per
  document, the order in which last pieces are packed (default: document
  order). part: a splits.SplitPart whose slice of the pieces (or rows)
  to expose, e.g. "train[:10%]"; default all. where(doc) -> str names a
  document in error messages. Its gather returns features {"tokens",
  "segment_ids", "positions"} and labels {"targets", "weights"},
  [B, max_len] when packed, else [B, padded length of the batch].
  """
  if max_len < 1:
    raise ValueError(f"max_len ({max_len}) must be at least 1.")
  if pad_multiple < 1:
    raise ValueError(f"pad_multiple ({pad_multiple}) must be at least 1.")
  if buckets and max(buckets) < max_len:
    raise ValueError(f"the largest bucket ({max(buckets)}) must hold "
                     f"max_len ({max_len}) slots.")
  lengths = np.asarray(lengths, np.int64)
  pieces = Pieces(lengths, max_len, packed, order_keys)
  first, end = 0, len(pieces)
  if part is not None:
    chosen = splits.indices(part, len(pieces))
    if not chosen.size:
      raise ValueError(f"{name}: the slice selects none of its {len(pieces)} "
                       "examples.")
    first, end = int(chosen[0]), int(chosen[-1]) + 1
  where = where or (lambda doc: f"document {doc}")

  def docs_of(index: int) -> list:
    return [read(doc, *piece_range(k, int(lengths[doc]), max_len))
            for doc, k in pieces.of(first + index)]

  def pick(indices):
    rows = [docs_of(int(i)) for i in indices]
    if packed:
      batch = sequence.packed_batch(rows, max_len, pad_id)
    else:
      batch = sequence.pad_batch([r[0] for r in rows], pad_id, pad_multiple,
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
    return "; ".join(
        "{} tokens {}-{}".format(where(doc), *piece_range(
            k, int(lengths[doc]), max_len))
        for doc, k in pieces.of(first + index))

  spec = lambda dtype: tf.TensorSpec([length], dtype)  # noqa: E731
  return Source(
      name=name,
      num_examples=end - first,
      gather=gather,
      feature_spec={"tokens": spec(tf.int32), "segment_ids": spec(tf.int32),
                    "positions": spec(tf.int32)},
      label_spec={"targets": spec(tf.int32), "weights": spec(tf.float32)},
      describe=describe)
