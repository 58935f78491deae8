"""A checkpoint deleted between listing and restoring (an eval beside a live
run with --keep_checkpoints=1) is re-listed, never blamed on the model."""

import glob
import os

import pytest

pytestmark = pytest.mark.timeout(120)

tf = pytest.importorskip("tensorflow")

from trainer import checkpoint as ckpt_lib  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.errors import UserError  # noqa: E402


def _remove(prefix):
  for path in glob.glob(prefix + ".*"):
    os.remove(path)


class _Live:
  """A 'live run' writing into model_dir: the first time `hook` fires it
  saves ckpt-3 and deletes ckpt-2, as --keep_checkpoints would."""

  def __init__(self, model_dir):
    self.variable = tf.Variable(0.0)
    self.writer = ckpt_lib.Checkpointer(model_dir, {"v": self.variable},
                                        keep=10, is_chief=True,
                                        worker_index=0)
    self.fired = False
    for step in (1, 2):
      self.variable.assign(float(step))
      self.writer.save(step)

  def hook(self):
    if not self.fired:
      self.fired = True
      self.variable.assign(3.0)
      self.writer.save(3)
      _remove(os.path.join(self.writer.model_dir, "ckpt-2"))


@pytest.mark.parametrize("when", ["before_verify", "before_restore"])
def test_vanished_checkpoint_is_relisted(tmp_path, monkeypatch, caplog, when):
  model_dir = str(tmp_path)
  live = _Live(model_dir)
  reader_var = tf.Variable(-1.0)
  reader = ckpt_lib.Checkpointer(model_dir, {"v": reader_var}, keep=10,
                                 is_chief=False, worker_index=1)
  if when == "before_verify":
    real = ckpt_lib.verified_config

    def verified(path, skip=()):
      live.hook()
      return real(path, skip)
    monkeypatch.setattr(ckpt_lib, "verified_config", verified)
  else:
    real_restore = reader.checkpoint.restore

    def restore(path):
      live.hook()
      return real_restore(path)
    monkeypatch.setattr(reader.checkpoint, "restore", restore)
  restored = reader.restore(Config(model_dir=model_dir))
  assert restored == os.path.join(model_dir, "ckpt-3")
  assert float(reader_var.numpy()) == 3.0
  assert "vanished while being restored" in caplog.text
  assert "damaged" not in caplog.text


def test_explicit_checkpoint_that_vanished_says_so(tmp_path):
  live = _Live(str(tmp_path))
  _remove(os.path.join(str(tmp_path), "ckpt-2"))
  reader = ckpt_lib.Checkpointer(str(tmp_path), {"v": tf.Variable(0.0)},
                                 keep=10, is_chief=False, worker_index=1)
  with pytest.raises(UserError, match="no longer exists"):
    reader.restore(Config(model_dir=str(tmp_path)),
                   os.path.join(str(tmp_path), "ckpt-2"))
  del live


def _saved_twice(model_dir) -> int:
  """ckpt-1 and ckpt-2 of one large variable "t" (all 1s, then all 2s) in
  `model_dir`; returns its rows (1.2 MB: over release_for_restore's
  1 MiB)."""
  rows = 300_000
  table = tf.Variable(tf.zeros([rows]))
  writer = ckpt_lib.Checkpointer(model_dir, {"t": table}, keep=10,
                                 is_chief=True, worker_index=0)
  for step in (1, 2):
    table.assign(tf.fill([rows], float(step)))
    writer.save(step)
  return rows


def test_vanished_after_its_variables_were_released(tmp_path, monkeypatch):
  """A large variable is emptied before a restore (compat.
  release_for_restore); when that checkpoint vanishes the next one fills
  it again, and when none is left the run refuses instead of going on
  with an empty variable."""
  import numpy as np
  model_dir = str(tmp_path)
  rows = _saved_twice(model_dir)
  target = tf.Variable(tf.zeros([rows]))
  reader = ckpt_lib.Checkpointer(model_dir, {"t": target}, keep=10,
                                 is_chief=False, worker_index=1)
  real_restore = ckpt_lib.compat.restore_released
  gone = []

  def restore_released(released, path):
    assert target.shape[0] == rows and tf.size(target.read_value()) == 0
    if not gone:   # the newest vanishes after the release
      gone.append(path)
      _remove(path)
    return real_restore(released, path)
  monkeypatch.setattr(ckpt_lib.compat, "restore_released", restore_released)
  assert reader.restore(Config(model_dir=model_dir)) == os.path.join(
      model_dir, "ckpt-1")
  np.testing.assert_array_equal(target.numpy(), np.ones(rows, np.float32))
  # Every one vanishes: no fresh start with the emptied variable.
  gone.clear()
  with pytest.raises(UserError, match="after the old values of the "
                     "variables were released"):
    reader.restore(Config(model_dir=model_dir))


def test_a_damaged_large_variable_is_caught_before_the_restore(tmp_path,
                                                                caplog):
  """A large variable's value is read where it lives before the restore
  (compat.restore_released), not whole by verified_config: damage to it is
  still found there, and the older checkpoint restored."""
  import numpy as np
  model_dir = str(tmp_path)
  rows = _saved_twice(model_dir)
  data, = glob.glob(os.path.join(model_dir, "ckpt-2.data-*"))
  with open(data, "r+b") as f:   # flip bytes inside the table's values
    f.seek(rows * 2)
    f.write(b"\xff" * 16)
  target = tf.Variable(tf.zeros([rows]))
  reader = ckpt_lib.Checkpointer(model_dir, {"t": target}, keep=10,
                                 is_chief=False, worker_index=1)
  assert reader.restore(Config(model_dir=model_dir)) == os.path.join(
      model_dir, "ckpt-1")
  np.testing.assert_array_equal(target.numpy(), np.ones(rows, np.float32))
  assert "ckpt-2 is damaged" in caplog.text
