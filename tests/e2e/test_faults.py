"""Faults at the edges: the `checkpoint` index deleted or garbled, two
trainers on one model_dir, two SIGTERMs, a full disk while saving."""

import hashlib
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from conftest import (checkpoint_weights, last_json, max_rel_diff, run_trainer,
                      start_trainer, stop, wait_for_file)
from trainer import dirlock
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(600)

# mlp (dropout) + adam (slots), small and fast; every checkpoint kept.
MLP = ["--model=mlp", "--optimizer=adam", "--dataset=digits",
       "--global_batch_size=32", "--train_steps=150", "--steps_per_loop=1",
       "--checkpoint_every=10", "--summary_every=50", "--eval_every=0",
       "--mode=train", "--seed=7", "--keep_checkpoints=100",
       "--progress=log"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """150 uninterrupted steps."""
  model_dir = tmp_path_factory.mktemp("ref") / "run"
  run_trainer(*MLP, f"--model_dir={model_dir}")
  return checkpoint_weights(model_dir / "ckpt-150")


def _digests(model_dir) -> dict:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in model_dir.glob("ckpt-*")}




# ---- the `checkpoint` index file ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "garbled"])
def test_damaged_index_resumes_from_the_newest_file(tmp_path, reference,
                                                    damage):
  model_dir = tmp_path / "run"
  run_trainer(*MLP, f"--model_dir={model_dir}", "--train_steps=100",
              "--checkpoint_every=50")
  index = model_dir / "checkpoint"
  if damage == "deleted":
    index.unlink()
  else:
    index.write_text("garbage {{{ not a CheckpointState\n")
  before = _digests(model_dir)
  assert set(before) >= {"ckpt-50.index", "ckpt-100.index"}
  resumed = run_trainer(*MLP, f"--model_dir={model_dir}",
                        "--checkpoint_every=50")
  assert re.search(r"restored \S+ckpt-100 at step 100", resumed.stderr), \
      resumed.stderr[-3000:]
  assert f"index file in {model_dir} is" in resumed.stderr
  after = _digests(model_dir)
  assert {k: after[k] for k in before} == before   # no checkpoint rewritten
  assert max_rel_diff(checkpoint_weights(model_dir / "ckpt-150"),
                      reference) <= 1e-6


@pytest.mark.slow
def test_unreadable_checkpoints_are_refused_not_overwritten(tmp_path):
  model_dir = tmp_path / "run"
  run_trainer(*MLP, f"--model_dir={model_dir}", "--train_steps=20")
  (model_dir / "checkpoint").unlink()
  for data in model_dir.glob("ckpt-*.data-*"):
    data.write_bytes(data.read_bytes()[:100])
  before = _digests(model_dir)
  proc = run_trainer(*MLP, f"--model_dir={model_dir}", check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1 and "none of them is readable" in errors[0], errors
  assert _digests(model_dir) == before


# ---- one trainer per model_dir ----------------------------------------


def test_lock_in_process(tmp_path, caplog):
  """Exclusive, names the holder, leaves no trace, takes over a stale file."""
  model_dir = tmp_path / "a" / "b"
  with dirlock.ModelDirLock(str(model_dir)):
    assert (model_dir / dirlock.LOCK_NAME).exists()
    with pytest.raises(UserError) as e:
      dirlock.ModelDirLock(str(model_dir)).acquire()
    assert f"host {socket.gethostname()}, PID {os.getpid()}, since 20" in \
        str(e.value), str(e.value)
  assert not (tmp_path / "a").exists()   # it created both: it removes both
  # A lock file whose flock is free: its writer died (SIGKILL).
  model_dir.mkdir(parents=True)
  (model_dir / dirlock.LOCK_NAME).write_text(
      '{"host": "gone", "pid": 99999999, "since": "2020-01-01T00:00:00Z"}')
  with dirlock.ModelDirLock(str(model_dir)):
    pass
  assert "taking over a stale lock" in caplog.text and "gone" in caplog.text
  assert model_dir.is_dir() and not (model_dir / dirlock.LOCK_NAME).exists()
  # Readers and non-chief workers take no lock.
  assert isinstance(dirlock.for_run(str(model_dir), "eval", True),
                    dirlock._NoLock)
  assert isinstance(dirlock.for_run(str(model_dir), "train", False),
                    dirlock._NoLock)


@pytest.mark.slow
def test_second_trainer_exits_2_and_a_killed_ones_lock_is_taken_over(
    tmp_path, reference):
  model_dir = tmp_path / "run"
  first = start_trainer(*MLP, f"--model_dir={model_dir}",
                        log_path=tmp_path / "first.log")
  try:
    wait_for_file(model_dir / "ckpt-10.index", first)
    second = run_trainer(*MLP, f"--model_dir={model_dir}", "--seed=8",
                         check=False, timeout=60)
    assert first.poll() is None
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [l for l in second.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1, second.stderr[-3000:]
    assert f"is in use by another trainer (host {socket.gethostname()}, " \
        f"PID {first.pid}, since " in errors[0], errors
    assert "import tensorflow" not in second.stderr   # decided before TF
    stop(first, signal.SIGKILL)
  finally:
    stop(first)
  assert (model_dir / dirlock.LOCK_NAME).exists()   # left by the dead one
  resumed = run_trainer(*MLP, f"--model_dir={model_dir}")
  assert "taking over a stale lock" in resumed.stderr
  assert f"PID {first.pid}" in resumed.stderr
  assert max_rel_diff(checkpoint_weights(model_dir / "ckpt-150"),
                      reference) <= 1e-6
  assert not (model_dir / dirlock.LOCK_NAME).exists()


# ---- preemption -------------------------------------------------------


@pytest.mark.slow
def test_two_sigterms_50ms_apart_exit_75_and_resume_exactly(tmp_path,
                                                            reference):
  model_dir = tmp_path / "run"
  log = tmp_path / "log.txt"
  proc = start_trainer(*MLP, f"--model_dir={model_dir}", log_path=log)
  try:
    wait_for_file(model_dir / "ckpt-20.index", proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
  finally:
    stop(proc)
  text = log.read_text()
  assert code == 75, text[-3000:]
  summary = [l for l in text.splitlines() if l.startswith("{")]
  assert '"preempted": true' in summary[-1]
  step = int(re.search(r'"global_step": (\d+)', summary[-1]).group(1))
  assert (model_dir / f"ckpt-{step}.index").exists()
  resumed = run_trainer(*MLP, f"--model_dir={model_dir}")
  assert f"at step {step}" in resumed.stderr
  assert max_rel_diff(checkpoint_weights(model_dir / "ckpt-150"),
                      reference) <= 1e-6


# ---- disk full --------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MiB tmpfs (needs root and mount); skipped where it cannot mount."""
  mount = tmp_path / "disk"
  mount.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs",
                         str(mount)], capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:200]}); "
                "the disk-full test needs root")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory):
  """Writes a filler file until the file system is full."""
  filler = directory / "filler"
  chunk = b"\0" * (1 << 20)
  with open(filler, "wb") as f:
    try:
      while True:
        f.write(chunk)
        f.flush()
    except OSError:
      pass
  return filler


@pytest.mark.slow
def test_disk_full_while_saving(tmp_path, small_disk, reference):
  model_dir = small_disk / "run"
  log = tmp_path / "log.txt"
  proc = start_trainer(*MLP, f"--model_dir={model_dir}", log_path=log)
  try:
    wait_for_file(model_dir / "ckpt-20.index", proc)
    filler = _fill(small_disk)
    code = proc.wait(timeout=120)
  finally:
    stop(proc)
  text = log.read_text()
  assert code == 74, text[-3000:]
  errors = [l for l in text.splitlines() if "trainer.main: error:" in l]
  assert len(errors) == 1, text[-3000:]
  assert "Traceback" not in text
  intact = sorted(int(p.name[5:-6]) for p in model_dir.glob("ckpt-*.index"))
  match = re.search(rf"no space left in --model_dir={model_dir} while saving "
                    rf"{model_dir}/ckpt-(\d+) .*the newest intact checkpoint "
                    rf"is {model_dir}/ckpt-{intact[-1]}\.", errors[0])
  assert match and int(match.group(1)) > intact[-1], errors
  assert not list(model_dir.glob("*_temp*")), os.listdir(model_dir)
  assert not list(model_dir.glob(f"ckpt-{match.group(1)}.*"))
  # Space freed: the same command resumes and ends where an uninterrupted
  # run does.
  filler.unlink()
  resumed = run_trainer(*MLP, f"--model_dir={model_dir}")
  assert f"at step {intact[-1]}" in resumed.stderr
  assert last_json(resumed)["global_step"] == 150
  assert max_rel_diff(checkpoint_weights(model_dir / "ckpt-150"),
                      reference) <= 1e-6
