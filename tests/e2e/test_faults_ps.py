"""Parameter servers with every worker lost: the coordinator's wait is
bounded by --peer_timeout_s, says so while it waits, then exits 4."""

import os
import re
import signal
import time

import pytest

from conftest import PS_FLAGS, Cluster

pytestmark = pytest.mark.timeout(300)


def test_every_worker_lost_exits_4_within_peer_timeout(tmp_path):
  timeout_s = 8
  cluster = Cluster(tmp_path, [*PS_FLAGS, f"--model_dir={tmp_path / 'run'}",
                               "--train_steps=1000000", "--mode=train",
                               f"--peer_timeout_s={timeout_s}"])
  try:
    cluster.wait_for(lambda: re.search(r"train \| step: 50/", cluster.log()),
                     180, "first train summary")
    children = cluster.children()
    for name in ("worker0", "worker1"):
      os.kill(children[name], signal.SIGKILL)
    killed = time.monotonic()
    rc = cluster.wait(timeout=timeout_s + 60)
    took = time.monotonic() - killed
  finally:
    cluster.stop()
  log = cluster.log()
  assert rc == 4, log[-4000:]
  # The watch needs timeout_s of silence, plus its 1 s probe period and the
  # launcher's stop: a small margin, far below "forever".
  assert took < timeout_s + 15, (took, log[-3000:])
  assert "waiting for workers: none of 2 answers" in log, log[-3000:]
  errors = [l for l in log.splitlines() if "trainer.main: error:" in l]
  assert len(errors) == 1 and "no worker has answered" in errors[0], errors
  assert "Traceback" not in log
  # Its model_dir lock went with it: the next run finds none.
  assert not (tmp_path / "run" / ".trainer.lock").exists()


@pytest.mark.slow
def test_workers_restarted_in_time_are_picked_up(tmp_path):
  """Under launch.local --max_restarts both killed workers come back on
  their ports within --peer_timeout_s: the watch lets the run finish."""
  cluster = Cluster(tmp_path, [*PS_FLAGS, f"--model_dir={tmp_path / 'run'}",
                               "--train_steps=400", "--mode=train",
                               "--peer_timeout_s=60"], name="restarts",
                    launcher_flags=["--max_restarts=2"])
  try:
    cluster.wait_for(lambda: re.search(r"train \| step: 50/", cluster.log()),
                     180, "first train summary")
    children = cluster.children()
    for name in ("worker0", "worker1"):
      os.kill(children[name], signal.SIGKILL)
    rc = cluster.wait(timeout=240)
  finally:
    cluster.stop()
  log = cluster.log()
  assert rc == 0, log[-4000:]
  assert "restart 1/2 after worker" in log and "restart 2/2 after worker" in \
      log, log[-4000:]
  assert '"global_step": 400' in log
