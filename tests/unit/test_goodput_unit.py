"""The goodput account's arithmetic and record (trainer.goodput), and the
FLOP count and matmul peak of perf/ (trainer.flops), in process."""

import dataclasses
import json
import os
import time

import pytest

from trainer import goodput

pytestmark = pytest.mark.timeout(300)


def test_process_start_is_this_process():
  start, source = goodput.process_start()
  assert source.startswith("process start")
  # pytest started this process before this test ran, and not long ago.
  assert start <= goodput._IMPORTED <= time.time()  # noqa: SLF001
  assert time.time() - start < 3600


def test_a_timeline_adds_up_and_a_restart_carries_it(tmp_path):
  """Two processes on a made-up clock: the categories add up to the wall
  time, lost work is the updates past the checkpoint resumed from."""
  first = goodput.Recorder(str(tmp_path), True, 100.0, "test", 0)
  first.startup(105.0)                      # 5 s to the first chunk
  for _ in range(10):
    first.chunk(1.0, 10)                    # 100 updates, 0.1 s each
  first.input_wait(2.0)
  first.add("checkpoint_blocked_s", 0.5)
  first.add("evaluation_s", 1.5)
  first.add("other_s", 1.0)
  t = first.record(118.0, 100, 0.0)
  assert goodput.accounted(t) == pytest.approx(t.wall_s) == 18.0
  assert goodput.goodput(t) == pytest.approx(8.0 / 18.0)
  # Killed after step 100; the newest checkpoint is at 80; restart at 121.
  second = goodput.Recorder(str(tmp_path), True, 121.0, "test", 80)
  carried = second.carried
  assert carried.downtime_s == 3.0 and carried.restarts == 1
  assert carried.lost_updates == 20
  assert carried.lost_s == pytest.approx(2.0)      # 20 x 0.1 s
  assert carried.stepping_s == pytest.approx(6.0)  # 8 - 2 lost
  second.startup(124.0)
  second.chunk(2.0, 20)
  t = second.record(127.0, 100, 0.25, ended=goodput.FINISHED)
  assert t.wall_s == pytest.approx(18.0 + 3.0 + 6.0)
  assert goodput.accounted(t) == pytest.approx(t.wall_s - 1.0)  # 1 s unsaid
  assert t.checkpoint_background_s == 0.25 and t.updates == 120
  saved = json.loads((tmp_path / goodput.FILE).read_text())
  assert saved["last"]["ended"] == "finished"
  assert saved["goodput"] == pytest.approx(goodput.goodput(t))
  # A later run that extends a finished one: no downtime, no restart.
  third = goodput.Recorder(str(tmp_path), True, 10_000.0, "test", 100)
  assert third.carried.downtime_s == 3.0 and third.carried.restarts == 1
  assert third.carried.lost_updates == 20
  # A second run inside one process (the Python API) starts after the
  # first one's last record, not at the process's start.
  again = goodput.Recorder(str(tmp_path), True, 50.0, "test", 100)
  assert again.start == 127.0 and again.carried.downtime_s == 3.0


def test_rollback_and_update_time():
  rec = goodput.Recorder("/nonexistent", False, 0.0, "test", 0)
  rec.chunk(5.0, 10)          # the first chunk: a trace, 0.5 s per update
  assert rec.update_s() == pytest.approx(0.5)    # all there is so far
  rec.redone(30)              # a rollback: counted at the update time known
  for _ in range(4):
    rec.chunk(0.2, 10)        # 0.02 s per update
  assert rec.update_s() == pytest.approx(0.02)   # the first is left out
  t = rec.totals(10.0, 0.0)
  assert t.lost_updates == 30
  assert t.lost_s == pytest.approx(0.6)
  assert t.stepping_s == pytest.approx(5.8 - 0.6)
  assert not os.path.exists("/nonexistent")      # not the chief: no file


def test_machine_peak_is_measured_once(tmp_path, monkeypatch):
  from trainer import flops
  calls = []
  monkeypatch.setattr(flops, "matmul_gflops",
                      lambda *a: calls.append(a) or [10.0, 30.0, 20.0])
  key = {"cpu": "x", "cpus": 2}
  monkeypatch.setattr(flops, "_busy", lambda: False)
  assert flops.machine_peak("float32", str(tmp_path), key)[0] == 30.0
  peak, source = flops.machine_peak("float32", str(tmp_path), key)
  assert (peak, len(calls)) == (30.0, 1) and "earlier" in source
  flops.machine_peak("bfloat16", str(tmp_path), key)
  assert len(calls) == 2      # another dtype is another measurement
  # Measured on a busy machine: measured again once it is quiet, keeping
  # the higher figure.
  other = {"cpu": "y", "cpus": 2}
  monkeypatch.setattr(flops, "_busy", lambda: True)
  assert flops.machine_peak("float32", str(tmp_path), other)[0] == 30.0
  assert flops.machine_peak("float32", str(tmp_path), other)[0] == 30.0
  assert len(calls) == 3
  monkeypatch.setattr(flops, "matmul_gflops",
                      lambda *a: calls.append(a) or [50.0])
  monkeypatch.setattr(flops, "_busy", lambda: False)
  assert flops.machine_peak("float32", str(tmp_path), other)[0] == 50.0
  assert flops.machine_peak("float32", str(tmp_path), other)[0] == 50.0
  assert len(calls) == 4


def test_matmul_rate_is_counted():
  from trainer import flops
  rates = flops.matmul_gflops(64, "float32", reps=2, intervals=2)
  assert len(rates) == 2 and all(r > 0 for r in rates)


def test_flops_of_the_step():
  """The profiler's count of a dense model is the hand count; the built-in
  step counts 3 x forward, a traced step its forward and backward, and a
  task's own step is not counted by default."""
  import keras
  from trainer import actions, build, flops
  from trainer.config import Config
  model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
                            keras.layers.Dense(3, use_bias=False)])
  by_hand = (2 * 8 * 4 + 4) + 2 * 4 * 3
  assert flops.profiler_forward_flops(model, 5) == 5 * by_hand

  config = Config(model="mlp", dataset="digits", global_batch_size=16,
                  model_dir="unused")
  parts = build.parts(config)
  settings = build.narrow(actions.LoopSettings, parts.config)
  auto, how = actions.step_flops(parts, settings, "auto")
  forward = flops.profiler_forward_flops(parts.model, 16) / 16
  assert auto == pytest.approx(3 * forward) and "3 x" in how
  traced, how = actions.step_flops(parts, settings, "trace")
  # Backward: about twice the forward, less the first layer's input
  # gradient (not needed).
  assert 2.0 * forward < traced < 3.0 * forward, (traced, forward)

  class OwnStep(type(parts.task)):
    def train_step(self, batch, ctx):
      return super().train_step(batch, ctx)
  own = dataclasses.replace(parts, task=OwnStep.__new__(OwnStep))
  none, why = actions.step_flops(own, settings, "auto")
  assert none is None and "own train_step" in why
