"""The goodput account across a SIGKILL and a restart: every category is
reported, they add up to the wall time, lost work is the updates redone;
the JSON line carries `goodput`; goodput/ and perf/ are in TensorBoard."""

import json
import os
import re
import signal
import time

import pytest

from conftest import (event_accumulator, last_json, run_trainer,
                      start_trainer, stop, wait_for_file)

pytestmark = pytest.mark.timeout(300)

FLAGS = ["--model=mlp", "--dataset=digits", "--global_batch_size=32",
         "--train_steps=120", "--steps_per_loop=5", "--summary_every=5",
         "--checkpoint_every=20", "--eval_every=20", "--mode=train_and_eval"]
CATEGORIES = ("startup_s", "stepping_s", "input_wait_s",
              "checkpoint_blocked_s", "evaluation_s", "other_s", "lost_s",
              "downtime_s")


def _scalars(directory) -> dict:
  """{tag: {step: value}} of the scalars of an event directory, read once."""
  from tensorboard.util import tensor_util
  acc = event_accumulator(directory)
  found = {}
  for tag in acc.Tags()["tensors"]:
    for e in acc.Tensors(tag):
      value = tensor_util.make_ndarray(e.tensor_proto)
      if value.shape == () and value.dtype.kind in "fiu":
        found.setdefault(tag, {})[e.step] = float(value)
  return found


def _record(model_dir):
  try:
    with open(model_dir / "goodput.json") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _newest_checkpoint(model_dir) -> int:
  steps = [int(m.group(1)) for m in (re.match(r"ckpt-(\d+)\.index$", n)
                                     for n in os.listdir(model_dir)) if m]
  return max(steps, default=0)


def _freeze_between_checkpoints(proc, model_dir, deadline_s=120):
  """SIGSTOPs the run at a moment its record is past its newest checkpoint;
  returns (the record then, the newest checkpoint's step)."""
  deadline = time.monotonic() + deadline_s
  while time.monotonic() < deadline:
    assert proc.poll() is None, "the run ended before it could be killed"
    record = _record(model_dir)
    if record and record["last"]["step"] > _newest_checkpoint(model_dir) > 0:
      os.killpg(proc.pid, signal.SIGSTOP)
      record, newest = _record(model_dir), _newest_checkpoint(model_dir)
      if record["last"]["step"] > newest:
        return record, newest
      os.killpg(proc.pid, signal.SIGCONT)
    time.sleep(0.005)
  raise AssertionError("never saw the run between two checkpoints")


def test_goodput_account_across_a_kill_and_restart(tmp_path):
  model_dir = tmp_path / "run"
  began = time.time()
  first = start_trainer(*FLAGS, f"--model_dir={model_dir}",
                        log_path=tmp_path / "first.log")
  try:
    wait_for_file(model_dir / "ckpt-20.index", first)
    at_kill, newest = _freeze_between_checkpoints(first, model_dir)
    assert stop(first, signal.SIGKILL) == -signal.SIGKILL
  finally:
    stop(first)
  time.sleep(1.0)   # downtime the account must see
  restarted_at = time.time()
  second = run_trainer(*FLAGS, f"--model_dir={model_dir}")
  ended = time.time()
  restored = int(re.search(r"restored \S+ at step (\d+)",
                           second.stderr).group(1))
  assert restored == newest

  out = last_json(second)
  final = _record(model_dir)
  totals = final["totals"]
  assert out["global_step"] == 120
  assert out["goodput"] == pytest.approx(final["goodput"])
  assert 0 < out["goodput"] < 1
  assert out["goodput"] == pytest.approx(totals["stepping_s"]
                                         / totals["wall_s"])
  # Each category is there, and together they are the wall time.
  for name in CATEGORIES:
    assert totals[name] > 0, (name, totals)
  accounted = sum(totals[name] for name in CATEGORIES)
  assert abs(accounted - totals["wall_s"]) <= 0.02 * totals["wall_s"], totals
  # The wall time is the two processes' and the gap: within what the test
  # saw from outside (less the second process's exit after its last record).
  assert totals["wall_s"] <= ended - began
  assert totals["wall_s"] >= 0.8 * (ended - began) - 5, (totals, ended - began)
  assert totals["restarts"] == 1
  # Downtime: from the killed process's last record to the restart.
  gap = restarted_at - at_kill["last"]["record"]
  assert 1.0 <= totals["downtime_s"] <= gap + 5, (totals, gap)
  # Lost work: the updates between the checkpoint resumed from and the step
  # the killed process had reached, at its update time.
  redone = at_kill["last"]["step"] - restored
  assert totals["lost_updates"] == redone > 0
  assert totals["lost_s"] == pytest.approx(
      redone * at_kill["last"]["update_s"], rel=1e-9)
  # Updates stepped: the killed process's and the restarted one's.
  assert totals["updates"] == at_kill["totals"]["updates"] + 120 - restored
  assert totals["checkpoint_background_s"] == 0.0   # saves are synchronous

  train = _scalars(model_dir / "train")
  for tag in ("checkpoint_blocked_s", "checkpoint_background_s", "goodput",
              *CATEGORIES):
    values = train.get(f"goodput/{tag}", {})
    assert values, tag
  assert train.get("goodput/goodput", {})[120] == pytest.approx(
      final["goodput"], rel=1e-6)
  assert train.get("goodput/lost_updates", {})[120] == redone
  step_s = train.get("goodput/worker_0/step_s", {})
  assert 0 < step_s[120] < 1.0
  # perf/: the rate is the examples/sec times the counted FLOPs, and a
  # share of the measured peak.
  per_example = train.get("perf/flops_per_example", {})[120]
  rate = train.get("examples_per_sec", {})[120]
  achieved = train.get("perf/model_flops_per_sec", {})[120]
  peak = train.get("perf/peak_flops_per_sec", {})[120]
  assert achieved == pytest.approx(rate * per_example, rel=1e-5)
  assert 0 < train.get("perf/peak_share", {})[120] == pytest.approx(
      achieved / peak, rel=1e-5)
  assert 1e9 < peak < 1e14
