"""Progress display: fixed-format log lines off a terminal, one line in place
on a terminal."""

import io
import json
import re

from absl import logging
import pytest

from conftest import last_json, run_trainer

pytestmark = pytest.mark.timeout(180)

# absl prefix, then the documented line (trainer/summary.py:progress_line).
TRAIN_LINE = re.compile(
    r"^I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.py:\d+\] "
    r"train \| step: (\d+)/40 \| loss: \d+\.\d{4} \| accuracy: \d\.\d{4} \| "
    r"steps/sec: \d+\.\d \| examples/sec: \d+\.\d \| eta: \d+:\d\d:\d\d$")
EVAL_LINE = re.compile(
    r"^I\d{4} .*\] eval \| step: (\d+)/40 \| loss: \d+\.\d{4} \| "
    r"accuracy: \d\.\d{4}$")


def test_log_lines_off_a_terminal(tmp_path):
  proc = run_trainer("--model_dir=" + str(tmp_path / "run"), "--model=mlp",
                     "--train_steps=40", "--summary_every=10",
                     "--steps_per_loop=10", "--eval_every=20", timeout=240)
  lines = proc.stderr.splitlines()
  train = [l for l in lines if "] train |" in l]
  assert [int(TRAIN_LINE.match(l).group(1)) for l in train] == \
      [10, 20, 30, 40], train
  evals = [l for l in lines if "] eval |" in l]
  assert [int(EVAL_LINE.match(l).group(1)) for l in evals] == [20, 40], evals
  # No in-place redraws off a terminal, and stdout is the JSON line only.
  assert "\r" not in proc.stderr and "\x1b[K" not in proc.stderr
  assert [json.loads(l) for l in proc.stdout.splitlines() if l.strip()] == \
      [last_json(proc)]


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_one_line_in_place_on_a_terminal():
  from trainer import summary
  stream = _Terminal()
  progress = summary.Progress("auto", 100, enabled=True, stream=stream)
  try:
    assert progress.in_place
    progress.tick(10, steps_per_sec=50.0, batch_size=64)
    progress.summary(20, {"loss": 0.5, "accuracy": 0.75, "steps_per_sec": 50.0,
                          "examples_per_sec": 3200.0}, eta_s=2.0)
    progress._drawn_at = 0.0   # skip the redraw throttle
    progress.tick(30, steps_per_sec=100.0, batch_size=64)
    logging.use_absl_handler()   # what app.run does
    logging.warning("saved checkpoint x")   # must start on a fresh line
    progress.tick(40, steps_per_sec=100.0, batch_size=64)
  finally:
    progress.close()
  text = stream.getvalue()
  frames = text.split("\r")[1:]
  assert len(frames) == 4, frames
  assert frames[2].startswith("train [======..............] step: 30/100 | "
                              "loss: 0.5000 | accuracy: 0.7500 | "
                              "examples/sec: 6400.0 | eta: 0:00:00")
  # A log record ended the line first; close() ended the last one.
  assert frames[2].endswith("\x1b[K\n") and text.endswith("\x1b[K\n")
  assert text.count("\n") == 2


def test_log_mode_and_non_chief():
  from trainer import summary
  stream = _Terminal()
  assert not summary.Progress("log", 10, True, stream).in_place
  quiet = summary.Progress("line", 10, enabled=False, stream=stream)
  quiet.tick(5, 1.0, 1)
  quiet.summary(5, {"loss": 1.0}, None)
  quiet.close()
  assert stream.getvalue() == ""
  assert not summary.Progress("auto", 10, True, io.StringIO()).in_place
