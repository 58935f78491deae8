"""Correctness of the benchmark's bookkeeping (no timing is asserted)."""

import os

import pytest

from bench import common, report, rows as rows_lib, run as run_lib


def _run(rate, steady=(1.0,), **extra):
  return {"rates": [0.1, 0.2, *steady], "steady": list(steady),
          "steps_per_sec": rate, "wall_s": 10.0, "foreign_load": 0.05,
          **extra}


def _assemble(results, flops=None, ceiling=None):
  rows = [r for r in rows_lib.catalog() if r.name in results]
  return report.assemble(rows, results, flops or {}, ceiling or {},
                         {"mode": "test"})


def test_steady_drops_warmup_and_median():
  assert common.steady([1, 2, 3, 4, 5]) == [3, 4, 5]
  assert common.median([3.0, None, 1.0, 2.0]) == 2.0
  assert common.median([]) is None


def test_parse_result_takes_last_tagged_line():
  out = "noise\nBENCH_RESULT {\"a\": 1}\nmore\nBENCH_RESULT {\"a\": 2}\n"
  assert common.parse_result(out) == {"a": 2}
  assert common.parse_result("nothing") is None


def test_ratios_use_examples_per_sec_and_medians_of_runs():
  data = _assemble({
      "cnn_b32/raw": [_run(100.0), _run(120.0), _run(110.0)],
      "cnn_b32/fw_default": [_run(99.0), _run(108.9)],
      # K=4: 4x the examples per update, so 25 updates/s = 100 "K=1" steps/s.
      "cnn_b32/fw_accum4": [_run(25.0)],
  })
  by = {r["name"]: r for r in data["rows"]}
  assert by["cnn_b32/raw"]["steps_per_sec"] == 110.0
  assert by["cnn_b32/fw_default"]["steps_per_sec"] == pytest.approx(103.95)
  assert by["cnn_b32/fw_default"]["x_raw"] == pytest.approx(103.95 / 110.0)
  assert by["cnn_b32/fw_accum4"]["examples_per_sec"] == 25.0 * 128
  assert by["cnn_b32/fw_accum4"]["x_ref"] == pytest.approx(3200 / (103.95 * 32))
  goals = {g["goal"]: g for g in data["goals"]}
  g = goals["framework/raw cnn_b32"]
  assert g["ratio"] == pytest.approx(103.95 / 110.0) and g["met"] is False
  assert g["paired_ratios"] == pytest.approx([0.99, 108.9 / 120.0])


def test_scaling_goals_per_model_and_the_machine_ceiling():
  data = _assemble({
      "cnn_w1/pinned": [_run(100.0)], "cnn_w2/pinned": [_run(70.0)],
      "resnet20_w1/pinned": [_run(6.0)], "resnet20_w2/pinned": [_run(5.7)],
      "cnn_w1/raw_pinned": [_run(100.0)], "cnn_w2/raw_pinned": [_run(95.0)],
  })
  goals = {g["goal"].split(" (")[0]: g for g in data["goals"]}
  # Twice the examples per update: ratio = 2 x the updates/sec ratio.
  cnn = goals["2 workers pinned vs 1 worker pinned, cnn"]
  assert cnn["ratio"] == pytest.approx(1.4) and cnn["met"] is False
  resnet = goals["2 workers pinned vs 1 worker pinned, resnet20"]
  assert resnet["ratio"] == pytest.approx(1.9) and resnet["met"] is True
  ceiling = goals["machine ceiling: 2 independent pinned raw loops vs 1, cnn"]
  assert ceiling["ratio"] == pytest.approx(1.9)
  assert ceiling["rows"] == ["cnn_w2/raw_pinned", "cnn_w1/raw_pinned"]


def test_gflops_from_counted_flops_and_ceiling():
  flops = {"models": {"cnn": {"train_flops_per_example": 3e6}}}
  data = _assemble({"cnn_b32/raw": [_run(100.0)]}, flops,
                   {"float32": {"gflops": 192.0}})
  row = data["rows"][0]
  assert row["gflops"] == pytest.approx(100 * 32 * 3e6 / 1e9)
  assert row["pct_of_fp32_peak"] == pytest.approx(100 * 9.6 / 192.0)


def test_skipped_and_failed_rows_are_reported_not_counted():
  data = _assemble({
      "cnn_w1/pinned": [{"skipped": "launch.local not available"}],
      "cnn_w2/pinned": [{"error": "exit 1: boom", "wall_s": 1.0}],
  })
  by = {r["name"]: r for r in data["rows"]}
  assert by["cnn_w1/pinned"]["status"].startswith("skipped: launch.local")
  assert by["cnn_w2/pinned"]["status"].startswith("error: exit 1")
  goal = [g for g in data["goals"] if "workers" in g["goal"]][0]
  assert goal["met"] is None and goal["ratio"] is None
  text = report.terminal({**data, "run": {
      "started": "now", "duration_s": 1, "mode": "test", "repeats": 1,
      "min_seconds": 5, "min_intervals": 3, "warmup_intervals": 2,
      "machine": {}}})
  assert "skipped: launch.local not available" in text


def test_accuracy_goal_in_points():
  acc = lambda a: {"final": {"eval_accuracy": a}, "wall_s": 1.0,  # noqa: E731
                   "foreign_load": 0.0}
  data = _assemble({"accuracy/fp32": [acc(0.9800)],
                    "accuracy/bf16": [acc(0.9770)],
                    "accuracy/xla": [acc(0.9790)]})
  goals = {g["goal"]: g for g in data["goals"]}
  bf16 = goals["bf16 eval accuracy within 0.5 points of fp32"]
  xla = goals["xla eval accuracy within 0.5 points of fp32"]
  assert bf16["diff_points"] == pytest.approx(-0.3) and bf16["met"]
  assert xla["met"]


def test_row_selection_by_name_and_group():
  class A:
    rows, quick = "cnn_b32/raw,cnn_w2/pinned,cnn_b128", False
  names = [r.name for r in run_lib.select_rows(A)]   # in catalog order
  assert "cnn_b32/raw" in names and "cnn_w2/pinned" in names
  assert "cnn_w2/pinned_accum4" not in names
  rest = set(names) - {"cnn_b32/raw", "cnn_w2/pinned"}
  assert rest and {n.split("/")[0] for n in rest} == {"cnn_b128"}
  class Full:
    rows, quick = "", False
  full = run_lib.select_rows(Full)
  assert full and not any(r.extra for r in full)
  class Q:
    rows, quick = "", True
  assert all(r.quick for r in run_lib.select_rows(Q))
  class Bad:
    rows, quick = "nope", False
  with pytest.raises(SystemExit):
    run_lib.select_rows(Bad)


def test_framework_steps_cover_warmup_and_steady_state():
  class Args:
    min_intervals, min_seconds, quiet_budget, keep_tmp = 3, 5.0, 0, False
  bench = run_lib.Bench(Args)
  try:
    row = rows_lib.by_name()["cnn_b32/fw_default"]
    steps = bench._train_steps(row)
    assert steps % row.interval == 0
    steady = steps // row.interval - common.WARMUP_INTERVALS
    assert steady >= 3 and steady * row.interval / row.prior >= 5.0
  finally:
    bench.close()
    assert not os.path.exists(bench.tmp)


def test_event_reader_rates(tmp_path):
  tf = pytest.importorskip("tensorflow")
  from bench import events
  writer = tf.summary.create_file_writer(str(tmp_path))
  with writer.as_default():
    for step, rate in ((50, 10.0), (100, 20.0), (150, 30.0)):
      tf.summary.scalar("steps_per_sec", rate, step=step)
      tf.summary.text("config", "not a number", step=step)
  writer.flush()
  logged, wall = events.interval_rates(str(tmp_path))
  assert logged == [10.0, 20.0, 30.0]
  assert wall[0] is None and len(wall) == 3


def test_paired_runs_every_contender_interleaved(capsys):
  """bench.paired end to end on a tiny setting (no timing is asserted): the
  four contenders are measured and the raw loop is its own reference."""
  from absl import logging
  from bench import paired
  verbosity = logging.get_verbosity()
  assert paired.main(["--batch=8", "--interval=2", "--rounds=4"]) == 0
  # Global logging is left as it was (later tests in this process log).
  assert logging.get_verbosity() == verbosity
  out = capsys.readouterr().out.splitlines()
  # First the machine (CPU, flags, cores, load), then the setting.
  assert out[0].startswith("machine: ") and "load avg" in out[0]
  assert out[1].startswith("cnn default (1 replica) global batch 8")
  lines = [l.split() for l in out[2:]]
  assert [l[0] for l in lines] == ["raw", "raw_fused", "framework",
                                   "framework_guarded"]
  by = {l[0]: l for l in lines}
  assert by["raw"][5] == "1.000"   # "raw 3.5 ms/update x raw 1.000 [...]"
  assert all(float(l[1]) > 0 for l in lines)   # ms/update


def test_paired_gan_row(capsys):
  """bench.paired --gan on a tiny setting (no timing asserted): the
  hand-written GAN loop is the reference, the trainer's chunk raced."""
  from bench import paired
  assert paired.main(["--gan", "--batch=8", "--interval=2",
                      "--rounds=3"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("machine: ")
  assert out[1].startswith("dcgan default")
  lines = [l.split() for l in out[2:]]
  assert [l[0] for l in lines] == ["gan_raw", "gan_framework"]
  assert lines[0][5] == "1.000" and all(float(l[1]) > 0 for l in lines)


@pytest.mark.timeout(240)
def test_paired_multiworker_under_launch_local():
  """bench.paired as the module of 2 local workers (no timing asserted):
  both workers measure the raw loop under the strategy, the framework and
  the communication-free local loop, in the same order, and exit 0."""
  import subprocess
  import sys
  from tests.conftest import REPO, env
  proc = subprocess.run(
      [sys.executable, "-m", "launch.local", "--workers=2",
       "--trainer_module=bench.paired", "--timeout_s=180", "--",
       "--strategy=multiworker", "--batch=16", "--interval=2", "--rounds=2"],
      cwd=REPO, env=env(), capture_output=True, text=True, timeout=220)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for worker in (0, 1):
    assert f"[worker {worker}] cnn multiworker (2 replicas) global batch 16" \
        in proc.stdout, proc.stdout[-2000:]
    lines = [l.split()[2:] for l in proc.stdout.splitlines()
             if l.startswith(f"[worker {worker}]   ")]
    assert [l[0] for l in lines] == ["raw", "framework", "raw_local"], \
        proc.stdout[-2000:]
    assert all(float(l[1]) > 0 for l in lines)
    assert dict((l[0], l[5]) for l in lines)["raw"] == "1.000"


def test_end_to_end_data_is_mnist_when_present_else_synthetic(tmp_path):
  from bench import end_to_end
  fallback = end_to_end.data_settings("auto", str(tmp_path))
  assert fallback["fields"]["dataset"] == "synthetic"
  assert "synthetic" in fallback["label"]
  with pytest.raises(SystemExit, match="no MNIST files"):
    end_to_end.data_settings("mnist", str(tmp_path))
  (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
  found = end_to_end.data_settings("auto", str(tmp_path))
  assert found["fields"]["dataset"] == "mnist"
  assert found["fields"]["train_split"] == "test"
  assert end_to_end.data_settings("synthetic", str(tmp_path))["fields"][
      "dataset"] == "synthetic"


def test_end_to_end_raw_side_reads_the_trainers_examples():
  """Same data on both sides: the hand-written loop's in-memory arrays,
  at the indices of the trainer's first batch, equal that batch as the
  trainer's pipeline and preprocessing give it (another code path)."""
  import argparse
  import numpy as np
  from bench import end_to_end
  from trainer import build
  from trainer.data import pipeline
  args = argparse.Namespace(model="cnn", batch=16, interval=10,
                            data="synthetic")
  config = end_to_end._config(args, "unused", 100)  # noqa: SLF001
  parts = build.parts(config)
  source = parts.task.source(config.train_split)
  images, labels = end_to_end.in_memory(source)
  assert images.dtype == np.float32 and images.shape == (10000, 28, 28, 1)
  assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.9
  features, batch_labels, meta = next(iter(pipeline.train_dataset(
      parts.task, config.train_split, 16, config.seed, 0)))
  index = pipeline.example_indices(meta["pos"], source.num_examples,
                                   config.seed).numpy()
  assert len(set(index)) == 16   # a shuffled batch, not rows 0..15
  np.testing.assert_array_equal(features.numpy(), images[index])
  np.testing.assert_array_equal(batch_labels.numpy(), labels[index])


def test_paired_end_to_end_runs_the_trainers_loop(tmp_path, capsys):
  """The end-to-end contender (no timing asserted): the trainer really ran
  every interval and wrote its summaries; every contender has one time per
  round; the chunk share of the trainer's interval is a share; the table
  names the machine and the data, with the raw loop as reference."""
  import argparse
  from bench import end_to_end, machine, paired
  from tests.conftest import event_steps
  args = argparse.Namespace(model="cnn", batch=8, interval=10, rounds=3,
                            data="synthetic", settle=0.01)
  times, details = end_to_end.measure(args, str(tmp_path))
  # A settle before each timed interval, the trainer's too (its first
  # after the warm-up, then one after each of its timed intervals).
  assert {k: len(v) for k, v in details["after"].items()} == {
      "raw_data": 3, "framework": 3, "framework_cached": 3, "end_to_end": 4}
  assert list(times) == ["raw_data", "framework", "framework_cached",
                         "end_to_end"]
  assert all(len(ts) == 3 and min(ts) > 0 for ts in times.values())
  total = (3 + end_to_end.WARMUP_INTERVALS + 1) * 10
  assert details["global_step"] == total
  assert all(0 < c < t for c, t in zip(details["inside_chunks"],
                                        times["end_to_end"]))
  assert event_steps(str(tmp_path / "e2e" / "train"), "steps_per_sec") == \
      list(range(10, total + 1, 10))
  paired._print_end_to_end(args, times, details, machine.info())  # noqa: SLF001
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("machine: ")
  assert out[1].startswith("cnn end to end on synthetic 28x28x1")
  rows = [l.split() for l in out[2:6]]
  assert [r[0] for r in rows] == list(times) and rows[0][5] == "1.000"
  assert out[6].startswith("  end_to_end inside executor.run")


def test_trace_breaks_down_both_loops(capsys):
  """bench.trace on a tiny setting (no timing asserted): both loops are
  traced, and each category that both must have (the model's forward and
  backward ops, the optimizer's, Keras' or the fused kernel) is found."""
  from bench import trace
  assert trace.main(["--batch=8", "--updates=4", "--data=synthetic"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("machine: ")
  assert out[2].split() == ["raw_data", "framework"]
  rows = {l[:22].strip(): [float(x) for x in l[22:].split()]
          for l in out[3:]}
  for kind in ("wall", "forward", "backward", "optimizer"):
    assert all(v > 0 for v in rows[kind]), (kind, out)
  # The trainer's pipeline runs tf.data threads; so does the raw loop's.
  assert rows["input pipeline CPU"][1] > 0
