"""A folder's listing kept on disk between runs, so that a start-up reads
it back instead of listing every file again (image_folder: ~2 us a file,
2.6 s for an ImageNet-size folder, on every start, resume and evaluation).

Valid while every directory the listing walked keeps the modification time
it had: adding, removing or renaming a file or sub-folder changes its parent
directory's mtime (POSIX), so checking one stat per DIRECTORY (not per
file) finds any change to the listing. A file rewritten in place does not
change the listing; it is read, and checked, when used.

A listing is saved only when no directory was modified within SETTLE_S
before the listing began: a change in the same timestamp granule as the
listing (1-2 s on some file systems) could otherwise leave a stale listing
that looks valid (git's "racy clean" entries). Such a folder is listed
again at the next start, and saved then.

One .npz of plain arrays (bytes, ints), read with allow_pickle=False: no code
runs from the cache. Written to a temporary file and renamed into place, so
processes sharing the cache never see half a file. Anything wrong with a
cached file (unreadable, another layout, another folder) makes it a miss.
"""

import hashlib
import os
import tempfile
import time
import zipfile

import numpy as np
from absl import logging

# Bump when what a listing holds or how it is ordered changes.
_VERSION = 1
SETTLE_S = 2.0
NONE = "none"


def location(cache_dir: str) -> str | None:
  """--data_cache_dir -> the directory to use, or None (caching off).
  Empty: $XDG_CACHE_HOME/trainer, else ~/.cache/trainer."""
  if cache_dir == NONE:
    return None
  if cache_dir:
    return cache_dir
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "trainer")


def mtimes(dirs) -> np.ndarray:
  """int64 st_mtime_ns of each directory (-1: gone)."""
  out = np.empty(len(dirs), np.int64)
  for i, d in enumerate(dirs):
    try:
      out[i] = os.stat(d).st_mtime_ns
    except OSError:
      out[i] = -1
  return out


def _file(cache_dir: str, kind: str, root: str) -> str:
  key = hashlib.sha256(os.fsencode(root)).hexdigest()[:24]
  return os.path.join(cache_dir, f"{kind}-{key}.npz")


def load(cache_dir: str | None, kind: str, root: str) -> dict | None:
  """The arrays saved for `root`, or None when there are none, or they are
  not for this folder, or a directory changed since."""
  if cache_dir is None:
    return None
  path = _file(cache_dir, kind, root)
  try:
    with np.load(path, allow_pickle=False) as saved:
      if (int(saved["version"]) != _VERSION
          or bytes(saved["root"]) != os.fsencode(root)):
        return None
      dirs = [os.path.join(os.fsencode(root), d) for d in saved["dirs"]]
      if not np.array_equal(mtimes(dirs), saved["mtimes"]):
        return None
      return {k: saved[k] for k in saved.files}
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
    logging.warning("ignoring the unreadable listing cache %s (%s); listing "
                    "the folder again.", path, e)
    return None


def save(cache_dir: str | None, kind: str, root: str, dirs: list[str],
         dir_mtimes: np.ndarray, started_s: float, arrays: dict) -> bool:
  """Saves `arrays` (name -> numeric or bytes array) as the listing of
  `root`, valid while `dirs` (below root) keep `dir_mtimes` (taken before
  each was listed). Skipped, returning False, when caching is off, a
  directory was still changing (see the module doc) or the cache cannot
  be written (logged once; the run goes on, listing at each start)."""
  if cache_dir is None or not len(dirs):
    return False
  if (dir_mtimes < 0).any() or dir_mtimes.max() > (started_s - SETTLE_S) * 1e9:
    return False
  prefix = os.path.join(os.fsencode(root), b"")
  rel = [os.fsencode(d)[len(prefix):] for d in dirs]
  try:
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, version=np.int64(_VERSION), root=np.bytes_(os.fsencode(root)),
                 dirs=np.array(rel, dtype=np.bytes_), mtimes=dir_mtimes,
                 **arrays)
      os.replace(tmp, _file(cache_dir, kind, root))
    except BaseException:
      os.unlink(tmp)
      raise
  except OSError as e:
    logging.warning("cannot write the listing cache in %s (%s): the folder "
                    "is listed at every start (--data_cache_dir).",
                    cache_dir, e)
    return False
  _forget_gone(cache_dir, kind)
  return True


def _forget_gone(cache_dir: str, kind: str) -> None:
  """Deletes the listings of folders that no longer exist, so that the
  cache does not fill up with those of deleted (e.g. temporary) folders.
  Runs only when a listing is saved; a few small reads per cached folder."""
  for name in os.listdir(cache_dir):
    if not (name.startswith(kind + "-") and name.endswith(".npz")):
      continue
    path = os.path.join(cache_dir, name)
    try:
      with np.load(path, allow_pickle=False) as saved:
        root = bytes(saved["root"])
      if not os.path.isdir(root):
        os.unlink(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
      continue   # someone else's, or being replaced: left alone


def now() -> float:
  """The wall-clock time a listing begins (file mtimes are wall-clock)."""
  return time.time()
