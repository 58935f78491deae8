"""Hangs found and recovered (trainer/hang.py): a training input that blocks
forever with the process alive (tests/plugin_tasks.py BlockingDigits) is
found within --hang_timeout_s, every thread's stack goes to the log, the
process exits 142, and launch.local --max_restarts restarts the group,
which resumes from the last checkpoint and ends with the weights of an
uninterrupted run."""

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, checkpoint_weights, env, run_trainer
from trainer import exitcodes

pytestmark = pytest.mark.timeout(600)

TASKS = {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
FLAGS = ["--task=plugin_tasks:BlockingDigits", "--dataset=digits",
         "--global_batch_size=32", "--steps_per_loop=2", "--summary_every=4",
         "--checkpoint_every=4", "--eval_every=0", "--train_steps=16",
         "--mode=train", "--progress=log", "--seed=3"]
# The batch of update 11 holds position 320: the block comes after the
# checkpoint at step 8, inside the chunk of updates 11-12.
BLOCK_AT = 320


def task_args(marker, worker=0):
  return (f"--task_args=block_position={BLOCK_AT},block_worker={worker},"
          f"marker={marker}")


def test_a_blocked_input_is_a_hang_with_stacks_and_exit_142(tmp_path):
  marker = tmp_path / "blocked"
  proc = run_trainer(*FLAGS, task_args(marker), f"--model_dir={tmp_path / 'run'}",
                     "--hang_timeout_s=3", check=False, timeout=300,
                     extra_env=TASKS)
  log = proc.stderr
  assert proc.returncode == exitcodes.HANG, log[-4000:]
  assert marker.exists(), "the input never blocked"
  assert re.search(r"hang: no training progress for \d+ s in the chunk from "
                   r"step \d+", log), log[-4000:]
  # Every thread's stack: the main thread in the chunk's call, and the
  # input thread where the task's Python blocks.
  main = log.split("hang: thread 'MainThread'", 1)[1].split("hang: thread", 1)[0]
  assert "in _train_chunks" in main and "executors/sync.py" in main, main
  assert re.search(r"in _maybe_block\n\s+threading\.Event\(\)\.wait\(\)", log)
  last = log.strip().splitlines()[-1]
  assert last.startswith("trainer.main: error: hang: ") and "Exit 142" in last


def _launch(tmp_path, name, flags, max_restarts):
  log_path = tmp_path / f"{name}.log"
  log = open(log_path, "w")
  cmd = [sys.executable, "-m", "launch.local", "--workers=2",
         f"--max_restarts={max_restarts}", "--timeout_s=500", "--grace_s=5",
         "--", "--strategy=multiworker", "--deterministic", *flags]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env(**TASKS), stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
  return proc, log_path, log


def _stop(proc):
  if proc.poll() is None:
    os.killpg(proc.pid, 9)
  proc.wait(timeout=60)


@pytest.mark.skipif(not os.environ.get("TRAINER_SLOW"),
                    reason="two 2-worker launches with a restart (~2 min of "
                    "a 2-core machine); set TRAINER_SLOW=1")
def test_multiworker_hang_restarts_and_ends_like_an_uninterrupted_run(
    tmp_path):
  bound = 10
  marker = tmp_path / "blocked"
  flags = [*FLAGS, task_args(marker, worker=1), f"--hang_timeout_s={bound}",
           f"--model_dir={tmp_path / 'run'}"]
  proc, log_path, log = _launch(tmp_path, "hang", flags, max_restarts=1)
  stacks_at = None
  try:
    deadline = time.monotonic() + 500
    while proc.poll() is None and time.monotonic() < deadline:
      if stacks_at is None and "hang: thread 'MainThread'" in \
          log_path.read_text(errors="replace"):
        stacks_at = time.time()
      time.sleep(0.2)
  finally:
    _stop(proc)
    log.close()
  text = log_path.read_text(errors="replace")
  assert proc.returncode == 0, text[-6000:]
  assert marker.exists() and stacks_at is not None, text[-6000:]
  # Found within the bound plus 30 s of the moment the input blocked.
  delay = stacks_at - marker.stat().st_mtime
  print(f"stacks in the log {delay:.1f} s after the input blocked "
        f"(--hang_timeout_s={bound})")
  assert delay <= bound + 30, delay
  assert re.search(r"\[worker 1\] .*in _maybe_block", text)
  assert "launch.local: restart 1/1 after worker" in text
  assert "exited with 142" in text
  assert "restored" in text and "ckpt-8 at step 8" in text

  # The same run, uninterrupted (the marker exists: nothing blocks).
  reference = tmp_path / "reference"
  proc, log_path, log = _launch(
      tmp_path, "reference", [*FLAGS, task_args(marker, worker=1),
                              f"--model_dir={reference}"], max_restarts=0)
  try:
    proc.wait(timeout=400)
  finally:
    _stop(proc)
    log.close()
  assert proc.returncode == 0, log_path.read_text()[-6000:]
  got = checkpoint_weights(tmp_path / "run" / "ckpt-16")
  want = checkpoint_weights(reference / "ckpt-16")
  assert got.keys() == want.keys() and got
  for key in got:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
