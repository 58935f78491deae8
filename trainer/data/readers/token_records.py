"""Documents of token ids in ArrayRecord files, written once, read by number.

A record holds one document's tokens as little-endian int32 bytes (nothing
to parse); documents longer than `record_slots` + 1 tokens are cut into
records overlapping by one token, so each prediction is still made once and
a piece's look-up reads at most one 4 KiB record (default 1024 slots). The last
record of every file is its index: MAGIC, then the int64 token count of
each record before it. A reader opens the files and reads those indexes
only (O(documents) numbers), and packs or pads exactly as the text source
does (trainer.data.documents).
"""

import os

import numpy as np

from trainer.data import documents, splits
from trainer.data.source import Source
from trainer.errors import UserError

MAGIC = b"trainer-token-index-v1\x00"
SUFFIX = ".array_record"
# group_size:1: one record a chunk, so a look-up reads one record. zstd
# stays on: the Python sources as int32 bytes, 30 MB of text, took 20 MB
# at 1024 slots a record and 1.6 ms per 64 random rows of 128 (4096 slots:
# 15 MB, 3.9 ms; uncompressed: 123 MB, 1.0 ms; text files read directly:
# 1.1-1.2 ms), on a loaded 2-core machine.
_OPTIONS = "group_size:1"


def cut(tokens: np.ndarray, record_slots: int) -> list:
  """`tokens` as consecutive windows of at most record_slots + 1 tokens
  overlapping by one (every next-token prediction in exactly one)."""
  n = len(tokens)
  return [tokens[s:s + record_slots + 1]
          for s in range(0, max(n - 1, 1), record_slots)]


def write_shard(docs, path: str, record_slots: int = 1024) -> int:
  """Writes `docs` (1-D int arrays of at least 2 tokens each) to one
  ArrayRecord file at `path` (under a temporary name until complete: a
  crash never leaves a truncated file that a reader's glob matches).
  Returns the number of records before the index."""
  from array_record.python import array_record_module
  lengths = []
  writer = array_record_module.ArrayRecordWriter(path + ".tmp", _OPTIONS)
  try:
    for doc in docs:
      doc = np.asarray(doc)
      if doc.ndim != 1 or len(doc) < 2:
        raise ValueError(f"a document must be 1-D with at least 2 tokens "
                         f"(got shape {doc.shape}).")
      if doc.min() < 0 or doc.max() > np.iinfo(np.int32).max:
        raise ValueError("token ids must fit in int32 and be >= 0.")
      for piece in cut(doc, record_slots):
        writer.write(np.ascontiguousarray(piece, "<i4").tobytes())
        lengths.append(len(piece))
    writer.write(MAGIC + np.asarray(lengths, "<i8").tobytes())
  finally:
    writer.close()
  os.replace(path + ".tmp", path)
  return len(lengths)


def _open(path: str):
  """(reader, token counts of its records) of one file written by
  write_shard."""
  from array_record.python import array_record_module
  fix = ("write it with python -m trainer.convert --text_corpus=DIR or "
         "trainer.data.readers.token_records.write_shard")
  try:
    reader = array_record_module.ArrayRecordReader(path,
                                                   "readahead_buffer_size:0")
    ok = reader.ok() and reader.num_records() > 0
  except Exception as e:  # noqa: BLE001 - the C++ reader raises several types
    raise UserError(f"cannot open {path} as an ArrayRecord file "
                    f"({type(e).__name__}: {e}); {fix}.") from None
  index = reader.read(reader.num_records() - 1,
                      reader.num_records())[0] if ok else b""
  if not index.startswith(MAGIC):
    raise UserError(f"{path} has no token index as its last record (not a "
                    f"token file, or damaged); {fix}.")
  lengths = np.frombuffer(index[len(MAGIC):], "<i8").astype(np.int64)
  if len(lengths) != reader.num_records() - 1:
    raise UserError(f"{path}: its index lists {len(lengths)} records, the "
                    f"file holds {reader.num_records() - 1}; {fix}.")
  return reader, lengths


def _order_keys(count: int, seed: int) -> np.ndarray:
  """A fixed pseudo-random number per record (splitmix64 of its number and
  the seed): the order last pieces are packed in, the same everywhere."""
  with np.errstate(over="ignore"):
    x = (np.arange(count, dtype=np.uint64)
         + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def token_source(files, max_len: int, pad_id: int, *, packed: bool = True,
                 pad_multiple: int = 16, buckets=None, seed: int = 0,
                 part: str = "all", name: str = "tokens") -> Source:
  """A Source over the documents of `files` (read in sorted order), cut,
  padded or packed as trainer.data.documents says. pad_id: a token id the
  documents' vocabulary reserves for padding. part: "all" or a slice of the
  examples, e.g. "all[:10%]"."""
  files = sorted(files)
  if not files:
    raise UserError(f"{name}: no token files given; write them with python "
                    "-m trainer.convert --text_corpus=DIR.")
  try:
    chosen = splits.parse(part)
  except ValueError as e:
    raise UserError(f"{name}: {e}") from None
  if len(chosen) != 1 or chosen[0].name != "all":
    raise UserError(f"{name}: part {part!r} must be 'all' or one slice of "
                    "it, e.g. 'all[:10%]'.")
  opened = [_open(f) for f in files]
  readers = [r for r, _ in opened]
  lengths = np.concatenate([n for _, n in opened])
  starts = np.cumsum([0] + [len(n) for _, n in opened])

  def locate(doc: int) -> tuple[int, int]:
    f = int(np.searchsorted(starts, doc, side="right")) - 1
    return f, doc - int(starts[f])

  def read(doc: int, start: int, end: int) -> np.ndarray:
    f, k = locate(doc)
    data = readers[f].read(k, k + 1)
    if len(data) != 1 or len(data[0]) != 4 * int(lengths[doc]):
      raise ValueError(f"{files[f]} record {k}: not the {lengths[doc]} "
                       "tokens its index lists (damaged or replaced file).")
    return np.frombuffer(data[0], "<i4")[start:end].astype(np.int32)

  def where(doc: int) -> str:
    f, k = locate(doc)
    return f"{files[f]} record {k}"

  try:
    return documents.documents_source(
        f"{name}:{part}", lengths, read, max_len, pad_id, packed=packed,
        pad_multiple=pad_multiple, buckets=buckets,
        order_keys=_order_keys(len(lengths), seed), part=chosen[0],
        where=where)
  except ValueError as e:
    raise UserError(f"{name}: {e}") from None
