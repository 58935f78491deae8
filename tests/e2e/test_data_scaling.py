"""Lazy readers: the work of a start-up does not grow with the number of
examples (two sizes 8x apart).

Counted, not timed (bench.data_scaling.count): what building the Source
reads, opens, lists and keeps. A count is the same on a busy machine as on
a quiet one; times and peak RSS, which are not, are reported by
`python -m bench.data_scaling compare` and `table` instead.
"""

import pytest

from bench import data_scaling

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

SMALL, LARGE = 4000, 32000
SHARDS = 4   # bench.data_scaling.write's ArrayRecord files per set
# What the start-up of the larger set may do more than the smaller one's,
# for its 28,000 more examples. A reader that touches every example does
# one read call (and ~1 KB) per example at least, and holds the decoded
# or encoded example (~1-3 KB); a lazy one reads an index or a listing
# (~20 bytes an example, in a few calls) and holds a key or a path.
READ_CALLS_PER_EXTRA = 1 / 100
BYTES_READ_SHARE = 0.05     # of the extra data's bytes on disk
HELD_BYTES_PER_EXTRA = 64   # a key or path and a label, not the example
HELD_BLOCKS_PER_EXTRA = 1 / 100   # arrays, not an object per example


def _count(tmp_path, kind):
  """(small, large): each set's counts, built twice in one fresh process
  (bench.data_scaling.count: the second build is a start with the files'
  listings cached on disk, the first one is not)."""
  dirs = [str(tmp_path / str(n)) for n in (SMALL, LARGE)]
  for n, d in zip((SMALL, LARGE), dirs):
    data_scaling.write(kind, n, d)
  small, large = data_scaling.count_in_subprocess(kind, ",".join(dirs),
                                                  builds=2)
  assert (small["examples"], large["examples"]) == (SMALL, LARGE)
  return small, large


def _assert_flat_in_n(small, large):
  """The warm start of the larger set reads (calls and bytes) and holds
  (bytes and allocations) about what the smaller one's does."""
  s, l = small["builds"][-1], large["builds"][-1]
  extra = LARGE - SMALL
  if s["read_calls"] is None:
    pytest.skip("no /proc/self/io on this system: read calls and bytes "
                "are not counted")
  assert l["read_calls"] - s["read_calls"] < READ_CALLS_PER_EXTRA * extra, \
      (small, large)
  extra_bytes = large["data_bytes"] - small["data_bytes"]
  assert l["bytes_read"] - s["bytes_read"] < BYTES_READ_SHARE * extra_bytes, \
      (small, large)
  assert l["held_bytes"] - s["held_bytes"] < HELD_BYTES_PER_EXTRA * extra, \
      (small, large)
  assert l["held_blocks"] - s["held_blocks"] < HELD_BLOCKS_PER_EXTRA * extra, \
      (small, large)


def test_array_record_startup_reads_o1_of_the_data(tmp_path):
  """Each file opened once (its index read once) and ONE record read (the
  first: shape and class count), whatever the size. The in-memory
  tfrecord reader reads, decodes and holds every record (it went
  719 -> 899 MB and 1.1 -> 6.4 s from 4k to 32k examples)."""
  small, large = _count(tmp_path, "array_record")
  for row in (small, large):
    for build in row["builds"]:
      assert build["files_opened"] == SHARDS, row
      assert build["records_read"] == 1, row
  _assert_flat_in_n(small, large)


def test_image_folder_keeps_paths_only(tmp_path):
  """The first start lists the folder (file by file) and reads the few
  images that decide the channel count; the next one reads the listing
  back (readers.folder_index): no listing, no image read. The reader
  without --image_size decodes every image at start-up instead."""
  from trainer.data.readers import image_folder
  small, large = _count(tmp_path, "image_folder")
  probes = image_folder._CHANNEL_PROBES  # noqa: SLF001
  for row in (small, large):
    cold, warm = row["builds"]
    assert (cold["listings"], warm["listings"]) == (1, 0), row
    assert (cold["records_read"], warm["records_read"]) == (probes, 0), row
  _assert_flat_in_n(small, large)
