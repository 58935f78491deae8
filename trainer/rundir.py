"""A run's --model_dir as the record of the run: config.json (written by
training only), the run history, and the Config that evaluation, export and
trainer.load rebuild from them.

`config.json` is the effective configuration of the latest TRAINING run; an
evaluation or an export reads it and never rewrites it. Every run (training
or evaluation) appends one JSON line to `history.jsonl`: when, which mode,
the working directory, the command line it was given and the effective
command (every flag that differs from its default).
"""

import dataclasses
import datetime
import json
import os
import sys

from absl import logging

from trainer.config import Config
from trainer.errors import UserError

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"

# Fields that say how THIS process runs (its devices, cluster, display, what
# to do), not what the run is: an evaluation or an export takes them from its
# own command line (or their defaults), never from config.json.
PROCESS_FIELDS = frozenset({
    "strategy", "cpu_replicas", "cluster_resolver", "collective",
    "peer_timeout_s", "tpu", "ps_shard_min_bytes", "model_dir", "mode",
    "checkpoint", "eval_timeout_s", "progress", "profile_steps",
    "histograms_every", "keep_best", "early_stopping_patience"})

TRAINING_MODES = ("train", "train_and_eval")


def saved_fields(model_dir: str) -> dict | None:
  """config.json of `model_dir` as a dict of known Config fields; None if the
  directory has none. A relative --data_dir is made absolute against the
  working directory the training run had (see history.jsonl), so a run's
  data is found from any directory."""
  path = os.path.join(model_dir, CONFIG_FILE)
  try:
    with open(path) as f:
      saved = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"{path} cannot be read ({e}); give the --model_dir of a "
                    "training run.") from None
  if not isinstance(saved, dict):
    raise UserError(f"{path} does not hold a JSON object; give the "
                    "--model_dir of a training run.")
  known = {f.name for f in dataclasses.fields(Config)}
  unknown = sorted(set(saved) - known)
  if unknown:
    logging.warning("%s: fields unknown to this version, ignored: %s", path,
                    ", ".join(unknown))
  fields = {k: v for k, v in saved.items() if k in known}
  data_dir = fields.get("data_dir")
  if data_dir and not os.path.isabs(data_dir):
    cwd = training_cwd(model_dir)
    if cwd:
      fields["data_dir"] = os.path.normpath(os.path.join(cwd, data_dir))
  return fields


def config_for(model_dir: str, given: Config, present: set[str]) -> Config:
  """The Config an evaluation/export of `model_dir` runs with: config.json's
  values, overridden by the flags named in `present` (those given on the
  command line) and by the PROCESS_FIELDS of `given`. Without config.json
  (e.g. a continuous_eval started before its trainer wrote one), `given`."""
  saved = saved_fields(model_dir)
  if saved is None:
    return given
  fields = {f.name for f in dataclasses.fields(Config)}
  mine = (PROCESS_FIELDS | set(present)) & fields
  values = {**saved, **{name: getattr(given, name) for name in mine}}
  return Config(**values)


def load_config(model_dir: str, **overrides) -> Config:
  """The Config saved in model_dir/config.json (process fields at their
  defaults, model_dir = `model_dir`), with `overrides` applied."""
  saved = saved_fields(model_dir)
  if saved is None:
    raise UserError(f"--model_dir={model_dir} has no {CONFIG_FILE}: give the "
                    "--model_dir of a training run.")
  base = Config(**{k: v for k, v in saved.items() if k not in PROCESS_FIELDS})
  try:
    return base.replace(model_dir=model_dir, **overrides)
  except TypeError as e:
    raise UserError(f"load: {e}") from None


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

  def to_json(self) -> str:
    return self.config_json

  @property
  def training(self) -> bool:
    return self.mode in TRAINING_MODES


def append_history(config: RunRecord) -> None:
  """Appends this run's entry to MODEL_DIR/history.jsonl (chief only: the
  caller decides)."""
  entry = {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "mode": config.mode,
      "cwd": os.getcwd(),
      "argv": list(sys.argv),
      "command": config.command,
  }
  os.makedirs(config.model_dir, exist_ok=True)
  with open(os.path.join(config.model_dir, HISTORY_FILE), "a") as f:
    f.write(json.dumps(entry) + "\n")


def record(config: RunRecord, is_chief: bool) -> None:
  """What a run writes about itself when its outputs open: config.json for a
  training run (the effective configuration), and a history entry for every
  run. Evaluation never rewrites config.json."""
  if not is_chief:
    return
  os.makedirs(config.model_dir, exist_ok=True)
  if config.training:
    with open(os.path.join(config.model_dir, CONFIG_FILE), "w") as f:
      f.write(config.to_json() + "\n")
  append_history(config)
