"""image_folder's listing kept between runs (readers.folder_index): read back
while the folder is unchanged, listed again after any change to it."""

import os
import time

import numpy as np
import pytest

from trainer.data import registry
from trainer.data.readers import folder_index, image_folder

pytestmark = pytest.mark.timeout(120)

_LONG_AGO = time.time() - 3600


def _make(root, classes=("a", "b"), per_class=4):
  for c in classes:
    (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      (root / c / f"{i}.png").write_bytes(b"not decoded: paths only")
  _settle(root)


def _settle(root):
  """Dates every directory an hour back: no change in the last seconds,
  so a listing may be saved (folder_index.SETTLE_S)."""
  for parent, _, _ in os.walk(root):
    os.utime(parent, (_LONG_AGO, _LONG_AGO))


def _read(root, cache, split="train"):
  image_folder._lazy.cache_clear()  # noqa: SLF001 - the in-process cache
  args = registry.DataArgs(data_dir=str(root), any_size=True,
                           cache_dir=str(cache))
  return registry.get("image_folder")(split, args)


def _labels(source):
  indices = np.arange(source.num_examples, dtype=np.int64)
  return source.gather(indices)[1].numpy()


@pytest.fixture
def no_listing(monkeypatch):
  """Makes any listing of a folder fail: only a cached one can be used."""
  def fail(root):
    raise AssertionError(f"listed {root} again")
  return lambda: monkeypatch.setattr(image_folder, "_listing", fail)


def _cache_files(cache):
  return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_unchanged_folder_is_not_listed_again(tmp_path, no_listing):
  root, cache = tmp_path / "data", tmp_path / "cache"
  _make(root)
  first = _read(root, cache)
  assert len(_cache_files(cache)) == 1
  no_listing()
  again = _read(root, cache)
  assert again.num_examples == first.num_examples == 8
  assert again.num_classes == 2 and again.decode_channels == 3
  np.testing.assert_array_equal(_labels(again), _labels(first))
  assert [again.describe(i) for i in range(8)] == [first.describe(i)
                                                   for i in range(8)]


@pytest.mark.parametrize("change", ["add_file", "remove_file", "add_class",
                                    "add_nested", "rename_file"])
def test_any_change_lists_again(tmp_path, change):
  root, cache = tmp_path / "data", tmp_path / "cache"
  _make(root)
  if change == "add_nested":
    (root / "b" / "deep").mkdir()
    (root / "b" / "deep" / "0.png").write_bytes(b"x")
    _settle(root)
  before = _read(root, cache)
  assert len(_cache_files(cache)) == 1
  if change == "add_file":
    (root / "a" / "new.png").write_bytes(b"x")
  elif change == "remove_file":
    (root / "b" / "0.png").unlink()
  elif change == "add_class":
    (root / "c").mkdir()
    (root / "c" / "0.png").write_bytes(b"x")
  elif change == "add_nested":
    # Only the nested folder's own mtime says that it gained a file.
    (root / "b" / "deep" / "1.png").write_bytes(b"x")
  else:
    (root / "a" / "1.png").rename(root / "a" / "9.png")
  after = _read(root, cache)
  names = sorted(after.describe(i) for i in range(after.num_examples))
  assert names == sorted(str(p) for p in root.rglob("*.png"))
  if change == "add_class":
    assert after.num_classes == before.num_classes + 1
  else:
    assert after.num_examples != before.num_examples or names != sorted(
        before.describe(i) for i in range(before.num_examples))


def test_folder_still_changing_is_not_saved(tmp_path):
  """A directory modified within the last seconds: its mtime may not yet
  show a change made in the same granule, so the listing is not kept."""
  root, cache = tmp_path / "data", tmp_path / "cache"
  _make(root)
  (root / "a" / "fresh.png").write_bytes(b"x")   # mtime: now
  _read(root, cache)
  assert _cache_files(cache) == []
  _settle(root)
  _read(root, cache)
  assert len(_cache_files(cache)) == 1


def test_off_and_unwritable(tmp_path, caplog):
  root = tmp_path / "data"
  _make(root)
  image_folder._lazy.cache_clear()  # noqa: SLF001
  args = registry.DataArgs(data_dir=str(root), any_size=True,
                           cache_dir=folder_index.NONE)
  assert registry.get("image_folder")("train", args).num_examples == 8
  assert folder_index.location(folder_index.NONE) is None
  blocked = tmp_path / "a_file"
  blocked.write_bytes(b"")         # a file where the cache directory would be
  assert _read(root, blocked).num_examples == 8
  assert "cannot write the listing cache" in caplog.text


def test_damaged_or_foreign_cache_is_a_miss(tmp_path, caplog):
  """A cache file that is not ours is never trusted, and nothing in it runs
  (allow_pickle=False: an object array is refused, not unpickled)."""
  root, cache = tmp_path / "data", tmp_path / "cache"
  _make(root)
  _read(root, cache)
  (saved,) = cache.iterdir()
  saved.write_bytes(b"garbage")
  assert _read(root, cache).num_examples == 8
  assert "ignoring the unreadable listing cache" in caplog.text
  # Now rewritten by the listing above; replace it with an object array.
  with open(saved, "wb") as f:
    np.savez(f, version=np.array([object()], dtype=object))
  assert _read(root, cache).num_examples == 8
  # Another folder's listing under this folder's name: not used.
  other = tmp_path / "other"
  _make(other, classes=("x",), per_class=2)
  _read(other, cache)
  (other_file,) = set(cache.iterdir()) - {saved}
  os.replace(other_file, saved)
  assert _read(root, cache).num_classes == 2


def test_default_location(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert folder_index.location("") == str(tmp_path / "trainer")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert folder_index.location("") == str(tmp_path / ".cache" / "trainer")
  assert folder_index.location("/x") == "/x"


def test_listings_of_deleted_folders_are_dropped(tmp_path):
  import shutil
  cache = tmp_path / "cache"
  kept, gone, new = (tmp_path / n for n in ("kept", "gone", "new"))
  for root in (kept, gone):
    _make(root)
    _read(root, cache)
  assert len(_cache_files(cache)) == 2
  shutil.rmtree(gone)
  _make(new)
  _read(new, cache)      # a save: the listing of `gone` is deleted
  roots = set()
  for name in _cache_files(cache):
    with np.load(cache / name, allow_pickle=False) as saved:
      roots.add(bytes(saved["root"]).decode())
  assert roots == {str(kept), str(new)}
