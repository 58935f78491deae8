"""The IDX file format of MNIST and Fashion-MNIST, plain or gzip-compressed.

Layout: 2 zero bytes, a type byte (0x08 = unsigned byte), a rank byte, then
`rank` big-endian uint32 dimensions, then the data in C order. So images are
magic 0x00000803 = 2051 with dims (N, 28, 28); labels 0x00000801 = 2049, (N,).
"""

import functools
import gzip
import os
import struct
import zlib

import numpy as np

from trainer.errors import UserError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


def read(path: str, magic: int) -> np.ndarray:
  """uint8 array of the IDX file at `path`, which must carry `magic`."""
  st = os.stat(path)
  # The key includes mtime and size so that a file replaced in place (tests,
  # a re-download) is parsed again; train and eval splits share one parse.
  return _read_cached(path, st.st_mtime_ns, st.st_size, magic)


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int, size: int, magic: int) -> np.ndarray:
  del mtime_ns, size  # cache key only
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        data = f.read()
    else:
      with open(path, "rb") as f:
        data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    # gzip raises BadGzipFile (an OSError) or EOFError on a cut download.
    raise UserError(f"cannot read {path}: {e}; download it again.") from None
  if len(data) < 4:
    raise UserError(f"{path} is not an IDX file (only {len(data)} bytes); "
                    "download it again.")
  found = struct.unpack(">I", data[:4])[0]
  if found != magic:
    raise UserError(
        f"{path}: IDX magic number {found}, expected {magic} "
        f"({'images' if magic == IMAGES_MAGIC else 'labels'}); is it the "
        "right file (and gunzipped if it does not end in .gz)?")
  rank = data[3]
  header = 4 + 4 * rank
  dims = struct.unpack(f">{rank}I", data[4:header])
  expected = int(np.prod(dims, dtype=np.int64))
  if len(data) - header != expected:
    raise UserError(
        f"{path}: header says {'x'.join(map(str, dims))} = {expected} bytes "
        f"of data but the file holds {len(data) - header}; it is truncated "
        "or damaged, download it again.")
  array = np.frombuffer(data, np.uint8, offset=header).reshape(dims)
  array.flags.writeable = False  # shared by every caller of the cache
  return array
