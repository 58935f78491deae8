"""Variable-length token sequences as batches: padding, packing, masks.

Pure functions. A "document" is a token array of n + 1 tokens; it gives n
prediction slots: inputs doc[:-1], targets doc[1:]. Every batch these build
is the same dict of [rows, length] arrays:

  tokens       int32   inputs (pad_id where nothing)
  targets      int32   the next token of each input's own document
  weights      float32 1 on real target slots, 0 on padding
  segment_ids  int32   1, 2, ... per document in the row, 0 on padding
  positions    int32   0, 1, ... restarting at each document, 0 on padding

so a loss takes `ctx.scale_loss(per_token, weights=weights,
mean_over="weights")` and a model feeds `attention_mask(segment_ids)` to
its attention and `positions` to its position embedding: neither attention
nor position crosses a document.

Padding makes a batch as long as its longest document rounded up to a
multiple (or the smallest bucket that holds it): a step then sees a few
shapes, never one per batch. Packing puts several documents in one row of
fixed length; which documents share a row is a pure function of their
lengths (pack_rows), so a row's content never depends on who asks for it.
"""

import numpy as np

KEYS = ("tokens", "targets", "weights", "segment_ids", "positions")


def padded_length(longest: int, multiple: int = 16, buckets=None) -> int:
  """The length a batch whose longest document has `longest` slots is padded
  to: the smallest of `buckets` that holds it, else `longest` rounded up to
  a multiple of `multiple`."""
  if longest < 1:
    raise ValueError(f"a batch needs a document of at least 2 tokens "
                     f"(longest has {longest} prediction slots).")
  if buckets:
    for bucket in sorted(buckets):
      if bucket >= longest:
        return int(bucket)
    raise ValueError(f"a document of {longest} prediction slots is longer "
                     f"than the largest bucket {max(buckets)}: add a bucket "
                     "or cut documents shorter.")
  return -(-longest // multiple) * multiple


def _empty(rows: int, length: int, pad_id: int) -> dict:
  return {"tokens": np.full([rows, length], pad_id, np.int32),
          "targets": np.full([rows, length], pad_id, np.int32),
          "weights": np.zeros([rows, length], np.float32),
          "segment_ids": np.zeros([rows, length], np.int32),
          "positions": np.zeros([rows, length], np.int32)}


def _put(batch: dict, row: int, at: int, doc: np.ndarray, segment: int) -> int:
  """Writes `doc`'s slots into `row` from column `at`; returns the next one."""
  n = len(doc) - 1
  if n < 1:
    raise ValueError(f"a document needs at least 2 tokens (got {len(doc)}).")
  end = at + n
  batch["tokens"][row, at:end] = doc[:-1]
  batch["targets"][row, at:end] = doc[1:]
  batch["weights"][row, at:end] = 1.0
  batch["segment_ids"][row, at:end] = segment
  batch["positions"][row, at:end] = np.arange(n)
  return end


def pad_batch(docs, pad_id: int, multiple: int = 16, buckets=None) -> dict:
  """One document a row, padded to padded_length of the longest."""
  length = padded_length(max(len(d) - 1 for d in docs), multiple, buckets)
  batch = _empty(len(docs), length, pad_id)
  for row, doc in enumerate(docs):
    _put(batch, row, 0, np.asarray(doc), 1)
  return batch


def pack_rows(lengths, row_len: int) -> np.ndarray:
  """Greedy next-fit packing of documents, in the given order, into rows of
  `row_len` slots: a row takes consecutive documents while they fit.
  `lengths`: prediction slots of each document (tokens - 1), each in
  [1, row_len]. Returns int64 `first` [rows + 1]: row r holds documents
  first[r] .. first[r + 1] - 1. Depends on the lengths only.

  >>> pack_rows([3, 4, 2, 8], row_len=8).tolist()   # rows: [0, 1], [2], [3]
  [0, 2, 3, 4]
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and (lengths.min() < 1 or lengths.max() > row_len):
    raise ValueError(f"documents must have 1..{row_len} prediction slots to "
                     f"pack into rows of {row_len} (got {lengths.min()}.."
                     f"{lengths.max()}); cut them first.")
  first, fill = [0], 0
  for i, n in enumerate(lengths.tolist()):
    if fill + n > row_len:
      first.append(i)
      fill = 0
    fill += n
  if lengths.size:
    first.append(len(lengths))
  return np.asarray(first, np.int64)


def packed_batch(rows_of_docs, row_len: int, pad_id: int) -> dict:
  """Rows of `row_len` slots, row r holding the documents rows_of_docs[r]
  one after another (segments 1, 2, ...), the rest padding."""
  batch = _empty(len(rows_of_docs), row_len, pad_id)
  for row, docs in enumerate(rows_of_docs):
    at = 0
    for segment, doc in enumerate(docs, start=1):
      if at + len(doc) - 1 > row_len:
        raise ValueError(f"row {row}: its documents need more than "
                         f"{row_len} slots.")
      at = _put(batch, row, at, np.asarray(doc), segment)
  return batch


def attention_mask(segment_ids, causal: bool = True):
  """bool [B, T, T] from segment ids [B, T]: query i may attend to key j
  only within its own segment (and j <= i when causal). Padding (segment 0)
  attends to padding only, so no query row is empty (an all-masked softmax
  row is NaN or uniform depending on the layer); nothing real attends to
  it. Keras ops: usable on symbolic inputs inside a functional model."""
  from keras import ops
  same = ops.equal(ops.expand_dims(segment_ids, -1),
                   ops.expand_dims(segment_ids, -2))
  if not causal:
    return same
  # Column numbers from a cumulative sum, not arange(T): T is unknown
  # (None) on a functional model's symbolic input.
  index = ops.cumsum(ops.ones_like(segment_ids), axis=-1)
  lower = ops.greater_equal(ops.expand_dims(index, -1),
                            ops.expand_dims(index, -2))
  return ops.logical_and(same, lower)
