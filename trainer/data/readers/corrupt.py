"""The --skip_corrupt policy: raise on damaged input, or log it and count it."""

import re

from absl import logging

from trainer.errors import UserError


def report(dataset: str, where: str, problem: str, count: int,
           skip_corrupt: bool) -> int:
  """Handles `count` unusable records found in file `where`.

  Without --skip_corrupt raises UserError (training on silently shrunken data
  is worse than stopping); with it logs ONE line naming the file and returns
  `count` for `Source.skipped`.
  """
  if not skip_corrupt:
    raise UserError(f"--dataset={dataset}: {where}: {problem}; replace or "
                    "re-create the file, or pass --skip_corrupt to drop the "
                    "unreadable records and train on the rest.")
  logging.warning("--dataset=%s: skipping %d corrupt record(s) of %s: %s",
                  dataset, count, where, problem)
  return count


def tf_reason(error: Exception) -> str:
  """The human part of a TF error message, on one line.

  TF prefixes op errors with "{{function_node ...}}" and suffixes
  "[Op:IteratorGetNext]"; neither helps a user find the damaged file.
  """
  text = getattr(error, "message", None) or str(error)
  text = re.sub(r"\{\{[^}]*\}\}", "", text)
  text = re.sub(r"\[Op:[^\]]*\].*", "", text, flags=re.S)
  return " ".join(text.split()) or type(error).__name__
