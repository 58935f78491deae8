"""The best checkpoint so far (<model_dir>/best/) and early stopping.

best/ holds one full checkpoint (`ckpt-<step>.*`, the same objects as the
checkpoints in --model_dir, so --mode=eval --checkpoint=DIR/best/ckpt-N and
trainer.export work on it), a `checkpoint` index file, and `best.json`:
  {"step": 600, "metric": "loss", "mode": "min", "value": 0.0812,
   "checkpoint": "ckpt-600"}
best.json is the source of truth. A new best is written as: checkpoint files
under a fresh name first (never over files best.json may name), then
best.json replaced atomically (os.replace), then the index file, then older
checkpoint files deleted; a crash at any point leaves best.json naming
complete files (at worst a few stale files, removed on the next write).

Early stopping counts evaluations without improvement. The count is a pure
function of best.json's step, the current step and --eval_every (mid-run
evaluations happen exactly at multiples of it), so it survives restarts
without being stored. Every worker keeps this state and decides from the
eval metrics, which are already reduced across workers: all workers take the
same decision at the same step, with no extra collective. Only the chief
writes best/; the others take part in the save (variables may sync on read)
into a temporary directory they delete.
"""

import dataclasses
import json
import os

from absl import logging

from trainer import checkpoint as ckpt_lib
from trainer.errors import UserError

DIRNAME = "best"
INFO = "best.json"
_MAXIMIZED = ("acc", "auc", "precision", "recall", "f1", "iou")


def metric_name(name: str) -> str:
  """--early_stopping_metric: `loss`, `accuracy`, ...; `eval_` is optional."""
  return name[len("eval_"):] if name.startswith("eval_") else name


def resolve_mode(metric: str, mode: str) -> str:
  """min or max; `auto` maximizes accuracy-like names and minimizes others."""
  if mode != "auto":
    return mode
  return "max" if any(m in metric.lower() for m in _MAXIMIZED) else "min"


def improved(value: float, best: float | None, mode: str,
             min_delta: float = 0.0) -> bool:
  """Is `value` better than `best` by more than min_delta?"""
  if best is None:
    return True
  if mode == "max":
    return value > best + min_delta
  return value < best - min_delta


def evals_since(best_step: int, step: int, eval_every: int) -> int:
  """Evaluations at multiples of eval_every in (best_step, step]."""
  if eval_every <= 0 or step <= best_step:
    return 0
  return step // eval_every - best_step // eval_every


@dataclasses.dataclass
class Record:
  step: int
  metric: str
  mode: str
  value: float
  checkpoint: str


class BestKeeper:
  """Tracks the best eval metric, writes best/, decides early stopping."""

  def __init__(self, model_dir: str, metric: str, mode: str, min_delta: float,
               patience: int, eval_every: int, is_chief: bool,
               worker_index: int = 0):
    self.directory = os.path.join(model_dir, DIRNAME)
    self.metric = metric_name(metric)
    self.mode = resolve_mode(self.metric, mode)
    self.min_delta = min_delta
    self.patience = patience
    self.eval_every = eval_every
    self._is_chief = is_chief
    self._worker_index = worker_index
    self.record = read(self.directory)
    if self.record is not None and (self.record.metric != self.metric or
                                    self.record.mode != self.mode):
      raise UserError(
          f"{os.path.join(self.directory, INFO)} tracks {self.record.mode} "
          f"of '{self.record.metric}', not {self.mode} of '{self.metric}'; "
          f"pass --early_stopping_metric={self.record.metric} "
          f"--early_stopping_mode={self.record.mode}, or move {self.directory} "
          "away.")

  def check_metric(self, names) -> None:
    if self.metric not in names:
      raise UserError(
          f"--early_stopping_metric={self.metric!r} is not an eval metric of "
          f"this task; choose one of: {', '.join(sorted(names))}.")

  def update(self, step: int, metrics: dict, checkpoint) -> bool:
    """After an evaluation at `step`: saves best/ if the metric improved.
    `checkpoint` is the tf.train.Checkpoint to save. Every worker calls it."""
    value = float(metrics[self.metric])
    best = self.record.value if self.record else None
    if not improved(value, best, self.mode, self.min_delta):
      return False
    self.record = Record(step, self.metric, self.mode, value,
                         self._fresh_name(step))
    self._write(checkpoint)
    if self._is_chief:
      logging.info("new best eval %s %.6g at step %d: saved %s",
                   self.metric, value, step, self.directory)
    return True

  def should_stop(self, step: int) -> bool:
    """True once `patience` evaluations in a row did not improve."""
    if self.patience <= 0 or self.record is None:
      return False
    return evals_since(self.record.step, step, self.eval_every) >= \
        self.patience

  def summary(self) -> dict:
    if self.record is None:
      return {}
    return {"best_step": self.record.step,
            f"best_eval_{self.metric}": self.record.value}

  # ---- files ----------------------------------------------------------
  def _fresh_name(self, step: int) -> str:
    """ckpt-<step>, or ckpt-<step>_<n> when that exists: files that
    best.json may name are never written over (a replayed step)."""
    name, n = f"ckpt-{step}", 0
    while os.path.exists(os.path.join(self.directory, name + ".index")):
      n += 1
      name = f"ckpt-{step}_{n}"
    return name

  def _write(self, checkpoint) -> None:
    if not self._is_chief:
      ckpt_lib.write_scratch(checkpoint, self._worker_index, self.record.step)
      return
    os.makedirs(self.directory, exist_ok=True)
    record = self.record
    prefix = os.path.join(self.directory, record.checkpoint)
    checkpoint.write(prefix)
    info = os.path.join(self.directory, INFO)
    with open(info + ".tmp", "w") as f:
      json.dump(dataclasses.asdict(record), f, indent=2)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(info + ".tmp", info)
    # The index file lets tf.train.latest_checkpoint(best/) find it.
    _write_index(self.directory, record.checkpoint)
    for name in os.listdir(self.directory):
      if name.startswith("ckpt-") and not name.startswith(
          record.checkpoint + "."):
        os.remove(os.path.join(self.directory, name))


def _write_index(directory: str, name: str) -> None:
  """The `checkpoint` file that tf.train.latest_checkpoint reads."""
  path = os.path.join(directory, "checkpoint")
  with open(path + ".tmp", "w") as f:
    f.write(f'model_checkpoint_path: "{name}"\n'
            f'all_model_checkpoint_paths: "{name}"\n')
  os.replace(path + ".tmp", path)


def read(directory: str) -> Record | None:
  """best.json in `directory`, if it names existing checkpoint files."""
  info = os.path.join(directory, INFO)
  if not os.path.exists(info):
    return None
  try:
    with open(info) as f:
      record = Record(**json.load(f))
  except (ValueError, TypeError) as e:
    raise UserError(f"{info} is not a valid best-checkpoint record ({e}); "
                    f"delete {directory} to start tracking afresh.") from None
  if not os.path.exists(os.path.join(directory, record.checkpoint + ".index")):
    logging.warning("%s names %s, which is missing: tracking the best "
                    "checkpoint afresh.", info, record.checkpoint)
    return None
  return record
