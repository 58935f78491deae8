"""A killed multi-worker worker leaves its scratch checkpoint directory in
the temporary directory (SIGKILL skips the clean-up): the next save of any
worker on the host removes those, and only those."""

import os
import socket
import subprocess
import sys
import tempfile

import tensorflow as tf

from trainer import checkpoint


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_only_dead_workers_directories_of_this_host_and_user_go(tmp_path):
  host, dead = socket.gethostname(), _dead_pid()
  names = {
      "stale": f"trainer-worker1-{host}-{dead}-ab_c9",
      "alive": f"trainer-worker1-{host}-{os.getppid()}-x1",
      "mine": f"trainer-worker2-{host}-{os.getpid()}-x2",
      "other_host": f"trainer-worker1-{host}x-{dead}-x3",
      "old_format": "trainer-worker1-abc123",
      "unrelated": f"something-{host}-{dead}-x4",
  }
  for name in names.values():
    (tmp_path / name / "ckpt_temp").mkdir(parents=True)
  as_file = tmp_path / f"trainer-worker3-{host}-{dead}-x5"
  as_file.write_text("a user's file")
  link = tmp_path / f"trainer-worker4-{host}-{dead}-x6"
  link.symlink_to(tmp_path / names["unrelated"])
  removed = checkpoint.remove_stale_scratch(str(tmp_path))
  assert removed == [str(tmp_path / names["stale"])]
  left = set(os.listdir(tmp_path))
  assert left == set(names.values()) - {names["stale"]} | {as_file.name,
                                                             link.name}
  assert (tmp_path / names["unrelated"] / "ckpt_temp").is_dir()


def test_write_scratch_leaves_nothing_and_sweeps_once(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  monkeypatch.setattr(checkpoint, "_scratch_swept", [])
  stale = tmp_path / f"trainer-worker1-{socket.gethostname()}-{_dead_pid()}-s"
  (stale / "ckpt_temp").mkdir(parents=True)
  ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))
  checkpoint.write_scratch(ckpt, 1, step=5)
  assert os.listdir(tmp_path) == []
  (stale / "ckpt_temp").mkdir(parents=True)
  checkpoint.write_scratch(ckpt, 1, step=6)   # swept at the first save only
  assert os.listdir(tmp_path) == [stale.name]
