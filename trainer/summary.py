"""TensorBoard writers (chief only) and the progress display.

Event files under --model_dir:
  train/, eval/   scalars; train/ also the `config` text summary and, with
                  --histograms_every, `weights/*` and `gradients/*` histograms
  . (the root)    the hparams session (the config as hyperparameters) and,
                  at the end, the final eval metrics as `eval_<name>` scalars,
                  so that sibling model dirs compare in TensorBoard's HParams
                  tab (run `tensorboard --logdir` on their parent). It stays
                  at the root: the tab files a session's train/ and eval/
                  curves under the directory that holds the session.
"""

import datetime
import json
import logging as std_logging
import os
import sys
import time

from absl import logging
import tensorflow as tf


class Writers:
  """train/, eval/ (and root) event writers under --model_dir; no-ops
  off-chief."""

  def __init__(self, model_dir: str, is_chief: bool):
    self._model_dir = model_dir
    self._is_chief = is_chief
    self._root = None
    self._train = None
    self._eval = None

  # Made on first use: an evaluation-only run must not add (empty) event
  # files to train/ or the root of a finished run.
  @property
  def train(self):
    if self._train is None:
      self._train = self._writer("train")
    return self._train

  @property
  def eval(self):
    if self._eval is None:
      self._eval = self._writer("eval")
    return self._eval

  def _writer(self, subdir: str):
    if not self._is_chief:
      return tf.summary.create_noop_writer()
    return _file_writer(os.path.join(self._model_dir, subdir))

  @property
  def root(self):
    """The hparams session's writer (model_dir itself), made on first use."""
    if self._root is None:
      self._root = (_file_writer(self._model_dir) if self._is_chief
                    else tf.summary.create_noop_writer())
    return self._root

  def scalars(self, writer, step: int, values: dict) -> None:
    with writer.as_default(step=step):
      for name, value in values.items():
        if value is not None:
          tf.summary.scalar(name, value)
    writer.flush()

  def histograms(self, writer, step: int, values: dict) -> None:
    """name -> tensor; one histogram each."""
    if not self._is_chief:
      return
    with writer.as_default(step=step):
      for name, value in values.items():
        tf.summary.histogram(name, value)
    writer.flush()

  def config(self, step: int, record) -> None:
    """The run's configuration (`record`: its rundir.RunRecord): a `config`
    text summary in train/ and an hparams session start at the root (all
    Config fields as hparams)."""
    if not self._is_chief:
      return
    from tensorboard.plugins.hparams import api as hp
    text = "\n".join("    " + line for line in record.to_json().splitlines())
    with self.train.as_default(step=step):
      tf.summary.text("config", text)
    self.train.flush()
    values = dict(_config_items(record))
    # TensorBoard's HParams tab keeps the FIRST session start of a run dir:
    # a resumed run with changed flags would show the old values. The root
    # holds only this session (and the final metrics a finished training
    # run writes again), so start it anew.
    if self._root is None:
      for name in tf.io.gfile.listdir(self._model_dir):
        if name.startswith("events.out.tfevents."):
          tf.io.gfile.remove(os.path.join(self._model_dir, name))
    with self.root.as_default(step=step):
      # No trial_id: the group name is then a hash of the values, model_dir
      # included, so runs in different dirs never merge into one group.
      hp.hparams(values)
    self.root.flush()

  def final(self, step: int, metrics: dict) -> None:
    """The final eval metrics (`eval_loss`, ...) in the hparams session."""
    self.scalars(self.root, step, {k: v for k, v in metrics.items()
                                   if isinstance(v, (int, float))
                                   and not isinstance(v, bool)})

  def close(self):
    for writer in (self._train, self._eval, self._root):
      if writer is not None:
        writer.close()


def _file_writer(logdir: str):
  """An event writer for `logdir`; where the storage refuses writes (a
  finished run evaluated on read-only storage), a warning and a writer that
  drops what it is given: the metrics still reach the JSON line and the log.
  A training run never gets here on such storage: its lock is refused."""
  try:
    return tf.summary.create_file_writer(logdir)
  except tf.errors.PermissionDeniedError as e:
    reason = e.message.strip().splitlines()[0].rsplit("; ", 1)[-1]
    logging.warning("cannot write TensorBoard events in %s (%s); going on "
                    "without them.", logdir, reason[:200])
    return tf.summary.create_noop_writer()


def _config_items(record):
  for name, value in json.loads(record.to_json()).items():
    if isinstance(value, (bool, int, float, str)):
      yield name, value


def progress_line(kind: str, step: int, total: int, values: dict,
                  eta_s: float | None = None) -> str:
  """`train | step: 100/1000 | loss: 0.1234 | ... | eta: 0:00:12`."""
  parts = [kind, f"step: {step}/{total}"]
  for name, value in values.items():
    if value is None:
      continue
    if name in ("steps_per_sec", "examples_per_sec", "tokens_per_sec"):
      parts.append(f"{name.replace('_per_', '/')}: {value:.1f}")
    else:
      parts.append(f"{name}: {value:.4f}")
  if eta_s is not None:
    parts.append(f"eta: {datetime.timedelta(seconds=int(eta_s))}")
  return " | ".join(parts)


class Progress:
  """Training progress on the chief.

  --progress=log (or auto with stderr not a terminal): one fixed-format
  absl INFO line per summary interval (`progress_line`), stable for grep.
  --progress=line (or auto on a terminal): one line on stderr rewritten in
  place after every chunk (step/total, loss and accuracy of the latest
  summary interval, examples/sec, ETA); any log record first ends it.
  Nothing on other workers.
  """

  _MIN_REDRAW_S = 0.1

  def __init__(self, mode: str, total: int, enabled: bool, stream=None):
    self.total = total
    self.stream = stream or sys.stderr
    if mode == "auto":
      isatty = getattr(self.stream, "isatty", None)
      mode = "line" if isatty is not None and isatty() else "log"
    self.enabled = enabled
    self.in_place = enabled and mode == "line"
    self._shown = {}       # metrics of the latest summary interval
    self._pending = False  # an unfinished in-place line is on the stream
    self._drawn_at = 0.0
    self._filter = None
    if self.in_place:
      self._filter = _EndLineFilter(self)
      logging.get_absl_handler().addFilter(self._filter)

  def summary(self, step: int, values: dict, eta_s: float | None) -> None:
    """At a summary interval: `values` = loss, metrics, steps/sec, ..."""
    if not self.enabled:
      return
    if not self.in_place:
      logging.info("%s", progress_line("train", step, self.total, values,
                                        eta_s))
      return
    self._shown = {k: v for k, v in values.items() if k != "steps_per_sec"}
    self._draw(step, eta_s, force=True)

  def tick(self, step: int, steps_per_sec: float, batch_size: int) -> None:
    """After every chunk: redraws the in-place line with a fresh rate."""
    if not self.in_place:
      return
    if steps_per_sec > 0:
      self._shown["examples_per_sec"] = steps_per_sec * batch_size
    eta = (self.total - step) / steps_per_sec if steps_per_sec > 0 else None
    self._draw(step, eta)

  def _draw(self, step, eta_s, force=False):
    now = time.monotonic()
    if not force and now - self._drawn_at < self._MIN_REDRAW_S:
      return
    self._drawn_at = now
    width = 20
    filled = int(width * min(step, self.total) / max(self.total, 1))
    bar = "[" + "=" * filled + "." * (width - filled) + "]"
    line = progress_line("train", step, self.total, self._shown, eta_s)
    line = line.replace("train | ", f"train {bar} ", 1)
    # \r: back to column 0; ESC[K: erase what a longer line left behind.
    self.stream.write("\r" + line + "\x1b[K")
    self.stream.flush()
    self._pending = True

  def end_line(self) -> None:
    if self._pending:
      self._pending = False
      self._drawn_at = 0.0   # redraw at once below whatever was printed
      self.stream.write("\n")
      self.stream.flush()

  def close(self) -> None:
    self.end_line()
    if self._filter is not None:
      logging.get_absl_handler().removeFilter(self._filter)
      self._filter = None


class _EndLineFilter(std_logging.Filter):
  """Ends the in-place progress line before any log record is printed."""

  def __init__(self, progress: Progress):
    super().__init__()
    self._progress = progress

  def filter(self, record) -> bool:
    self._progress.end_line()
    return True
