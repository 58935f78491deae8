"""bench.outside's arithmetic and parsing (no process is run, nothing is
timed: the figures are given)."""

import pytest

from bench import outside


def test_differencing_cancels_what_both_runs_do_once():
  # 7 s of start-up + 5 ms per update, runs of 4,100 and 100 updates.
  long_s, short_s = 7.0 + 4100 * 0.005, 7.0 + 100 * 0.005
  assert outside.per_update(long_s, short_s, 4100, 100) == pytest.approx(
      0.005)
  with pytest.raises(ValueError):
    outside.per_update(1.0, 2.0, 100, 100)


def test_ratios_per_round_and_best():
  reference = [0.0050, 0.0060, 0.0040]
  contender = [0.0055, 0.0050, 0.0040]
  q = outside.ratios(reference, contender)
  per_round = [0.0050 / 0.0055, 0.0060 / 0.0050, 1.0]
  assert q["rounds"] == pytest.approx(per_round)
  assert (q["min"], q["median"], q["max"]) == pytest.approx(
      (per_round[0], 1.0, per_round[1]))
  assert q["best"] == pytest.approx(1.0)   # 0.0040 / 0.0040
  assert q["dropped"] == 0
  # A round whose difference is not positive (start-up jitter) is dropped.
  q = outside.ratios([0.005, -0.001, 0.006], [0.004, 0.005, -0.002])
  assert q["dropped"] == 2 and q["rounds"] == pytest.approx([1.25])
  assert outside.ratios([-1.0], [1.0]) == {"dropped": 1}


def test_contenders_parse_and_refuse():
  got = outside.parse_contenders(
      "cli, probe_off,raw,keras,spl25:--steps_per_loop=25 --summary_every=50")
  assert got == {"cli": [], "probe_off": ["--input_wait_steps=0"],
                 "raw": None, "keras": None,
                 "spl25": ["--steps_per_loop=25", "--summary_every=50"]}
  for bad in ("cli,cli", "nonesuch", "raw,keras", "x:steps_per_loop=2"):
    with pytest.raises(ValueError):
      outside.parse_contenders(bad)


def test_schedule_rotates_and_alternates():
  names = ["cli", "raw", "keras"]
  assert outside.schedule(names, 0) == [
      ("cli", "short"), ("cli", "long"), ("raw", "short"), ("raw", "long"),
      ("keras", "short"), ("keras", "long")]
  assert [n for n, _ in outside.schedule(names, 1)][::2] == [
      "raw", "keras", "cli"]
  assert outside.schedule(names, 1)[0] == ("raw", "long")


def test_docstring_examples():
  import doctest
  failed, tried = doctest.testmod(outside)
  assert tried >= 2 and failed == 0
