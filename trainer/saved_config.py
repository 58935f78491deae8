"""The Config a run's --model_dir records: config.json's fields (trainer.
rundir reads the file) made into the Config that an evaluation, an export
or trainer.load runs with. No TensorFlow: trainer.main checks it before
TensorFlow loads.
"""

import dataclasses
import os

from absl import logging

from trainer import rundir
from trainer.config import Config
from trainer.errors import UserError

# Fields that say how THIS process runs (its devices, cluster, display, what
# to do), not what the run is: an evaluation or an export takes them from its
# own command line (or their defaults), never from config.json.
PROCESS_FIELDS = frozenset({
    "strategy", "cpu_replicas", "cluster_resolver", "collective",
    "peer_timeout_s", "hang_timeout_s", "tpu", "ps_shard_min_bytes",
    "model_dir", "mode",
    "checkpoint", "eval_timeout_s", "progress", "profile_steps",
    "histograms_every", "keep_best", "early_stopping_patience"})


def saved_fields(model_dir: str) -> dict | None:
  """config.json of `model_dir` as a dict of known Config fields; None if the
  directory has none. A relative --data_dir is made absolute against the
  working directory the training run had (see history.jsonl), so a run's
  data is found from any directory."""
  path = os.path.join(model_dir, rundir.CONFIG_FILE)
  try:
    saved = rundir.saved_json(path)
  except ValueError as e:
    raise UserError(f"{path} cannot be read ({e}); give the --model_dir of a "
                    "training run.") from None
  if saved is None:
    return None
  known = {f.name for f in dataclasses.fields(Config)}
  unknown = sorted(set(saved) - known)
  if unknown:
    logging.warning("%s: fields unknown to this version, ignored: %s", path,
                    ", ".join(unknown))
  fields = {k: v for k, v in saved.items() if k in known}
  data_dir = fields.get("data_dir")
  if data_dir and not os.path.isabs(data_dir):
    cwd = rundir.training_cwd(model_dir)
    if cwd:
      fields["data_dir"] = os.path.normpath(os.path.join(cwd, data_dir))
  return fields


def config_for(model_dir: str, given: Config, present: set[str]) -> Config:
  """The Config an evaluation/export of `model_dir` runs with: config.json's
  values, overridden by the flags named in `present` (those given on the
  command line) and by the PROCESS_FIELDS of `given`. Without config.json a
  UserError: the run's flags are unknown, and guessing them (this command
  line's defaults) would evaluate another model or skip every checkpoint."""
  saved = saved_fields(model_dir)
  if saved is None:
    raise UserError(f"--model_dir={model_dir} has no {rundir.CONFIG_FILE} "
                    "(written when a training run starts): give the "
                    "--model_dir of a training run, or start "
                    "--mode=continuous_eval, which waits for it.")
  fields = {f.name for f in dataclasses.fields(Config)}
  mine = (PROCESS_FIELDS | set(present)) & fields
  values = {**saved, **{name: getattr(given, name) for name in mine}}
  return Config(**values)


def load_config(model_dir: str, **overrides) -> Config:
  """The Config saved in model_dir/config.json (process fields at their
  defaults, model_dir = `model_dir`), with `overrides` applied."""
  saved = saved_fields(model_dir)
  if saved is None:
    raise UserError(f"--model_dir={model_dir} has no {rundir.CONFIG_FILE}: "
                    "give the --model_dir of a training run.")
  base = Config(**{k: v for k, v in saved.items() if k not in PROCESS_FIELDS})
  try:
    return base.replace(model_dir=model_dir, **overrides)
  except TypeError as e:
    raise UserError(f"load: {e}") from None
