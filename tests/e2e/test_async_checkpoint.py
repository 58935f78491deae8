"""--async_checkpoint across process deaths: SIGKILLs at random moments of a
run that saves every 2 updates (so most land during a background write),
then SIGTERM while a write is in flight. Every restart resumes from a
complete checkpoint, the preempted run exits 75 only once its checkpoint is
committed (0 updates lost), and the final weights equal an uninterrupted
synchronous run's bit for bit. The full version (30 kills, and 2 workers)
runs with TRAINER_SLOW=1."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (REPO, checkpoint_weights, env, last_json, run_trainer,
                      start_trainer, stop, stop_all)

pytestmark = pytest.mark.timeout(900)

STEPS = 40
MLP = ["--model=mlp", "--optimizer=adam", "--dataset=digits",
       "--global_batch_size=32", f"--train_steps={STEPS}",
       "--steps_per_loop=1", "--checkpoint_every=2", "--summary_every=50",
       "--eval_every=0", "--mode=train", "--seed=7", "--keep_checkpoints=3",
       "--progress=log", "--deterministic"]
ASYNC = [*MLP, "--async_checkpoint"]
SLOW = pytest.mark.skipif(not os.environ.get("TRAINER_SLOW"),
                          reason="30 SIGKILLs (minutes); set TRAINER_SLOW=1")
# The slow tests' number of kills (fewer on a machine too busy for 30).
KILLS = int(os.environ.get("TRAINER_ASYNC_KILLS", "30"))
# Their run length: long enough that every kill lands before the end (a
# run saves every 2 updates and is killed after 1-3 saves of its own, but
# on a busy machine the kill comes a few saves late).
LONG = max(200, 24 * KILLS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run, saving synchronously."""
  model_dir = tmp_path_factory.mktemp("ref") / "run"
  run_trainer(*MLP, f"--model_dir={model_dir}")
  return checkpoint_weights(model_dir / f"ckpt-{STEPS}")


def _assert_equal_bits(found: dict, reference: dict):
  assert found.keys() == reference.keys() and found
  for key in reference:
    assert np.array_equal(found[key], reference[key]), key


def _wait_for_line(log, pattern, procs, timeout=120, count=1):
  """Waits until the log file has `count` lines matching `pattern`; False
  if the processes ended first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if log.exists() and len(re.findall(
        pattern, log.read_text(errors="replace"))) >= count:
      return True
    if all(p.poll() is not None for p in procs):
      return False
    time.sleep(0.01)
  raise AssertionError(f"no line matching {pattern!r} in {log}")


def _checkpoints_complete(model_dir) -> int:
  """Every ckpt-N.index names complete files, and the index names one of
  them (the newest, or the one before if the kill came between the
  .index's rename and the index's rewrite: the restart takes the newest
  file either way); returns the newest step (0 if none)."""
  import tensorflow as tf
  from trainer import checkpoint as ckpt_lib
  found = sorted(int(p.name[5:-6]) for p in model_dir.glob("ckpt-*.index"))
  for step in found:
    ckpt_lib.verified_config(str(model_dir / f"ckpt-{step}"))
  if found:
    assert tf.train.latest_checkpoint(str(model_dir)) in [
        str(model_dir / f"ckpt-{step}") for step in found[-2:]]
  return found[-1] if found else 0


def _kill_runs(model_dir, tmp_path, kills, rng, start, restored_pattern,
               kill=stop_all):
  """`kills` runs SIGKILLed at a random moment after 1 to 3 saves of their
  own committed (so that each restart makes progress however slow the
  disk); each restart must resume from the newest complete checkpoint.
  Returns (kills made, how many found a write in flight, the newest
  step): fewer kills than asked if the run finished first."""
  in_flight = made = 0
  newest = 0
  for i in range(kills):
    log = tmp_path / f"kill{i}.txt"
    procs = start(log)
    commits = rng.randint(1, 3)
    try:
      started = _wait_for_line(log, r"saved checkpoint ", procs,
                               timeout=300, count=commits)
      time.sleep(rng.uniform(0.0, 0.3))
    finally:
      kill(procs)
    text = log.read_text(errors="replace")
    assert "is damaged" not in text, text[-3000:]
    if newest:
      assert re.search(restored_pattern.format(step=newest), text), \
          text[-3000:]
    if not started:   # finished before the kill: nothing more to check
      break
    made += 1
    in_flight += any(p.name.startswith(".saving-") for p in model_dir.iterdir())
    newest = _checkpoints_complete(model_dir)
  return made, in_flight, newest


def _sigterm_while_writing(model_dir, log, *extra):
  proc = start_trainer(*ASYNC, f"--model_dir={model_dir}", *extra,
                       log_path=log)
  try:
    _wait_for_line(log, r"saving checkpoint \S+ in the background", [proc])
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
  finally:
    stop(proc)
  text = log.read_text()
  assert code == 75, text[-3000:]
  summary = json.loads([l for l in text.splitlines() if l.startswith("{")][-1])
  assert summary["preempted"]
  step = summary["global_step"]
  assert _checkpoints_complete(model_dir) == step
  return step


def test_kills_and_sigterm_during_background_writes(tmp_path, reference):
  model_dir = tmp_path / "run"
  rng = random.Random(1)

  def start(log):
    return [start_trainer(*ASYNC, f"--model_dir={model_dir}", log_path=log)]
  _kill_runs(model_dir, tmp_path, 2, rng, start,
             r"restored \S+/ckpt-{step} at step {step}")
  step = _sigterm_while_writing(model_dir, tmp_path / "term.txt")
  resumed = run_trainer(*ASYNC, f"--model_dir={model_dir}")
  assert f"restored {model_dir}/ckpt-{step} at step {step}" in resumed.stderr
  assert last_json(resumed)["global_step"] == STEPS
  _assert_equal_bits(checkpoint_weights(model_dir / f"ckpt-{STEPS}"),
                     reference)


@SLOW
@pytest.mark.timeout(7200)
def test_30_kills(tmp_path):
  model_dir = tmp_path / "run"
  rng = random.Random(30)

  def start(log):
    return [start_trainer(*ASYNC, f"--model_dir={model_dir}",
                          f"--train_steps={LONG}", log_path=log)]
  made, in_flight, _ = _kill_runs(model_dir, tmp_path, KILLS, rng, start,
                                  r"restored \S+/ckpt-{step} at step {step}")
  print(f"{made} kills: {in_flight} with a background write in flight")
  assert made == KILLS
  step = _sigterm_while_writing(model_dir, tmp_path / "term.txt",
                                f"--train_steps={LONG}")
  resumed = run_trainer(*ASYNC, f"--model_dir={model_dir}",
                        f"--train_steps={LONG}", timeout=1800)
  assert f"restored {model_dir}/ckpt-{step} at step {step}" in resumed.stderr
  reference = tmp_path / "ref"
  run_trainer(*MLP, f"--model_dir={reference}", f"--train_steps={LONG}",
              timeout=1800)
  _assert_equal_bits(checkpoint_weights(model_dir / f"ckpt-{LONG}"),
                     checkpoint_weights(reference / f"ckpt-{LONG}"))
  assert in_flight >= KILLS // 3


def _two_workers(args, log, timeout_s=600):
  return subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--workers=2",
       f"--timeout_s={timeout_s}", "--", *args],
      cwd=REPO, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
      start_new_session=True)


def _kill_with_workers(procs, model_dir=None):
  """SIGKILLs the launchers and every trainer they started (their children,
  and any process whose command line names `model_dir`, however it was
  parented), and waits until those are gone and the model_dir lock is free
  (a trainer still dying would hold it)."""
  pids = []
  for proc in procs:
    for entry in os.listdir("/proc"):
      try:
        with open(f"/proc/{entry}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == proc.pid:
            pids.append(int(entry))
      except (OSError, ValueError, IndexError):
        continue
  if model_dir is not None:
    named = f"--model_dir={model_dir}".encode()
    for entry in os.listdir("/proc"):
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          if named in f.read().split(b"\0") and int(entry) != os.getpid():
            pids.append(int(entry))
      except (OSError, ValueError):
        continue
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  stop_all(procs)
  deadline = time.monotonic() + 30
  while any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in pids):
    assert time.monotonic() < deadline, pids
    time.sleep(0.05)
  lock = None if model_dir is None else model_dir / ".trainer.lock"
  while lock is not None and lock.exists() and not _lock_free(lock):
    assert time.monotonic() < deadline, _holders(lock)
    time.sleep(0.05)


def _lock_free(path) -> bool:
  import fcntl
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return False
    fcntl.flock(f, fcntl.LOCK_UN)
    return True


def _holders(path) -> str:
  """The lock file's text and the processes that have it open."""
  found = []
  for entry in os.listdir("/proc"):
    try:
      for fd in os.listdir(f"/proc/{entry}/fd"):
        if os.readlink(f"/proc/{entry}/fd/{fd}") == str(path):
          with open(f"/proc/{entry}/cmdline", "rb") as f:
            found.append(f"{entry}: {f.read()[:300]!r}")
    except OSError:
      continue
  return f"{path.read_text()!r} held by {found}"


def _alive(pid) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@SLOW
@pytest.mark.timeout(7200)
def test_30_kills_two_workers(tmp_path):
  worker_flags = [a for a in MLP if not a.startswith("--global_batch_size")]
  worker_flags += ["--global_batch_size=64", "--strategy=multiworker",
                   f"--train_steps={LONG}"]
  reference_dir = tmp_path / "ref"
  with open(tmp_path / "ref.txt", "w"):
    pass
  ref = _two_workers([*worker_flags, f"--model_dir={reference_dir}"],
                     tmp_path / "ref.txt")
  assert ref.wait(timeout=900) == 0, (tmp_path / "ref.txt").read_text()[-3000:]
  model_dir = tmp_path / "run"
  rng = random.Random(2)

  def start(log):
    return [_two_workers([*worker_flags, "--async_checkpoint",
                          f"--model_dir={model_dir}"], log)]
  made, in_flight, _ = _kill_runs(model_dir, tmp_path, KILLS, rng, start,
                                  r"restored \S+/ckpt-{step} at step {step}",
                                  kill=lambda procs: _kill_with_workers(
                                      procs, model_dir))
  print(f"2 workers, {made} kills: {in_flight} with a background write in "
        "flight")
  assert made == KILLS
  final = _two_workers([*worker_flags, "--async_checkpoint",
                        f"--model_dir={model_dir}"], tmp_path / "final.txt")
  assert final.wait(timeout=900) == 0, \
      (tmp_path / "final.txt").read_text()[-3000:]
  _assert_equal_bits(checkpoint_weights(model_dir / f"ckpt-{LONG}"),
                     checkpoint_weights(reference_dir / f"ckpt-{LONG}"))
