"""Where trainer.export may write, and how it replaces only its own work.

An export is written into a fresh staging directory beside --export_dir and
renamed into place. The target must be new or an empty directory; a
previous export of this tool is replaced only with --overwrite, and only
when every entry in it is one the tool wrote (listed in MARKER at its top).
A training run's directory or a file is never a target, whatever the flags:
nothing trainer.export did not create is ever removed.
"""

import json
import os
import shutil
import tempfile

from trainer.errors import UserError

MARKER = "trainer-export.json"
_WRITER = "trainer.export"
# Entries that make a directory a training run's --model_dir.
_RUN_FILES = ("checkpoint", "config.json", "history.jsonl")


def _entries(directory: str) -> list[str]:
  """Relative paths of every file, directory and link under `directory`
  (links are listed, never followed), sorted."""
  out = []
  for root, dirs, files in os.walk(directory):
    rel = os.path.relpath(root, directory)
    for name in dirs + files:
      out.append(name if rel == "." else os.path.join(rel, name))
  return sorted(out)


def _run_files(directory: str) -> list[str]:
  """The entries at the top of `directory` that mark a training run."""
  names = os.listdir(directory)
  return sorted(n for n in names
                if n in _RUN_FILES or (n.startswith("ckpt-")
                                       and n.endswith(".index")))


def _listed(directory: str) -> list[str] | None:
  """The entries MARKER says this tool wrote, or None without a marker of
  this tool."""
  try:
    with open(os.path.join(directory, MARKER)) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(marker, dict) or marker.get("written_by") != _WRITER:
    return None
  entries = marker.get("entries")
  return entries if isinstance(entries, list) else None


def _shown(names: list[str], limit: int = 3) -> str:
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check(target: str, overwrite: bool) -> None:
  """Raises UserError unless `target` may receive an export: it does not
  exist, is an empty directory, or (with `overwrite`) holds a previous
  export of this tool and nothing else."""
  flag = f"--export_dir={target}"
  if os.path.islink(target):
    raise UserError(f"{flag} is a symbolic link: give a new or empty "
                    "directory.")
  if not os.path.exists(target):
    return
  if not os.path.isdir(target):
    raise UserError(f"{flag} is a file, not a directory: give a new or "
                    "empty directory (nothing is written over a file).")
  run = _run_files(target)
  if run:
    raise UserError(f"{flag} is a training run's directory (it holds "
                    f"{_shown(run)}): give a new directory, e.g. "
                    f"--export_dir={os.path.join(target, 'export')}.")
  entries = _entries(target)
  if not entries:
    return
  listed = _listed(target)
  if listed is None:
    raise UserError(f"{flag} is not empty and holds no export of "
                    f"trainer.export (it holds {_shown(entries)}): give a new "
                    "or empty directory.")
  if not overwrite:
    raise UserError(f"{flag} holds a previous export: pass --overwrite to "
                    "replace it, or give a new directory.")
  foreign = sorted(set(entries) - set(listed) - {MARKER})
  if foreign:
    raise UserError(f"{flag} holds a previous export and also "
                    f"{_shown(foreign)}, which trainer.export did not write: "
                    "move them away or give a new directory.")


def staging_for(target: str) -> str:
  """A new, empty directory beside `target` to write the export into."""
  parent = os.path.dirname(os.path.abspath(target))
  try:
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-",
                            dir=parent)
  except OSError as e:
    raise UserError(f"--export_dir={target}: cannot create a directory in "
                    f"{parent} ({e.strerror or e}); give a writable "
                    "location.") from None


def seal(staging: str) -> None:
  """Writes MARKER: the list of every entry of the finished export, the
  only ones a later --overwrite may remove."""
  marker = {"written_by": _WRITER, "entries": _entries(staging)}
  with open(os.path.join(staging, MARKER), "w") as f:
    json.dump(marker, f, indent=1)


def replace(staging: str, target: str, overwrite: bool) -> None:
  """Moves the sealed `staging` to `target`. Checked again here: the
  target may have changed while the export was written. A previous export
  is moved aside into a new private directory, checked once more there,
  and only then removed."""
  check(target, overwrite)
  if not os.path.isdir(target) or not os.listdir(target):
    try:
      os.rename(staging, target)   # over an empty directory: atomic
    except OSError as e:
      raise UserError(f"--export_dir={target} changed while exporting "
                      f"({e.strerror or e}); nothing was replaced.") from None
    return
  aside = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-",
                           dir=os.path.dirname(os.path.abspath(target)))
  previous = os.path.join(aside, "previous")
  os.rename(target, previous)
  try:
    check(previous, overwrite)
  except UserError:
    os.rename(previous, target)
    os.rmdir(aside)
    raise UserError(f"--export_dir={target} changed while exporting; "
                    "nothing was replaced.") from None
  os.rename(staging, target)
  shutil.rmtree(aside, ignore_errors=True)
