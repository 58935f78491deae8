"""bench.paired's table: the ratios to the raw loop and, with a settle, the
CPU each contender's pipeline spent after its chunk (no timing here: the
figures are given)."""

from bench import paired


def test_table_ratios_and_cpu_after_each_chunk(capsys):
  times = {"raw": [0.10, 0.20, 0.30, 0.40],
           "framework": [0.11, 0.19, 0.33, 0.50]}
  after = {"raw": [0.0001, 0.0002, 0.0003, 0.0004],
           "framework": [0.0020, 0.0010, 0.0030, 0.0040]}
  paired._table(times, 50, after)  # noqa: SLF001
  raw, framework = [l.split() for l in capsys.readouterr().out.splitlines()]
  assert raw[0] == "raw" and raw[5] == "1.000"
  # Per-round ratios 0.10/0.11, 0.20/0.19, 0.30/0.33, 0.40/0.50; median of
  # the middle two.
  ratios = sorted([0.10 / 0.11, 0.20 / 0.19, 0.30 / 0.33, 0.40 / 0.50])
  assert float(framework[5]) == round((ratios[1] + ratios[2]) / 2, 3)
  assert float(framework[1]) == round(1000 * (0.19 + 0.33) / 2 / 50, 3)
  # Median CPU after the chunk: (2 + 3) / 2 ms, over the median chunk time
  # (0.26 s): 0.96%.
  assert framework[-6:-1] == ["after", "its", "chunk", "2.50", "ms"]
  assert framework[-1] == f"({0.0025 / 0.26:.2%})" == "(0.96%)"


def test_table_without_a_settle_has_no_cpu_column(capsys):
  paired._table({"raw": [0.1, 0.2], "framework": [0.1, 0.2]}, 10)  # noqa: SLF001
  out = capsys.readouterr().out
  assert "CPU after" not in out and len(out.splitlines()) == 2
