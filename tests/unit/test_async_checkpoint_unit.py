"""--async_checkpoint in-process: the background write holds the values of
the step boundary (not the live ones), the index and the ckpt-N.index move
only after the files are complete, a half-written save is never restored,
a failed background write surfaces at wait()."""

import errno
import os
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)

tf = pytest.importorskip("tensorflow")

from trainer import checkpoint as ckpt_lib  # noqa: E402
from trainer import compat  # noqa: E402
from trainer.config import Config  # noqa: E402


def _checkpointer(model_dir, value, asynchronous=True, is_chief=True):
  variables = {"v": tf.Variable(np.full([1000], value, np.float32)),
               "global_step": tf.Variable(0, dtype=tf.int64)}
  return ckpt_lib.Checkpointer(str(model_dir), variables, keep=3,
                               is_chief=is_chief, worker_index=0,
                               asynchronous=asynchronous), variables


def _saved(path) -> float:
  reader = tf.train.load_checkpoint(path)
  values = reader.get_tensor("v/.ATTRIBUTES/VARIABLE_VALUE")
  assert (values == values[0]).all()
  return float(values[0])


def _set(variables, value, step):
  variables["v"].assign(np.full([1000], value, np.float32))
  variables["global_step"].assign(step)


def test_background_write_saves_the_boundary_and_commits_last(tmp_path,
                                                              monkeypatch):
  config = Config(model_dir=str(tmp_path))
  writer, variables = _checkpointer(tmp_path, 1.0)
  _set(variables, 1.0, 1)
  writer.save(1)
  writer.wait()
  first = os.path.join(str(tmp_path), "ckpt-1")
  assert writer.paths() == [first]

  started, go = threading.Event(), threading.Event()
  real_write = compat.CheckpointSnapshot.write

  def slow_write(self, prefix):
    started.set()
    assert go.wait(60)
    real_write(self, prefix)
  monkeypatch.setattr(compat.CheckpointSnapshot, "write", slow_write)

  _set(variables, 2.0, 2)
  assert writer.save(2) == os.path.join(str(tmp_path), "ckpt-2")
  assert started.wait(60)
  # Training goes on while the write is in flight: the live values move on.
  _set(variables, 3.0, 3)
  # Nothing names the checkpoint in flight: not the index, not the files,
  # and an evaluator beside the run restores the previous one.
  assert tf.train.latest_checkpoint(str(tmp_path)) == first
  assert writer.paths() == [first]
  assert not list(tmp_path.glob("ckpt-2*"))
  reader, read = _checkpointer(tmp_path, -1.0, is_chief=False)
  assert reader.restore(config) == first
  assert float(read["v"][0]) == 1.0

  go.set()
  writer.wait()
  second = os.path.join(str(tmp_path), "ckpt-2")
  assert tf.train.latest_checkpoint(str(tmp_path)) == second
  assert writer.paths() == [second, first]
  assert _saved(second) == 2.0       # the boundary's values, not 3.0
  assert int(tf.train.load_checkpoint(second).get_tensor(
      "global_step/.ATTRIBUTES/VARIABLE_VALUE")) == 2
  assert writer.background_seconds() > 0.0
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_synchronous_save_is_committed_on_return(tmp_path):
  writer, variables = _checkpointer(tmp_path, 5.0, asynchronous=False)
  path = writer.save(4)
  assert tf.train.latest_checkpoint(str(tmp_path)) == path
  assert _saved(path) == 5.0
  assert writer.background_seconds() == 0.0


def test_a_killed_write_is_never_restored_and_is_cleaned_up(tmp_path):
  """What SIGKILL leaves at each moment of a commit: the staging directory
  (killed while writing or syncing), or the data files moved in without
  their .index (killed between the renames)."""
  config = Config(model_dir=str(tmp_path))
  writer, variables = _checkpointer(tmp_path, 1.0, asynchronous=False)
  _set(variables, 1.0, 10)
  writer.save(10)
  _set(variables, 2.0, 20)
  writer.save(20)
  twenty = os.path.join(str(tmp_path), "ckpt-20")
  staging = tmp_path / ".saving-ckpt-30.999"
  staging.mkdir()
  (staging / "ckpt-30.index").write_bytes(b"half")
  (tmp_path / "ckpt-30.data-00000-of-00001").write_bytes(b"orphan data")

  reader, read = _checkpointer(tmp_path, -1.0)
  assert reader.restore(config) == twenty
  assert float(read["v"][0]) == 2.0
  _set(read, 3.0, 30)
  reader.save(30)
  reader.wait()
  assert not staging.exists()
  assert _saved(os.path.join(str(tmp_path), "ckpt-30")) == 3.0


def test_a_failed_background_write_is_raised_by_wait(tmp_path, monkeypatch):
  writer, variables = _checkpointer(tmp_path, 1.0)
  writer.save(1)
  writer.wait()

  def full(self, prefix):
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with open(prefix + ".data-00000-of-00001", "wb") as f:
      f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(compat.CheckpointSnapshot, "write", full)
  writer.save(2)
  with pytest.raises(ckpt_lib.DiskFull, match=r"while saving .*ckpt-2 .*"
                     r"newest intact checkpoint is .*ckpt-1\."):
    writer.wait()
  assert sorted(os.listdir(tmp_path)) == [
      "checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]
  writer.wait()   # raised once
