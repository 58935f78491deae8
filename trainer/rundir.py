"""A run's --model_dir as the record of the run: config.json (written by
training only) and the run history. (The Config that evaluation, export and
trainer.load rebuild from them: trainer.saved_config.)

`config.json` is the effective configuration of the latest TRAINING run; an
evaluation or an export reads it and never rewrites it. Every run (training
or evaluation) appends one JSON line to `history.jsonl`: when, which mode,
the working directory, the command line it was given and the effective
command (every flag that differs from its default); on read-only storage an
evaluation goes on without it, with a warning.

An evaluation started before its trainer waits for config.json
(`wait_for_config`) and never runs with its own defaults; a training run
refuses a config.json it cannot read rather than overwrite the record of
the run it would resume.
"""

import dataclasses
import datetime
import json
import os
import sys
import time

from absl import logging

from trainer import bases as bases_lib
from trainer.errors import UserError

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"

TRAINING_MODES = ("train", "train_and_eval")


def saved_json(path: str) -> dict | None:
  """The JSON object in `path`; None if there is no such file; ValueError
  (the reason) if it cannot be read, is empty, garbled or not an object."""
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return None
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(getattr(e, "strerror", None) or str(e)) from None
  if not text.strip():
    raise ValueError("it is empty")
  try:
    saved = json.loads(text)
  except ValueError as e:
    raise ValueError(f"not JSON: {e}") from None
  if not isinstance(saved, dict):
    raise ValueError("it does not hold a JSON object")
  return saved


def wait_for_config(model_dir: str, timeout_s: float, poll_s: float = 0.5,
                    clock=time.monotonic, sleep=time.sleep) -> None:
  """Returns once MODEL_DIR/config.json exists (an evaluator started beside
  its trainer); a UserError after `timeout_s` without it. Logs one line when
  it starts waiting."""
  path = os.path.join(model_dir, CONFIG_FILE)
  if os.path.exists(path):
    return
  logging.info("waiting up to %.0f s (--eval_timeout_s) for %s, which the "
               "training run writes when it starts.", timeout_s, path)
  deadline = clock() + timeout_s
  while not os.path.exists(path):
    if clock() >= deadline:
      raise UserError(f"no {path} appeared within --eval_timeout_s="
                      f"{timeout_s:g}; start the training run with this "
                      "--model_dir, or raise --eval_timeout_s.")
    sleep(poll_s)


def check_resumable(model_dir: str) -> None:
  """A training run's check before it rewrites config.json: --model_dir is
  (or can become) a directory, and a config.json in it must be readable. An empty or garbled file is the damaged record of the run
  this one would resume; overwriting it would hide that."""
  if "://" not in model_dir:
    existing = os.path.abspath(model_dir)
    while not os.path.lexists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise UserError(f"--model_dir={model_dir}: {existing} is a file, not a "
                      "directory; give a directory (new or a run's).")
  path = os.path.join(model_dir, CONFIG_FILE)
  try:
    saved_json(path)
  except ValueError as e:
    raise UserError(f"{path} cannot be read ({e}): it records the run in "
                    "--model_dir; restore it, or remove it to let this "
                    "training run write its own.") from None


def training_cwd(model_dir: str) -> str | None:
  """The working directory of the latest training run in the history."""
  cwd = None
  for entry in read_history(model_dir):
    if entry.get("mode") in TRAINING_MODES and entry.get("cwd"):
      cwd = entry["cwd"]
  return cwd


def read_history(model_dir: str) -> list[dict]:
  """The entries of history.jsonl, oldest first (unreadable lines skipped)."""
  path = os.path.join(model_dir, HISTORY_FILE)
  try:
    with open(path) as f:
      lines = f.readlines()
  except FileNotFoundError:
    return []
  entries = []
  for line in lines:
    try:
      entry = json.loads(line)
    except ValueError:
      continue   # a line cut by a crash mid-write
    if isinstance(entry, dict):
      entries.append(entry)
  return entries


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """What a run says of itself (config.json, history, the checkpoint's
  identity check, TensorBoard's config text): the Config as JSON, its
  command line, where and how it runs. trainer.build makes it."""
  model_dir: str
  mode: str
  config_json: str
  command: str
  # The runs its task loaded at build time (bases/KEY -> config fields).
  bases: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> str:
    return self.config_json

  @property
  def training(self) -> bool:
    return self.mode in TRAINING_MODES


def append_history(record: RunRecord) -> None:
  """Appends this run's entry to MODEL_DIR/history.jsonl (chief only: the
  caller decides). Best effort: an evaluation of a run on read-only storage
  goes on without its entry, with a warning."""
  entry = {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "mode": record.mode,
      "cwd": os.getcwd(),
      "argv": list(sys.argv),
      "command": record.command,
  }
  path = os.path.join(record.model_dir, HISTORY_FILE)
  try:
    with open(path, "a") as f:
      f.write(json.dumps(entry) + "\n")
  except OSError as e:
    logging.warning("could not append to %s (%s); going on without this "
                    "run's history entry.", path, e.strerror or e)


def record(run: RunRecord, is_chief: bool) -> None:
  """What a run writes about itself when its outputs open: config.json for a
  training run (the effective configuration), and a history entry for every
  run. Evaluation never rewrites config.json."""
  if not is_chief:
    return
  if run.training:
    os.makedirs(run.model_dir, exist_ok=True)
    # Atomically: an evaluator waiting for the file never reads half of it.
    path = os.path.join(run.model_dir, CONFIG_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(run.to_json() + "\n")
    os.replace(tmp, path)
    bases_lib.write(run.model_dir, run.bases)
  append_history(run)
