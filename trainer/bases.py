"""Runs a task loads at build time (trainer.load inside build_model, e.g. a
frozen teacher or a base to fine-tune), recorded in the run that loads them.

While the framework builds a run's models it says so here (`building`):
whether the run's own checkpoint will overwrite every weight right after
(`restoring()`), and where the runs its task loads are recorded
(MODEL_DIR/bases/KEY/config.json, written with the run's config.json).
trainer.load reads those records on a rebuild and reads no weights, so the
loaded run is needed only for the first start.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re

DIR = "bases"
CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class Building:
  """A run whose models are being built.
  run_dir: the directory whose bases/ holds the records of what its task
  loads (the run, or the record of a loaded run); restores: its checkpoint
  overwrites every weight after the build; cwd: what a relative path its
  task gives is relative to; prefix: where, under the run being built by
  the framework, the records of what this one loads go; found: prefix/KEY
  -> config fields of every run loaded during this build (one dict shared
  by the nested builds)."""
  run_dir: str
  restores: bool
  cwd: str
  prefix: str = ""
  found: dict = dataclasses.field(default_factory=dict)


_STACK: list[Building] = []


@contextlib.contextmanager
def building(run_dir: str, restores: bool, cwd: str):
  """Inside: the models of the run in `run_dir` are being built. Yields the
  dict of the runs its task loaded (bases/KEY -> their config fields), for
  RunRecord.bases."""
  frame = Building(run_dir, restores, cwd)
  _STACK.append(frame)
  try:
    yield frame.found
  finally:
    _STACK.pop()


@contextlib.contextmanager
def building_loaded(outer: Building, key: str, run_dir: str, restores: bool,
                    cwd: str):
  """Inside: a run that `outer`'s task loads (as `key`) is being built from
  `run_dir`; what its own task loads is recorded under its record."""
  frame = Building(run_dir, restores, cwd, f"{outer.prefix}{DIR}/{key}/",
                   outer.found)
  _STACK.append(frame)
  try:
    yield
  finally:
    _STACK.pop()


def current() -> Building | None:
  """The innermost run whose models are being built; None outside a build."""
  return _STACK[-1] if _STACK else None


def restoring() -> bool:
  """True while a run's models are built to get their weights from the
  run's own checkpoint right after (evaluation, export, trainer.load, a
  resumed training): a task's build_model may skip reading weights from
  elsewhere (a file, another run), which the checkpoint overwrites.
  trainer.load does so by itself."""
  frame = current()
  return frame is not None and frame.restores


def key(given: str) -> str:
  """The name under bases/ of a run a task loads by the path `given`, as
  the task gives it (the same string on every rebuild, wherever it runs):
  readable, and told apart by a hash of the whole string.

  >>> key("runs/teacher")
  'runs_teacher-95c3f238'
  """
  readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", given).strip("_.")[-40:]
  digest = hashlib.sha256(given.encode()).hexdigest()[:8]
  return f"{readable or 'run'}-{digest}"


def record_dir(frame: Building, given: str) -> str:
  """Where `frame`'s run holds the record of the run its task loads as
  `given`."""
  return os.path.join(frame.run_dir, DIR, key(given))


def write(model_dir: str, found: dict) -> None:
  """Writes each loaded run's fields to MODEL_DIR/PREFIX/KEY/config.json,
  atomically (a reader never sees half a file)."""
  for where, fields in found.items():
    folder = os.path.join(model_dir, where)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CONFIG_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
