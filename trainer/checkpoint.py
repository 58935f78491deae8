"""Checkpoints: chief-only writes, every worker saves, verified restore.

Under MultiWorkerMirroredStrategy every worker must call save() (variables
may sync on read, which takes all workers); the chief writes to --model_dir,
the others to a temporary directory they delete at once.
CheckpointManager moves the `checkpoint` pointer only after the files are
written, so the pointer never names a partial checkpoint; a checkpoint that
is damaged anyway (a truncated file) is reported and the previous one used.
"""

import json
import os
import shutil
import tempfile

from absl import logging
import tensorflow as tf

from trainer.errors import UserError

PREFIX = "ckpt"
# Fields that define the variables in a checkpoint: restoring across a change
# of any of them fails, so say so before touching anything.
_IDENTITY = ("task", "model", "optimizer", "dataset")


class Checkpointer:
  """Saves and restores `objects` (model, optimizer, state, config)."""

  def __init__(self, model_dir: str, objects: dict, keep: int, is_chief: bool,
               worker_index: int):
    self.model_dir = model_dir
    self.checkpoint = tf.train.Checkpoint(**objects)
    self._keep = keep
    self._is_chief = is_chief
    self._worker_index = worker_index
    self._manager = None
    if is_chief:
      self._manager = tf.train.CheckpointManager(
          self.checkpoint, model_dir, max_to_keep=keep, checkpoint_name=PREFIX)

  def save(self, step: int) -> str | None:
    """Every worker calls this at the same step."""
    if self._is_chief:
      return self._manager.save(checkpoint_number=step)
    scratch = tempfile.mkdtemp(prefix=f"trainer-worker{self._worker_index}-")
    try:
      self.checkpoint.write(os.path.join(scratch, PREFIX))
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
    return None

  def paths(self) -> list[str]:
    """Checkpoints in --model_dir, newest first."""
    state = tf.train.get_checkpoint_state(self.model_dir)
    if state is None:
      return []
    paths = list(state.all_model_checkpoint_paths) or [
        state.model_checkpoint_path]
    paths = [p if os.path.isabs(p) else os.path.join(self.model_dir, p)
             for p in paths]
    return sorted(set(paths), key=_number, reverse=True)

  def restore(self, config, path: str | None = None) -> str | None:
    """Restores `path`, or the newest readable checkpoint; None if none.

    A different model or optimizer in --model_dir is a UserError (nothing is
    written); a damaged checkpoint is skipped with a warning.
    """
    candidates = [path] if path else self.paths()
    for i, candidate in enumerate(candidates):
      try:
        saved = verified_config(candidate)
      except Exception as e:  # noqa: BLE001 - any read failure is damage
        _warn_damaged(candidate, e, candidates[i + 1:])
        continue
      check_compatible(saved, config, candidate)
      try:
        status = self.checkpoint.restore(candidate)
        status.assert_existing_objects_matched()
      except (ValueError, AssertionError, tf.errors.OpError) as e:
        raise UserError(
            f"--model_dir={self.model_dir} holds a checkpoint ({candidate}) "
            f"that does not fit this model/optimizer ({_first_line(e)}); use "
            "a new --model_dir or the flags that wrote it.") from None
      return candidate
    if path:
      raise UserError(f"--checkpoint={path} could not be read.")
    return None


def _number(path: str) -> int:
  try:
    return int(path.rsplit("-", 1)[1])
  except (IndexError, ValueError):
    return -1


def _first_line(error) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else type(error).__name__


def _warn_damaged(path, error, rest):
  fallback = rest[0] if rest else "a fresh start"
  logging.warning("checkpoint %s is damaged (%s); using %s instead.", path,
                  _first_line(error), fallback)


_CONFIG_KEY = "config/.ATTRIBUTES/VARIABLE_VALUE"


def verified_config(path: str) -> dict:
  """Reads EVERY tensor of the checkpoint at `path` (so a truncated or
  corrupted file is caught here, whatever error the reader raises, and a
  later restore failure can only mean "another model"); returns the Config
  saved inside it as a dict ({} if it has none)."""
  reader = tf.train.load_checkpoint(path)
  for key in reader.get_variable_to_shape_map():
    reader.get_tensor(key)
  if not reader.has_tensor(_CONFIG_KEY):
    return {}
  return json.loads(reader.get_tensor(_CONFIG_KEY).decode())


def check_compatible(saved: dict, config, path: str) -> None:
  current = json.loads(config.to_json())
  for name in _IDENTITY:
    if name in saved and saved[name] != current[name]:
      raise UserError(
          f"--model_dir={config.model_dir} holds a checkpoint ({path}) "
          f"written with --{name}={saved[name]!r}, not {current[name]!r}; use "
          f"a new --model_dir or --{name}={saved[name]}.")
  if "global_batch_size" in saved and \
      saved["global_batch_size"] != current["global_batch_size"]:
    logging.warning(
        "resuming with --global_batch_size=%d where the checkpoint used %d: "
        "training continues at the same example position, but the sequence "
        "of batches (and so the result) differs from an uninterrupted run.",
        current["global_batch_size"], saved["global_batch_size"])
