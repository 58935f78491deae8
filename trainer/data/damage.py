"""Damaged examples found while training reads them (lazy readers).

The pipeline gives such an example weight 0 (shapes stay static, every
topology gets the same result) and calls `note` from the host. With
--skip_corrupt the train scalar `skipped_examples` counts them and each
damaged file is named once in the log; without it the loop saves a
checkpoint after the chunk and stops with `error()`'s one line.
"""

import threading

from absl import logging

_lock = threading.Lock()
_files_logged: set[str] = set()
_first: list[str] = []


def note(dataset: str, where: list[str], skip_corrupt: bool) -> None:
  """Records damaged examples `where` ("FILE" or "FILE record N")."""
  with _lock:
    if where and not _first:
      _first.append(where[0])
    for w in where:
      path = w.split(" record ")[0]
      if path not in _files_logged:
        # Logged in every mode: evaluation reads with weight 0 too and
        # never stops, so the log is where a damaged eval file shows.
        _files_logged.add(path)
        logging.warning("--dataset=%s: damaged example %s given weight 0%s; "
                        "further ones of this file are not logged.", dataset,
                        w, " (counted in skipped_examples)" if skip_corrupt
                        else "")


def found() -> bool:
  with _lock:
    return bool(_first)


def error_line(dataset: str) -> str:
  with _lock:
    where = _first[0] if _first else "?"
  return (f"--dataset={dataset}: {where} is damaged (it does not decode); "
          "a checkpoint was saved. Replace or re-create the file, or pass "
          "--skip_corrupt to train on with that example at weight 0.")


def reset() -> None:
  """For tests that train twice in one process."""
  with _lock:
    _files_logged.clear()
    _first.clear()
