"""One training run per --model_dir: an exclusive lock held for the run's life.

Two trainers on one directory silently interleave checkpoints, events and
config.json, so the chief of a training run takes an exclusive flock on
MODEL_DIR/.trainer.lock and writes who holds it (host, PID, since when).
A second trainer exits 2 naming the holder. The kernel drops a flock when
its process dies, however it dies: a lock file whose lock is free is stale
(its writer was SIGKILLed) and is taken over with a warning. Evaluation
(`--mode=eval`/`continuous_eval`) only reads and takes no lock (so it works
on read-only storage), and non-chief workers do not take it (their chief
holds it for the cluster). A directory the lock cannot be written in
(read-only storage) or a file in place of the directory is exit 2, one line.
Remote paths (gs://, hdfs://) cannot be flocked: no lock there, with a note.
"""

import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

from trainer.errors import UserError

LOCK_NAME = ".trainer.lock"
# Locks held by this process, for release_all() before an os._exit.
_HELD = []


class ModelDirLock:
  """Context manager: acquire() on enter, release() on exit."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, LOCK_NAME)
    self._fd = None
    self._created = []   # directories this lock created, deepest last

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def acquire(self) -> None:
    self._make_dirs()
    try:
      self._take()
    except BaseException:
      self._remove_created_dirs()
      raise

  def _take(self) -> None:
    # The holder unlinks the file when it releases: if the file we locked
    # is no longer the one at `path`, try again on the new one.
    for _ in range(100):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        # Read-only storage or a file in the way: a restart cannot help.
        raise UserError(f"cannot write in --model_dir={self.model_dir} "
                        f"({e.strerror}: {self.path}); training needs a "
                        "writable directory (evaluation, trainer.load and "
                        "export only read).") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = _describe(_read(fd))
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
          raise UserError(f"cannot lock --model_dir={self.model_dir} "
                          f"({e.strerror}); use a local directory.") from None
        raise UserError(
            f"--model_dir={self.model_dir} is in use by another trainer "
            f"({holder}); wait for it to end, stop it, or use another "
            "--model_dir.") from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      previous = _read(fd)
      if previous != {}:   # written by a process that is gone (or garbled)
        logging.warning("taking over a stale lock on --model_dir=%s left by "
                        "%s, which is no longer running.", self.model_dir,
                        _describe(previous))
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
      os.fsync(fd)
      self._fd = fd
      _HELD.append(self)
      return
    raise UserError(f"could not lock --model_dir={self.model_dir}: the lock "
                    "file kept changing; is another trainer starting there?")

  def release(self) -> None:
    if self in _HELD:
      _HELD.remove(self)
    if self._fd is not None:
      try:
        os.unlink(self.path)   # before unlocking: nobody locks a dead file
      except FileNotFoundError:
        pass
      os.close(self._fd)
      self._fd = None
    self._remove_created_dirs()

  def _make_dirs(self) -> None:
    missing, d = [], os.path.abspath(self.model_dir)
    while not os.path.isdir(d):
      if os.path.lexists(d):
        raise UserError(f"--model_dir={self.model_dir}: {d} is a file, not "
                        "a directory; give a directory (new or a run's).")
      missing.append(d)
      d = os.path.dirname(d)
    for d in reversed(missing):
      try:
        os.mkdir(d)
        self._created.append(d)
      except FileExistsError:
        pass
      except OSError as e:
        raise UserError(f"cannot create --model_dir={self.model_dir} "
                        f"({e.strerror}: {d}); choose a writable "
                        "directory.") from None

  def _remove_created_dirs(self) -> None:
    """A run that wrote nothing leaves no directory behind."""
    for d in reversed(self._created):
      try:
        os.rmdir(d)
      except OSError:
        break   # not empty: the run wrote something
    self._created = []


def held_paths() -> list[str]:
  """What a process that SIGKILLs this one should remove for it (the start-up
  watchdog): each held lock file, then the directories its lock created,
  deepest first (removed only if empty)."""
  paths = []
  for lock in _HELD:
    paths.append(lock.path)
    paths.extend(reversed(lock._created))
  return paths


def release_all() -> None:
  """Releases every lock of this process: for exits that skip `finally`
  (os._exit), so the next run finds no stale lock."""
  for lock in list(_HELD):
    lock.release()


class _NoLock:
  """What processes that must not lock hold: nothing."""

  def acquire(self):
    pass

  def release(self):
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


def for_run(model_dir: str, mode: str, is_chief: bool):
  """The lock a process of this run must hold: the chief's, when training."""
  if mode not in ("train", "train_and_eval") or not is_chief:
    return _NoLock()
  if "://" in model_dir:
    logging.info("--model_dir=%s is remote: not locked; make sure one "
                 "trainer at a time writes there.", model_dir)
    return _NoLock()
  return ModelDirLock(model_dir)


def _me() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now(datetime.timezone.utc)
                   .strftime("%Y-%m-%dT%H:%M:%SZ")}


def _read(fd: int) -> dict | None:
  """The holder written in the lock file; {} if empty, None if garbled."""
  raw = os.pread(fd, 4096, 0)
  if not raw.strip():
    return {}
  try:
    data = json.loads(raw.decode("utf-8", "replace"))
  except ValueError:
    return None
  return data if isinstance(data, dict) else None


def _describe(holder: dict | None) -> str:
  if not holder:
    return "holder unknown: the lock file is empty or unreadable"
  return (f"host {str(holder.get('host', '?'))[:100]}, PID "
          f"{str(holder.get('pid', '?'))[:20]}, since "
          f"{str(holder.get('since', '?'))[:40]}")
