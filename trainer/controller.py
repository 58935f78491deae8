"""The outer loop (Orbit's Controller): chunks of updates, and after each
an ordered list of actions (trainer.actions: the non-finite policy,
summaries, histograms, the stop vote, checkpoints, evaluation with best/
and early stopping). It is GIVEN the run's parts, an executor that knows
how a chunk runs on the strategy, and narrow loop settings (all made by
trainer.build); it builds nothing and never touches a strategy itself.
"""

import contextlib
import json
import os
import time

from absl import logging
import tensorflow as tf

from trainer import actions as actions_lib
from trainer import best as best_lib
from trainer import build, compat, goodput, hang, rundir, summary, watch
from trainer.actions import LoopSettings, Preempted, Tick  # noqa: F401
from trainer.errors import UserError
from trainer.preemption import StopSignal as _StopSignal
from trainer.guard import NonFiniteError  # noqa: F401  (re-exported)

# A train metric a sequence step may return: the real (weighted) tokens of
# each row. With it the train scalars get tokens_per_sec, examples_per_sec
# times its interval mean.
TOKENS_PER_ROW = "tokens_per_row"

class Controller:
  """The outer loop of one run, over its parts and executor."""

  def __init__(self, parts, executor, settings: LoopSettings,
               record: rundir.RunRecord, histograms=None, actions=None,
               started: tuple[float, str] | None = None):
    self.parts = parts
    self.executor = executor
    self.settings = settings
    self.record = record
    self.role = parts.role
    self.checkpointer = parts.checkpointer
    self.writers = None
    self.progress = None
    self.best = None
    self.stopped_eval = None   # the eval metrics at an early stop
    self.histograms = histograms
    self.summaries = None   # the TrainSummaries action of the current run
    # Extra actions, run after the built-in ones (a user's, the bench's).
    self.extra_actions = list(actions or [])
    self.hang = None   # the hang watch while train() runs (trainer.hang)
    # When the run began for the goodput account, and what that time is.
    self.started = started or (time.time(), "creation of the Controller")
    self.account = None      # the GoodputAccount of the current run
    self.input_wait_share = None   # the probe's, at the latest summary
    self._timed = {"checkpoint": 0.0, "evaluation": 0.0}

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
      rundir.record(self.record, self.role.is_chief)
      self.writers = summary.Writers(self.settings.model_dir,
                                     self.role.is_chief)

  def timed_seconds(self) -> dict:
    """Seconds this Controller spent blocked in checkpoint saves and in
    evaluation (with best/ keeping), cumulative (the goodput account)."""
    return dict(self._timed)

  @contextlib.contextmanager
  def _timing(self, what: str):
    began = time.perf_counter()
    try:
      yield
    finally:
      self._timed[what] += time.perf_counter() - began

  def save(self) -> None:
    """A checkpoint at the current step (the checkpointer logs it once
    committed; with --async_checkpoint that is after this returns)."""
    if self.hang is not None:
      self.hang.note_pause()
    with self._timing("checkpoint"):
      self.checkpointer.save(self.global_step)

  # ---- evaluation -----------------------------------------------------
  def _eval_metrics(self) -> dict:
    sums = self.executor.eval_sums()
    weight = max(sums.pop("weight"), 1.0)
    return {**{name: value / weight for name, value in sums.items()},
            "examples": int(weight)}

  def evaluate(self) -> dict:
    """Metrics of the eval split: with --ema_decay, of the moving average
    (and the raw weights' under raw/ in TensorBoard), else of the weights."""
    if self.hang is not None:
      self.hang.note_pause()
    with self._timing("evaluation"):
      return self._evaluate()

  def _evaluate(self) -> dict:
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
      logging.info("%s", summary.progress_line(
          "eval", step, self.settings.train_steps, scalars))
    result = {**metrics, "examples": examples}
    if raw is not None:
      result.update({f"raw_{k}": v for k, v in raw.items()})
    return result

  # ---- training -------------------------------------------------------
  def train(self, evaluate: bool = True) -> dict:
    settings = self.settings
    restored = self.checkpointer.restore(self.record)
    if restored:
      logging.info("restored %s at step %d", restored, self.global_step)
    self._start_watching(evaluate)
    self._open_outputs()
    result = {"global_step": self.global_step, "train_loss": None,
              "train_accuracy": None}
    if self.global_step >= settings.train_steps:
      logging.info("already at step %d of --train_steps=%d: evaluating only.",
                   self.global_step, settings.train_steps)
    else:
      self.writers.config(self.global_step, self.record)
    stop = _StopSignal().install()
    self.account = None
    try:
      self.hang = self._hang_watch()
      with self._translated_errors():
        result.update(self._train_chunks(stop, evaluate))
    except Preempted:
      # Exit 75 only once the checkpoint of the signal's step is on disk.
      self._ends(goodput.PREEMPTED)
      raise
    except BaseException:
      self._ends(goodput.FAILED)
      raise
    finally:
      if self.hang is not None:
        self.hang.stop()
        self.hang = None
        self.steps.on_trace = None
      stop.uninstall()
      self._profiler.stop()
      self.progress.close()
    try:
      if evaluate:   # overlaps the final checkpoint's background write
        self._final_evaluation(result)
    finally:
      self._wait_for_save()
    result["global_step"] = self.global_step
    result["nonfinite_steps"] = int(self.state.nonfinite_steps.numpy())
    if self.best is not None:
      result.update(self.best.summary())
    if settings.early_stopping_patience > 0:
      result["early_stopped"] = self.stopped_eval is not None
    result.update(self._account_ends(goodput.FINISHED))
    return result

  def _final_evaluation(self, result: dict) -> None:
    metrics = self.stopped_eval
    if metrics is None:
      metrics = self.evaluate()
      if self.best is not None:
        with self._timing("evaluation"):
          self.best.update(self.global_step, metrics,
                           self.checkpointer.checkpoint)
    result.update(_prefixed("eval", metrics))
    self.writers.final(self.global_step, _prefixed(
        "eval", {k: v for k, v in metrics.items() if k != "examples"}))

  def _wait_for_save(self) -> None:
    """Until the background save in flight (if any) has committed; its
    failure (disk full) is raised, replacing whatever else was on the way
    out. Blocked checkpoint time in the goodput account."""
    if self.hang is not None:
      self.hang.note_pause()
    with self._timing("checkpoint"), self._translated_errors():
      self.checkpointer.wait()

  def _ends(self, ended: str) -> None:
    """Training ended by an exception: the save in flight commits first,
    then the goodput account closes (FAILED if the save failed)."""
    try:
      self._wait_for_save()
    except BaseException:
      self._account_ends(goodput.FAILED)
      raise
    self._account_ends(ended)

  def _account_ends(self, ended: str) -> dict:
    """The goodput account's last record of this process; the JSON line's
    `goodput` (nothing if no update ran in this process)."""
    if self.account is None:
      return {}
    try:
      return self.account.finish(self.global_step, ended)
    except Exception as e:   # noqa: BLE001 - never mask the run's own end
      if ended == goodput.FINISHED:
        raise
      logging.warning("goodput: the last record failed (%s).", e)
      return {}

  def _start_watching(self, evaluate: bool) -> None:
    """Progress display, best/ and early stopping, and the instruments."""
    settings = self.settings
    self.best = None
    if evaluate and settings.tracks_best:
      self.best = best_lib.BestKeeper(
          settings.model_dir, settings.early_stopping_metric,
          settings.early_stopping_mode, settings.early_stopping_min_delta,
          settings.early_stopping_patience, settings.eval_every,
          self.role.is_chief, self.role.worker_index)
      self.best.check_metric(["loss", *self.task.metrics()])
    self.stopped_eval = None
    self.progress = summary.Progress(settings.progress, settings.train_steps,
                                     self.role.is_chief)
    # tf.timestamp() is refused under op determinism: no probe then.
    self._wait_probe = watch.InputWaitProbe(
        0 if settings.deterministic else settings.input_wait_steps,
        settings.summary_every, settings.train_steps)
    self._profiler = watch.Profiler(settings.profile_range,
                                    os.path.join(settings.model_dir, "train"),
                                    self.role.is_chief)
    self.executor.probe, self.executor.profiler = (self._wait_probe,
                                                   self._profiler)

  def _hang_watch(self):
    """The hang watch over the chunks (None with --hang_timeout_s=0): its
    progress counter is this process's copy of the stream position, which
    every update advances (applied or skipped), read without a collective."""
    settings = self.settings
    if settings.hang_timeout_s <= 0:
      return None
    position = self.strategy.experimental_local_results(
        self.state.position)[0]
    role = self.role
    watch = hang.HangWatch(
        settings.hang_timeout_s, lambda: compat.read_int(position),
        {"strategy": type(self.strategy).__name__,
         "worker": f"{role.worker_index} of {role.num_workers}",
         "executor": type(self.executor).__name__})
    # Tracing a training function is not a step (hang.START_FACTOR).
    self.steps.on_trace = watch.note_trace
    return watch.start()

  def actions(self, evaluate: bool, stop_signal) -> list:
    """The actions after each chunk, in order."""
    summaries = actions_lib.TrainSummaries(self)
    self.summaries = summaries
    checkpoints = actions_lib.Checkpoints(self)
    account = actions_lib.GoodputAccount(self, summaries, *self.started)
    self.account = account
    chosen = [account.count, actions_lib.NonFinitePolicy(self), summaries,
              actions_lib.Perf(self, summaries)]
    if self.histograms is not None:
      chosen.append(actions_lib.WeightHistograms(self, self.histograms))
    chosen += [actions_lib.StopVote(self, stop_signal), checkpoints]
    if evaluate:
      chosen.append(actions_lib.Evaluation(self, summaries, checkpoints))
    return chosen + [account] + self.extra_actions

  def _train_chunks(self, stop, evaluate: bool) -> dict:
    settings = self.settings
    step = self.global_step
    if step >= settings.train_steps:
      return {}
    if self.best is not None and self.best.should_stop(step):
      logging.info("early stopping: no improvement of eval %s in %d "
                   "evaluations since step %d; not training.",
                   self.best.metric, settings.early_stopping_patience,
                   self.best.record.step)
      self.stopped_eval = self.evaluate()
      return {}
    after_chunk = self.actions(evaluate, stop)
    summaries = self.summaries
    iterator = self.executor.start()
    while step < settings.train_steps:
      began = time.perf_counter()
      with self._watched(step) as chunk:
        iterator = self.executor.run(iterator, step,
                                     self._next_boundary(step) - step)
        chunk.updates = self.global_step - step
      before, step = step, self.global_step
      ended = time.perf_counter()
      tick = Tick(before, step, step >= settings.train_steps, ended - began,
                  ended)
      self.progress.tick(step, (step - before) / max(tick.seconds, 1e-9),
                         settings.global_batch_size)
      for action in after_chunk:
        action(tick)
        if tick.rolled_back:
          break
      if tick.rolled_back:
        iterator = self.executor.after_rollback(iterator)
        step = self.global_step
        summaries.reset(step)
        continue
      if tick.stop:
        break
    return summaries.last

  def _watched(self, step: int):
    """The hang watch over one chunk (a no-op without a watch)."""
    if self.hang is None:
      return contextlib.nullcontext(hang.ChunkRecord())
    return self.hang.chunk(step)

  def _next_boundary(self, step: int) -> int:
    """The next step at which something happens between chunks."""
    settings = self.settings
    target = settings.train_steps
    for every in (settings.summary_every, settings.checkpoint_every,
                  settings.eval_every, settings.histograms_every):
      if every > 0:
        target = min(target, (step // every + 1) * every)
    return target

  def early_stop(self, step: int, metrics: dict) -> bool:
    """Updates best/; True if early stopping triggers. Every worker decides
    alike: from reduced eval metrics and state read at start."""
    if self.best is None:
      return False
    with self._timing("evaluation"):
      self.best.update(step, metrics, self.checkpointer.checkpoint)
    if not self.best.should_stop(step):
      return False
    logging.info("early stopping at step %d: eval %s did not improve on "
                 "%.6g (step %d) in %d evaluations.", step, self.best.metric,
                 self.best.record.value, self.best.record.step,
                 self.settings.early_stopping_patience)
    return True

  def write_train_summary(self, step, interval_start, interval_time) -> dict:
    """Writes the interval's train scalars; returns the JSON-line values."""
    settings = self.settings
    sums = self.steps.train_sums.read_and_reset()
    weight = max(sums.pop("weight"), 1.0)
    updates = sums.pop("updates")
    skipped = sums.pop("skipped_examples")
    self.input_wait_share = self._wait_probe.read_and_reset()
    grad_norm = sums.pop("grad_norm") / max(updates, 1.0)
    metrics = {name: value / weight for name, value in sums.items()}
    done = step - interval_start
    rate = done / interval_time if interval_time > 0 else 0.0
    rates = {"steps_per_sec": rate,
             "examples_per_sec": rate * settings.global_batch_size}
    if TOKENS_PER_ROW in metrics:
      # A sequence step's real tokens per row: its own rate of tokens.
      rates["tokens_per_sec"] = (rates["examples_per_sec"] *
                                 metrics[TOKENS_PER_ROW])
    scalars = {
        **metrics,
        **actions_lib.learning_rates(self.parts, settings, step),
        **rates,
        "grad_norm": grad_norm,
        "nonfinite_steps": float(self.state.nonfinite_steps.numpy()),
        "skipped_examples": skipped,
        "input_wait_share": self.input_wait_share,
    }
    self.writers.scalars(self.writers.train, step, scalars)
    eta = (settings.train_steps - step) / rate if rate > 0 else None
    self.progress.summary(step, {**metrics, **rates}, eta)
    return {**_prefixed("train", metrics), **rates}

  # ---- what --mode asks for --------------------------------------------
  def run(self) -> dict:
    """Trains (evaluating with --mode=train_and_eval), evaluates one
    checkpoint (--mode=eval) or each new one (--mode=continuous_eval)."""
    settings = self.settings
    if settings.mode == "eval":
      return self.evaluate_checkpoint(settings.checkpoint or None)
    if settings.mode == "continuous_eval":
      return self.continuous_eval()
    return self.train(evaluate=settings.mode == "train_and_eval")

  # ---- evaluation-only modes ------------------------------------------
  def evaluate_checkpoint(self, path: str | None = None) -> dict:
    if path and os.path.isdir(path):   # e.g. --checkpoint=MODEL_DIR/best
      path = tf.train.latest_checkpoint(path) or path
    with self._translated_errors():
      restored = self.checkpointer.restore(self.record, path)
    if restored is None:
      raise UserError(f"--mode=eval: no checkpoint in --model_dir="
                      f"{self.settings.model_dir}; train first or pass "
                      "--checkpoint=PATH.")
    logging.info("evaluating %s (step %d)", restored, self.global_step)
    with self._translated_errors():
      metrics = self.evaluate()
    return {"global_step": self.global_step, "checkpoint": restored,
            **_prefixed("eval", metrics)}

  def continuous_eval(self, poll_s: float = 1.0) -> dict:
    """Evaluates each new checkpoint in --model_dir, oldest first, until the
    one at the run's --train_steps, or until none appears for
    --eval_timeout_s. Having evaluated nothing is a UserError: an empty
    result must not look like success to a script or a launcher."""
    settings, result, done, skipped = self.settings, {}, set(), 0
    waited_since = time.monotonic()
    while True:
      fresh = [p for p in reversed(self.checkpointer.paths()) if p not in done]
      for path in fresh:
        done.add(path)
        try:
          result = self.evaluate_checkpoint(path)
        except UserError as e:   # deleted by the trainer's keep policy
          logging.warning("skipping %s: %s", path, e)
          skipped += 1
          continue
        waited_since = time.monotonic()
        if self.global_step >= settings.train_steps:
          return result
      if time.monotonic() - waited_since > settings.eval_timeout_s:
        if not result:
          raise UserError(
              f"--mode=continuous_eval evaluated no checkpoint: "
              + (f"{skipped} skipped (see the warnings above)"
                 if skipped else "none appeared")
              + f" in --model_dir={settings.model_dir} within "
              f"--eval_timeout_s={settings.eval_timeout_s:g}; check that its "
              "training run is running, or raise --eval_timeout_s.")
        logging.warning("no new checkpoint for %.0f s: stopping before "
                        "--train_steps=%d.", settings.eval_timeout_s,
                        settings.train_steps)
        return result
      time.sleep(poll_s)


def _prefixed(prefix: str, values: dict) -> dict:
  return {f"{prefix}_{k}": v for k, v in values.items()}


# The entry points: each hands the run's Config, untouched, to
# trainer.build.assemble (which walks it) and drives the Controller it gets;
# none reads a field of it.
def create(config, task=None, actions=None,
           started: tuple[float, str] | None = None) -> Controller:
  """The Controller of a run (`config`: a trainer.config.Config), as
  trainer.build assembles it; `actions` run after the built-in ones after
  every chunk. `started`: (time.time() value, what it is) where the goodput
  account's start-up begins; default: now, before the build."""
  started = started or (time.time(), "trainer.controller.create")
  return Controller(**build.assemble(config, task), actions=actions,
                    started=started)


def train(config, task=None) -> dict:
  """Trains `task` (default: the one --task/--model/--dataset name) under
  `config`, resuming from --model_dir; returns the JSON summary dict."""
  controller = create(config, task)
  return controller.train(
      evaluate=controller.settings.mode == "train_and_eval")


def evaluate(config, task=None, checkpoint: str | None = None) -> dict:
  """Evaluates the latest (or given) checkpoint in --model_dir."""
  return create(config, task).evaluate_checkpoint(checkpoint)


def run(config, task=None, started: tuple[float, str] | None = None) -> dict:
  """Does what --mode asks (Controller.run); `started` as in create."""
  return create(config, task, started=started).run()


def summary_line(result: dict) -> str:
  """The last stdout line of a run: one JSON object."""
  keys = ("global_step", "train_loss", "eval_loss", "eval_accuracy")
  ordered = {k: result[k] for k in keys if k in result}
  ordered.update(result)
  # A metric the task does not have (or a step that did not run) is absent,
  # not null: scripts read the keys they expect.
  ordered = {k: v for k, v in ordered.items() if v is not None}
  return json.dumps(ordered, sort_keys=False)
