"""Damaged examples found while training reads them (lazy readers).

The pipeline gives such an example weight 0 (shapes stay static, every
topology gets the same result) and calls `note` from the host. With
--skip_corrupt the train scalar `skipped_examples` counts them and each
damaged file is named once in the log; without it the loop saves a
checkpoint after the chunk and stops with `error_line()`'s one line.
"""

import threading

from absl import logging


class DamageLog:
  """The damaged examples one run's reading found (its task owns it)."""

  def __init__(self, dataset: str, skip_corrupt: bool):
    self._dataset = dataset
    self._skip_corrupt = skip_corrupt
    self._lock = threading.Lock()
    self._files_logged: set[str] = set()
    self._first: list[str] = []

  def note(self, where: list[str]) -> None:
    """Records damaged examples `where` ("FILE" or "FILE record N")."""
    with self._lock:
      if where and not self._first:
        self._first.append(where[0])
      for w in where:
        path = w.split(" record ")[0]
        if path not in self._files_logged:
          # Logged in every mode: evaluation reads with weight 0 too and
          # never stops, so the log is where a damaged eval file shows.
          self._files_logged.add(path)
          logging.warning(
              "--dataset=%s: damaged example %s given weight 0%s; further "
              "ones of this file are not logged.", self._dataset, w,
              " (counted in skipped_examples)" if self._skip_corrupt else "")

  def found(self) -> bool:
    with self._lock:
      return bool(self._first)

  def error_line(self) -> str:
    with self._lock:
      where = self._first[0] if self._first else "?"
    return (f"--dataset={self._dataset}: {where} is damaged (it does not "
            "decode); a checkpoint was saved. Replace or re-create the file, "
            "or pass --skip_corrupt to train on with that example at "
            "weight 0.")
