"""The outer loop (Orbit's Controller): chunks of updates, and between
them summaries, checkpoints, evaluation, the non-finite policy, early
stopping and preemption. It is GIVEN the run's parts (trainer.build) and an
executor (trainer.executors) that knows how a chunk runs on the strategy;
it never builds anything and never touches a strategy itself.
"""

import contextlib
import json
import os
import time

from absl import logging
import tensorflow as tf

from trainer import best as best_lib
from trainer import build, guard, optim, rundir, summary, watch
from trainer.config import Config
from trainer.data import damage
from trainer.errors import UserError
from trainer.preemption import StopSignal as _StopSignal
from trainer.guard import NonFiniteError  # noqa: F401  (re-exported)



class Preempted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint at the current step was saved."""

  def __init__(self, step: int):
    super().__init__(f"preempted: checkpoint saved at step {step}; run the "
                     "same command to resume.")
    self.step = step


def _crossed(previous: int, current: int, every: int) -> bool:
  """Did the step pass a multiple of `every` between the two values?"""
  return every > 0 and current // every > previous // every


class Controller:
  """The outer loop of one run, over its parts and executor."""

  def __init__(self, parts, executor):
    self.parts = parts
    self.executor = executor
    self.config = parts.config
    self.role = parts.role
    self.checkpointer = parts.checkpointer
    self.writers = None
    self.progress = None
    self.best = None

  # The parts tests and instruments read (the controller only reads them).
  strategy = property(lambda self: self.parts.strategy)
  task = property(lambda self: self.parts.task)
  models = property(lambda self: self.parts.models)
  model = property(lambda self: self.parts.model)
  optimizer = property(lambda self: self.parts.optimizer)
  state = property(lambda self: self.parts.state)
  steps = property(lambda self: self.parts.steps)

  # ---- helpers ----------------------------------------------------------
  @contextlib.contextmanager
  def _translated_errors(self):
    """Errors out of the executor's work as the executor names them (a lost
    parameter server: ParameterServerLost, exit 4 with one line)."""
    try:
      yield
    except Exception as e:   # noqa: BLE001 - translated, re-raised
      translated = self.executor.translate(e)
      if translated is e:
        raise
      raise translated from None

  @property
  def global_step(self) -> int:
    return int(self.state.global_step.numpy())

  def _open_outputs(self):
    """Creates --model_dir outputs; only after restore has succeeded."""
    if self.writers is None:
      rundir.record(self.config, self.role.is_chief)
      self.writers = summary.Writers(self.config.model_dir, self.role.is_chief)

  def save(self) -> None:
    path = self.checkpointer.save(self.global_step)
    if path:
      logging.info("saved checkpoint %s", path)

  # ---- evaluation -----------------------------------------------------
  def _eval_metrics(self) -> dict:
    sums = self.executor.eval_sums()
    weight = max(sums.pop("weight"), 1.0)
    return {**{name: value / weight for name, value in sums.items()},
            "examples": int(weight)}

  def evaluate(self) -> dict:
    """Metrics of the eval split: with --ema_decay, of the moving average
    (and the raw weights' under raw/ in TensorBoard), else of the weights."""
    config = self.config
    ema = self.parts.ema
    raw = None
    if ema is not None:
      raw = self._eval_metrics()
      with ema.swapped_in():
        metrics = self._eval_metrics()
    else:
      metrics = self._eval_metrics()
    examples = metrics.pop("examples")
    step = self.global_step
    self._open_outputs()
    scalars = dict(metrics)
    if raw is not None:
      raw.pop("examples")
      scalars.update({f"raw/{k}": v for k, v in raw.items()})
    self.writers.scalars(self.writers.eval, step, scalars)
    if self.role.is_chief:
      logging.info("%s", summary.progress_line("eval", step,
                                               config.train_steps, scalars))
    result = {**metrics, "examples": examples}
    if raw is not None:
      result.update({f"raw_{k}": v for k, v in raw.items()})
    return result

  # ---- training -------------------------------------------------------
  def train(self, evaluate: bool = True) -> dict:
    config = self.config
    restored = self.checkpointer.restore(config)
    if restored:
      logging.info("restored %s at step %d", restored, self.global_step)
    self._start_watching(evaluate)
    self._open_outputs()
    result = {"global_step": self.global_step, "train_loss": None,
              "train_accuracy": None}
    if self.global_step >= config.train_steps:
      logging.info("already at step %d of --train_steps=%d: evaluating only.",
                   self.global_step, config.train_steps)
    else:
      self.writers.config(self.global_step, config)
    stop = _StopSignal().install()
    try:
      with self._translated_errors():
        result.update(self._train_chunks(stop, evaluate))
    finally:
      stop.uninstall()
      self._profiler.stop()
      self.progress.close()
    if evaluate:
      metrics = self._stopped_eval
      if metrics is None:
        metrics = self.evaluate()
        if self.best is not None:
          self.best.update(self.global_step, metrics,
                           self.checkpointer.checkpoint)
      result.update(_prefixed("eval", metrics))
      self.writers.final(self.global_step, _prefixed(
          "eval", {k: v for k, v in metrics.items() if k != "examples"}))
    result["global_step"] = self.global_step
    result["nonfinite_steps"] = int(self.state.nonfinite_steps.numpy())
    if self.best is not None:
      result.update(self.best.summary())
    if config.early_stopping_patience > 0:
      result["early_stopped"] = self._stopped_eval is not None
    return result

  def _start_watching(self, evaluate: bool) -> None:
    """Progress display, best/ and early stopping, and the instruments."""
    config = self.config
    self.best = None
    if evaluate and config.tracks_best:
      self.best = best_lib.BestKeeper(
          config.model_dir, config.early_stopping_metric,
          config.early_stopping_mode, config.early_stopping_min_delta,
          config.early_stopping_patience, config.eval_every,
          self.role.is_chief, self.role.worker_index)
      self.best.check_metric(["loss", *self.task.metrics()])
    self._stopped_eval = None   # the eval metrics at an early stop
    self.progress = summary.Progress(config.progress, config.train_steps,
                                     self.role.is_chief)
    # tf.timestamp() is refused under op determinism: no probe then.
    self._wait_probe = watch.InputWaitProbe(
        0 if config.deterministic else config.input_wait_steps,
        config.summary_every, config.train_steps)
    self._profiler = watch.Profiler(config.profile_range,
                                    os.path.join(config.model_dir, "train"),
                                    self.role.is_chief)
    self._histograms = watch.Histograms(self)
    self.executor.probe, self.executor.profiler = (self._wait_probe,
                                                   self._profiler)

  def _train_chunks(self, stop, evaluate: bool) -> dict:
    config = self.config
    state = self.state
    step = self.global_step
    if step >= config.train_steps:
      return {}
    if self.best is not None and self.best.should_stop(step):
      logging.info("early stopping: no improvement of eval %s in %d "
                   "evaluations since step %d; not training.",
                   self.best.metric, config.early_stopping_patience,
                   self.best.record.step)
      self._stopped_eval = self.evaluate()
      return {}
    iterator = self.executor.start()
    interval_time, interval_start, last = 0.0, step, {}
    bad_seen = int(state.nonfinite_steps.numpy())
    rollbacks = 0
    while step < config.train_steps:
      began = time.perf_counter()
      iterator = self.executor.run(iterator, step,
                                   self._next_boundary(step) - step)
      before, step = step, self.global_step
      elapsed = time.perf_counter() - began
      interval_time += elapsed
      self.progress.tick(step, (step - before) / max(elapsed, 1e-9),
                         config.global_batch_size)
      bad = int(state.nonfinite_steps.numpy())
      if bad > bad_seen:
        rollbacks += guard.on_nonfinite(config, state, self.checkpointer,
                                        bad, bad_seen, rollbacks)
        bad_seen = bad
        if config.nonfinite == "rollback":
          iterator = self.executor.after_rollback(iterator)
          step = self.global_step
          interval_start, interval_time = step, 0.0
          continue
      done = step >= config.train_steps
      summarized = _crossed(before, step, config.summary_every) or done
      if summarized:
        last = self._write_train_summary(step, interval_start, interval_time)
        interval_start, interval_time = step, 0.0
      if _crossed(before, step, config.histograms_every):
        self.writers.histograms(self.writers.train, step,
                                self._histograms.values(step))
      damaged = damage.found() and not config.skip_corrupt
      if self.executor.agree(stop.raised or damaged):
        self.save()
        if damaged:
          raise UserError(damage.error_line(config.dataset))
        raise Preempted(step)
      saved = _crossed(before, step, config.checkpoint_every) or done
      if saved:
        self.save()
      if evaluate and not done and _crossed(before, step, config.eval_every):
        metrics = self.evaluate()
        if self._early_stop(step, metrics):
          if not summarized:
            last = self._write_train_summary(step, interval_start,
                                             interval_time)
          if not saved:
            self.save()
          self._stopped_eval = metrics
          break
    return last

  def _next_boundary(self, step: int) -> int:
    """The next step at which something happens between chunks."""
    config = self.config
    target = config.train_steps
    for every in (config.summary_every, config.checkpoint_every,
                  config.eval_every, config.histograms_every):
      if every > 0:
        target = min(target, (step // every + 1) * every)
    return target

  def _early_stop(self, step: int, metrics: dict) -> bool:
    """Updates best/; True if early stopping triggers. Every worker decides
    alike: from reduced eval metrics and state read at start."""
    if self.best is None:
      return False
    self.best.update(step, metrics, self.checkpointer.checkpoint)
    if not self.best.should_stop(step):
      return False
    logging.info("early stopping at step %d: eval %s did not improve on "
                 "%.6g (step %d) in %d evaluations.", step, self.best.metric,
                 self.best.record.value, self.best.record.step,
                 self.config.early_stopping_patience)
    return True

  def _write_train_summary(self, step, interval_start, interval_time) -> dict:
    config = self.config
    sums = self.steps.train_sums.read_and_reset()
    weight = max(sums.pop("weight"), 1.0)
    updates = sums.pop("updates")
    skipped = sums.pop("skipped_examples")
    grad_norm = sums.pop("grad_norm") / max(updates, 1.0)
    metrics = {name: value / weight for name, value in sums.items()}
    done = step - interval_start
    rate = done / interval_time if interval_time > 0 else 0.0
    scalars = {
        **metrics,
        **self._learning_rates(step),
        "steps_per_sec": rate,
        "examples_per_sec": rate * config.global_batch_size,
        "grad_norm": grad_norm,
        "nonfinite_steps": float(self.state.nonfinite_steps.numpy()),
        "skipped_examples": skipped,
        "input_wait_share": self._wait_probe.read_and_reset(),
    }
    self.writers.scalars(self.writers.train, step, scalars)
    eta = (config.train_steps - step) / rate if rate > 0 else None
    shown = {k: scalars[k] for k in (*metrics, "steps_per_sec",
                                      "examples_per_sec")}
    self.progress.summary(step, shown, eta)
    return {**_prefixed("train", metrics), "steps_per_sec": rate,
            "examples_per_sec": rate * config.global_batch_size}

  def _learning_rates(self, step: int) -> dict:
    """learning_rate (the --lr_schedule), or each task optimizer's own."""
    if not self.parts.flag_optimizer:
      optimizers = self.parts.optimizers
      # float() of a Keras variable fails when its value is a
      # MirroredVariable (more than one replica): read it as a tensor.
      rates = {name: float(tf.convert_to_tensor(o.learning_rate))
               for name, o in optimizers.items()}
      if len(rates) == 1:
        return {"learning_rate": next(iter(rates.values()))}
      return {f"learning_rate/{name}": v for name, v in rates.items()}
    return {"learning_rate": float(optim.learning_rate_at(step, self.config))}

  # ---- evaluation-only modes ------------------------------------------
  def evaluate_checkpoint(self, path: str | None = None) -> dict:
    if path and os.path.isdir(path):   # e.g. --checkpoint=MODEL_DIR/best
      path = tf.train.latest_checkpoint(path) or path
    with self._translated_errors():
      restored = self.checkpointer.restore(self.config, path)
    if restored is None:
      raise UserError(f"--mode=eval: no checkpoint in --model_dir="
                      f"{self.config.model_dir}; train first or pass "
                      "--checkpoint=PATH.")
    logging.info("evaluating %s (step %d)", restored, self.global_step)
    with self._translated_errors():
      metrics = self.evaluate()
    return {"global_step": self.global_step, "checkpoint": restored,
            **_prefixed("eval", metrics)}

  def continuous_eval(self, poll_s: float = 1.0) -> dict:
    """Evaluates each new checkpoint in --model_dir until the one at
    --train_steps, or until none appears for --eval_timeout_s."""
    config, result, done = self.config, {}, set()
    waited_since = time.monotonic()
    while True:
      fresh = [p for p in reversed(self.checkpointer.paths()) if p not in done]
      for path in fresh:
        done.add(path)
        try:
          result = self.evaluate_checkpoint(path)
        except UserError as e:   # deleted by the trainer's keep policy
          logging.warning("skipping %s: %s", path, e)
          continue
        waited_since = time.monotonic()
        if self.global_step >= config.train_steps:
          return result
      if time.monotonic() - waited_since > config.eval_timeout_s:
        logging.warning("no new checkpoint for %.0f s: stopping.",
                        config.eval_timeout_s)
        return result
      time.sleep(poll_s)


def _prefixed(prefix: str, values: dict) -> dict:
  return {f"{prefix}_{k}": v for k, v in values.items()}


def create(config: Config, task=None) -> Controller:
  """The Controller of a run: its parts and the strategy's executor."""
  return Controller(*build.run_parts(config, task))


def train(config: Config, task=None) -> dict:
  """Trains `task` (default: the one --task/--model/--dataset name) under
  `config`, resuming from --model_dir; returns the JSON summary dict."""
  return create(config, task).train(evaluate=config.mode == "train_and_eval")


def evaluate(config: Config, task=None, checkpoint: str | None = None) -> dict:
  """Evaluates the latest (or given) checkpoint in --model_dir."""
  return create(config, task).evaluate_checkpoint(checkpoint)


def run(config: Config, task=None) -> dict:
  """Dispatches on --mode."""
  controller = create(config, task)
  if config.mode == "eval":
    return controller.evaluate_checkpoint(config.checkpoint or None)
  if config.mode == "continuous_eval":
    return controller.continuous_eval()
  return controller.train(evaluate=config.mode == "train_and_eval")


def summary_line(result: dict) -> str:
  """The last stdout line of a run: one JSON object."""
  keys = ("global_step", "train_loss", "eval_loss", "eval_accuracy")
  ordered = {k: result[k] for k in keys if k in result}
  ordered.update(result)
  # A metric the task does not have (or a step that did not run) is absent,
  # not null: scripts read the keys they expect.
  ordered = {k: v for k, v in ordered.items() if v is not None}
  return json.dumps(ordered, sort_keys=False)
