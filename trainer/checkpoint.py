"""Checkpoints: chief-only writes, every worker saves, verified restore.

Under MultiWorkerMirroredStrategy every worker must call save() (variables
may sync on read, which takes all workers): every worker reads the state
(the snapshot), the chief writes it to --model_dir. A checkpoint's files
are written under a hidden name, fsynced and renamed in, its .index last;
the `checkpoint` pointer moves only after that, so neither names a partial
checkpoint, synchronous or background (--async_checkpoint) alike. A
checkpoint that is damaged anyway (a truncated file) is reported and the
previous one used.

The `checkpoint` index file is a convenience, not the truth: checkpoints are
found from the `ckpt-N.index` files themselves, so a deleted or garbled index
neither restarts the run from step 0 nor lets a fresh start overwrite
ckpt-N files (when none is readable the run refuses). A checkpoint deleted
between listing and restoring (an eval beside a live run with a small
--keep_checkpoints) is re-listed, never blamed on the model. A save that
runs out of space removes its partial files and raises DiskFull.
"""

import errno
import glob
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time

from absl import logging
import tensorflow as tf

from trainer import compat, exitcodes
from trainer.errors import UserError, first_line

PREFIX = "ckpt"
# Fields that define the variables in a checkpoint: restoring across a change
# of any of them fails, so say so before touching anything.
_IDENTITY = ("task", "model", "optimizer", "dataset")
# How many times a restore re-lists after a checkpoint vanished under it.
_VANISHED_RETRIES = 10


class DiskFull(Exception):
  """A checkpoint could not be written for lack of space (exit code
  exitcodes.DISK_FULL: a restart into the same full disk cannot help)."""
  exit_code = exitcodes.DISK_FULL


class Checkpointer:
  """Saves and restores `objects` (model, optimizer, state, config).

  A save copies the state of the step boundary (every value read now, to
  the host: compat.CheckpointSnapshot) and then writes it: in the calling
  thread, or with `asynchronous` in a background thread while training
  goes on. Either way the write goes to a hidden directory, is fsynced,
  and is moved in by rename (data files first, the .index file last), so
  a ckpt-N.index in --model_dir always names complete, synced files; only
  then is the `checkpoint` index rewritten (fsynced). At most one save is
  in flight: the next save, a restore and the end of training wait for it.
  """

  def __init__(self, model_dir: str, objects: dict, keep: int, is_chief: bool,
               worker_index: int, asynchronous: bool = False):
    self.model_dir = model_dir
    self.checkpoint = tf.train.Checkpoint(**objects)
    # Created now so that every snapshot holds it (CheckpointManager's
    # saves counted in it; checkpoints written before keep the key).
    self.checkpoint.save_counter  # noqa: B018 - creates the variable
    self._keep = keep
    self._is_chief = is_chief
    self._worker_index = worker_index
    self.asynchronous = asynchronous
    self._writer = None          # the background write in flight
    self._error = None           # what it raised, for wait() to raise
    self._background = 0.0
    self._released = []          # variables emptied for a restore not done

  def save(self, step: int) -> str | None:
    """Every worker calls this at the same step; returns the checkpoint's
    path (chief), which is committed on return unless `asynchronous`.
    Waits for the previous save first. Out of space: the partial files of
    this save are removed and DiskFull names the newest intact checkpoint
    (from a background write: raised by the next save() or wait())."""
    self.wait()
    self.checkpoint.save_counter.assign_add(1)
    try:
      # The reads (collective ones under multi-worker) happen here, on
      # every worker: the values of this step boundary, to the host.
      snapshot = compat.CheckpointSnapshot(self.checkpoint)
    except NotImplementedError as e:
      if self.asynchronous:
        raise UserError(f"--async_checkpoint cannot copy this model's state "
                        f"({e}): run without --async_checkpoint.") from None
      snapshot = _Live(self.checkpoint)   # read while it is written
    if not self._is_chief:
      if isinstance(snapshot, _Live):     # the reads happen in the write
        write_scratch(self.checkpoint, self._worker_index, step)
      return None   # the chief writes; nothing of a worker's is kept
    path = os.path.join(self.model_dir, f"{PREFIX}-{step}")
    if not self.asynchronous:
      self._commit(snapshot, step)
      return path
    self._writer = threading.Thread(target=self._write_in_background,
                                    args=(snapshot, step), daemon=True,
                                    name=f"checkpoint-{step}")
    self._writer.start()
    logging.info("saving checkpoint %s in the background", path)
    return path

  def wait(self) -> None:
    """Blocks until the save in flight (if any) has committed; raises what
    its write raised (DiskFull, ...)."""
    if self._writer is not None:
      self._writer.join()
      self._writer = None
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def background_seconds(self) -> float:
    """Cumulative seconds of background checkpoint writing in this process
    (0.0: every save here is synchronous, all of it blocked)."""
    return self._background

  def _write_in_background(self, snapshot, step: int) -> None:
    began = time.perf_counter()
    try:
      self._commit(snapshot, step)
    except BaseException as e:  # noqa: BLE001 - raised by wait()
      self._error = e
    finally:
      self._background += time.perf_counter() - began

  def _commit(self, snapshot, step: int) -> None:
    """Writes `snapshot` as ckpt-`step`: hidden directory, fsync, rename
    (the .index last), then the index file and the keep policy."""
    name = f"{PREFIX}-{step}"
    final = os.path.join(self.model_dir, name)
    _remove_unfinished(self.model_dir)
    staging = os.path.join(self.model_dir, f"{_STAGING}{name}.{os.getpid()}")
    try:
      snapshot.write(os.path.join(staging, name))
      files = sorted(os.listdir(staging), key=lambda f: f.endswith(".index"))
      for f in files:
        _fsync(os.path.join(staging, f))
      _delete(final)   # an earlier save of this step, if any: gone first
      for f in files:  # data files first, the .index (which lists it) last
        os.replace(os.path.join(staging, f), os.path.join(self.model_dir, f))
      _fsync(self.model_dir)
      others = [p for p in self.paths() if p != final]
      kept = others[:max(self._keep - 1, 0)]
      # Out of space here too is a failed save: its files go with it.
      _write_index(self.model_dir, final, [final, *kept])
    except (OSError, tf.errors.OpError) as e:
      if not is_disk_full(e):
        raise
      shutil.rmtree(staging, ignore_errors=True)
      _delete(final)
      intact = [p for p in self.paths() if p != final]
      raise DiskFull(
          f"no space left in --model_dir={self.model_dir} while saving "
          f"{final} (removed its partial files); the newest intact "
          f"checkpoint is {intact[0] if intact else 'none'}. Free space "
          "(or raise the quota), then run the same command to resume "
          "from it.") from None
    finally:
      shutil.rmtree(staging, ignore_errors=True)
    for old in others[len(kept):]:
      _delete(old)
    logging.info("saved checkpoint %s", final)

  def paths(self) -> list[str]:
    """Checkpoints in --model_dir, newest first: those the `checkpoint`
    index lists and every ckpt-N whose .index file exists."""
    listed = [p for p in _listed(self.model_dir)
              if os.path.exists(p + ".index")]
    return sorted(set(listed) | set(_on_disk(self.model_dir)), key=number,
                  reverse=True)

  def restore(self, record, path: str | None = None) -> str | None:
    """Restores `path`, or the newest readable checkpoint; None if none.

    A different model or optimizer in --model_dir is a UserError (nothing is
    written); a damaged checkpoint is skipped with a warning; a checkpoint
    that vanished meanwhile (deleted by a live run's keep policy) makes it
    list again. ckpt-N files none of which is readable are a UserError: a
    fresh start would overwrite them.
    """
    self.wait()
    if path:
      return self._restore_one(record, path, [], explicit=True)
    for _ in range(_VANISHED_RETRIES):
      candidates = self.paths()
      index_ok = _index_readable(self.model_dir)
      if candidates and not index_ok:
        logging.warning(
            "the `checkpoint` index file in %s is %s; looking for the "
            "newest readable checkpoint among the ckpt-N files instead.",
            self.model_dir, "unreadable" if os.path.exists(
                os.path.join(self.model_dir, "checkpoint")) else "missing")
      for i, candidate in enumerate(candidates):
        restored = self._restore_one(record, candidate, candidates[i + 1:])
        if restored is _VANISHED:
          break   # list again: newer ones may have appeared meanwhile
        if restored:
          if not index_ok and record.mode in ("train", "train_and_eval"):
            self._repair_index(restored)   # readers (eval) never write
          return restored
      else:
        if self._released:
          raise UserError(
              f"the checkpoints in --model_dir={self.model_dir} vanished "
              "while being restored, after the old values of the "
              "variables were released; start the run again.")
        if candidates:
          raise UserError(
              f"--model_dir={self.model_dir} holds checkpoints "
              f"({', '.join(os.path.basename(c) for c in candidates)}) but "
              "none of them is readable; a fresh start would overwrite "
              "them. Move them away (or use a new --model_dir) to start "
              "over.")
        return None
    raise UserError(f"checkpoints in --model_dir={self.model_dir} kept "
                    "vanishing while being restored (is a run with a small "
                    "--keep_checkpoints writing there?); try again.")

  def _restore_one(self, record, candidate: str, rest: list[str],
                   explicit: bool = False):
    """The path restored; None if damaged (warned); _VANISHED if deleted.
    explicit: the user named it (--checkpoint, or continuous_eval's pick).
    Large variables are emptied first (compat.release_for_restore: no
    process holds a variable's old and restored values at once), then read
    where they live and assigned one at a time (compat.restore_released),
    the rest read whole here (verified_config): a damaged file fails
    before the Checkpoint's restore whatever its size. That restore then
    leaves the large ones alone (compat.skipping)."""
    try:
      released = []
      try:
        compat.release_for_restore(self.checkpoint, candidate,
                                   released=released)
      finally:   # those emptied before a failure count too
        self._released += released
      compat.restore_released(released, candidate)
      saved = verified_config(candidate, skip={r.key for r in released})
    except Exception as e:  # noqa: BLE001 - any read failure is damage
      if _vanished(candidate):
        return self._vanished(candidate, explicit)
      if explicit:
        raise UserError(f"--checkpoint={candidate} could not be read "
                        f"({first_line(e)}).") from None
      _warn_damaged(candidate, e, rest)
      return None
    check_compatible(saved, record, candidate)
    try:
      with compat.skipping(released):
        status = self.checkpoint.restore(candidate)
      status.assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
      if _vanished(candidate):
        return self._vanished(candidate, explicit)
      raise UserError(
          f"{_holder(candidate, self.model_dir)} does not fit this "
          f"model/optimizer ({first_line(e)}); {_fix(candidate, self.model_dir)} "
          "the flags that wrote it.") from None
    compat.check_restored(self._released)
    self._released = []
    return candidate

  def _vanished(self, candidate: str, explicit: bool):
    if explicit:
      raise UserError(f"checkpoint {candidate} no longer exists (deleted by "
                      "the run's --keep_checkpoints policy?); pass a newer "
                      "one, or omit --checkpoint for the newest.")
    logging.warning("checkpoint %s vanished while being restored (a live "
                    "run's --keep_checkpoints deleted it?); listing again.",
                    candidate)
    return _VANISHED

  def _repair_index(self, restored: str) -> None:
    """Rewrites the `checkpoint` index from the files (chief only)."""
    if not self._is_chief:
      return
    _write_index(self.model_dir, restored, self.paths())
    logging.warning("rewrote the `checkpoint` index file in %s from the "
                    "ckpt-N files (newest readable: %s).", self.model_dir,
                    restored)


_VANISHED = object()


class _Live:
  """What a synchronous save writes when the state cannot be snapshotted
  (objects with their own registered savers): the live objects."""

  def __init__(self, checkpoint):
    self._checkpoint = checkpoint

  def write(self, prefix: str) -> None:
    self._checkpoint.write(prefix)
_CKPT_FILE = re.compile(re.escape(PREFIX) + r"-(\d+)\.index$")


def _listed(model_dir: str) -> list[str]:
  """Paths the `checkpoint` index names ([] if it is missing or garbled:
  TF then only logs a ParseError and returns None)."""
  try:
    state = tf.train.get_checkpoint_state(model_dir)
  except Exception:  # noqa: BLE001 - a damaged index is only a hint lost
    return []
  if state is None:
    return []
  paths = list(state.all_model_checkpoint_paths) or [
      state.model_checkpoint_path]
  return [p if os.path.isabs(p) else os.path.join(model_dir, p)
          for p in paths if p]


def _on_disk(model_dir: str) -> list[str]:
  found = []
  for index in glob.glob(os.path.join(glob.escape(model_dir),
                                      f"{PREFIX}-*.index")):
    if _CKPT_FILE.search(os.path.basename(index)):
      found.append(index[:-len(".index")])
  return found


def _index_readable(model_dir: str) -> bool:
  return bool(_listed(model_dir))


def _vanished(path: str) -> bool:
  return not os.path.exists(path + ".index")


def _write_index(model_dir: str, latest: str, paths: list[str]) -> None:
  """The `checkpoint` file CheckpointManager writes (text proto), atomically.
  Timestamps are the files' mtimes, later than last_preserved_timestamp, so
  the re-created manager's keep policy manages them."""
  oldest_first = sorted(paths, key=number)
  stamps = [os.path.getmtime(p + ".index") for p in oldest_first]
  lines = [f'model_checkpoint_path: "{os.path.basename(latest)}"']
  lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"'
            for p in oldest_first]
  lines += [f"all_model_checkpoint_timestamps: {t:.6f}" for t in stamps]
  lines.append(f"last_preserved_timestamp: {min(stamps + [time.time()]) - 1:.6f}")
  tmp = os.path.join(model_dir, f".checkpoint.tmp{os.getpid()}")
  try:
    with open(tmp, "w") as f:
      f.write("\n".join(lines) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(model_dir, "checkpoint"))
  except OSError:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync(model_dir)


# Where a save is written before it is moved in (never a ckpt-N.index).
_STAGING = ".saving-"


def _fsync(path: str) -> None:
  """Flushes a file, or a directory's entries, to the disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _delete(prefix: str) -> None:
  """Removes checkpoint `prefix`: its .index first (from then on it is no
  checkpoint), then its data files."""
  for path in [prefix + ".index", *glob.glob(glob.escape(prefix) + ".data-*")]:
    try:
      os.remove(path)
    except FileNotFoundError:
      pass


def _remove_unfinished(model_dir: str) -> None:
  """Removes saves a killed process left half-written (one trainer per
  --model_dir, and its own previous save has committed)."""
  for entry in glob.glob(os.path.join(glob.escape(model_dir), _STAGING + "*")):
    shutil.rmtree(entry, ignore_errors=True)


def is_disk_full(error: Exception) -> bool:
  """ENOSPC/EDQUOT, as an OSError or inside a TF error's message."""
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC,
                                                     errno.EDQUOT):
    return True
  text = str(error).lower()
  return "no space left" in text or "disk quota exceeded" in text


# trainer-worker<index>-<host>-<pid>-<random>: write_scratch's directories.
_SCRATCH = re.compile(r"trainer-worker\d+-(?P<host>.+)-(?P<pid>\d+)-[^-]*")
_scratch_swept = []


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True   # e.g. another user's process
  return True


def remove_stale_scratch(directory: str | None = None) -> list[str]:
  """Removes the scratch directories that killed workers left (a SIGKILL
  skips write_scratch's clean-up): only directories named by write_scratch
  for this host, owned by this user, whose process is gone. Returns them."""
  directory = directory or tempfile.gettempdir()
  host, removed = socket.gethostname(), []
  try:
    names = os.listdir(directory)
  except OSError:
    return removed
  for name in names:
    match = _SCRATCH.fullmatch(name)
    if not match or match["host"] != host:
      continue
    path = os.path.join(directory, name)
    try:
      info = os.lstat(path)
    except OSError:
      continue
    pid = int(match["pid"])
    if (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
        and pid != os.getpid() and not _alive(pid)):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


def write_scratch(checkpoint, worker_index: int, step: int) -> None:
  """A non-chief worker's save: the same collective reads as the chief's
  (variables may sync on read), written to a temporary directory that is
  deleted at once (and, at a process's first save, those of killed
  workers: remove_stale_scratch)."""
  if not _scratch_swept:
    _scratch_swept.append(remove_stale_scratch())
  scratch = tempfile.mkdtemp(
      prefix=f"trainer-worker{worker_index}-{socket.gethostname()}-"
      f"{os.getpid()}-")
  try:
    checkpoint.write(os.path.join(scratch, PREFIX))
  except (OSError, tf.errors.OpError) as e:
    if not is_disk_full(e):
      raise
    raise DiskFull(
        f"no space left in the temporary directory {scratch} where worker "
        f"{worker_index} writes its copy of the checkpoint at step "
        f"{step}; free space there (or set TMPDIR), then run the same "
        "command to resume.") from None
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def number(path: str) -> int:
  """N of a checkpoint path ending in ckpt-N (-1 if it does not)."""
  try:
    return int(path.rsplit("-", 1)[1])
  except (IndexError, ValueError):
    return -1


def _warn_damaged(path, error, rest):
  fallback = rest[0] if rest else "no older checkpoint (none left)"
  logging.warning("checkpoint %s is damaged (%s); using %s instead.", path,
                  first_line(error), fallback)


_CONFIG_KEY = "config/.ATTRIBUTES/VARIABLE_VALUE"


def verified_config(path: str, skip=()) -> dict:
  """Reads EVERY tensor of the checkpoint at `path` but those in `skip`
  (read elsewhere: compat.restore_released), so a truncated or corrupted
  file is caught here, whatever error the reader raises, and a later
  restore failure can only mean "another model"; returns the Config
  saved inside it as a dict ({} if it has none)."""
  reader = tf.train.load_checkpoint(path)
  for key in reader.get_variable_to_shape_map():
    if key not in skip:
      reader.get_tensor(key)
  if not reader.has_tensor(_CONFIG_KEY):
    return {}
  return json.loads(reader.get_tensor(_CONFIG_KEY).decode())


def _holder(path: str, model_dir: str) -> str:
  """What a message calls the checkpoint at `path`: the --model_dir's, or
  (given with --checkpoint from elsewhere) the one at its own path."""
  if os.path.abspath(os.path.dirname(path)) == os.path.abspath(model_dir):
    return f"--model_dir={model_dir} holds a checkpoint ({path}) that"
  return f"--checkpoint={path} (in {os.path.dirname(path) or '.'})"


def _fix(path: str, model_dir: str) -> str:
  if os.path.abspath(os.path.dirname(path)) == os.path.abspath(model_dir):
    return "use a new --model_dir or"
  return "pass a checkpoint of this model, or"


def check_compatible(saved: dict, record, path: str) -> None:
  current = json.loads(record.to_json())
  for name in _IDENTITY:
    if name in saved and saved[name] != current[name]:
      raise UserError(
          f"{_holder(path, record.model_dir)} was written with "
          f"--{name}={saved[name]!r}, not {current[name]!r}; "
          f"{_fix(path, record.model_dir)} --{name}={saved[name]}.")
  if "global_batch_size" in saved and \
      saved["global_batch_size"] != current["global_batch_size"]:
    logging.warning(
        "resuming with --global_batch_size=%d where the checkpoint used %d: "
        "training continues at the same example position, but the sequence "
        "of batches (and so the result) differs from an uninterrupted run.",
        current["global_batch_size"], saved["global_batch_size"])
