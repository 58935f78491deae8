"""The outer loop (Orbit's Controller role): chunks of --steps_per_loop
updates inside one tf.function call, then summaries, checkpoints,
evaluation, the non-finite guard and preemption between chunks.
"""

import json
import os
import signal
import threading
import time

from absl import logging
import keras
import tensorflow as tf

from trainer import best as best_lib
from trainer import checkpoint as ckpt_lib
from trainer import optim, strategy as strategy_lib, summary, tasks, watch
from trainer.config import Config, check_divisible
from trainer.data import damage, pipeline
from trainer.errors import UserError
from trainer.state import TrainState
from trainer.step import Steps

PREEMPTED_EXIT_CODE = 75   # EX_TEMPFAIL: saved; run the same command again


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint at the current step was saved."""

  def __init__(self, step: int):
    super().__init__(f"preempted: checkpoint saved at step {step}; run the "
                     "same command to resume.")
    self.step = step


class NonFiniteError(Exception):
  """--nonfinite=fail, or --max_rollbacks exhausted."""


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks between chunks."""

  def __init__(self):
    self.raised = False
    self._previous = {}

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.raised and signum == signal.SIGINT:
      raise KeyboardInterrupt   # a second Ctrl-C stops at once
    logging.warning("signal %d: saving a checkpoint at the end of this chunk, "
                    "then exiting with code %d.", signum, PREEMPTED_EXIT_CODE)
    self.raised = True

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _crossed(previous: int, current: int, every: int) -> bool:
  """Did the step pass a multiple of `every` between the two values?"""
  return every > 0 and current // every > previous // every


class Runner:
  """One configured run: strategy, task, model, optimizer, state, steps."""

  steps_class = Steps

  def __new__(cls, config: Config, task=None):
    del task
    if cls is Runner and config.strategy == "parameter_server":
      from trainer import ps  # the coordinator's loop (ClusterCoordinator)
      cls = ps.Runner
    return super().__new__(cls)

  def __init__(self, config: Config, task=None):
    strategy_lib.configure_devices(config)
    self.strategy, self.role = strategy_lib.build(config)
    check_divisible(config, self.strategy.num_replicas_in_sync)
    self.config = config
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.mixed_precision)
    self.task = task if task is not None else tasks.from_config(config)
    # Data first: a missing file is reported before model_dir is touched.
    spec = pipeline.input_spec(self.task, config.train_split)
    with self.strategy.scope():
      self.model = self.task.build_model(spec)
      self.state = TrainState()
      self.optimizer = optim.build(config, self.state.global_step,
                                   self.model.trainable_variables)
    self.steps = self.steps_class(self.strategy, self.task, self.model,
                                  self.optimizer, self.state, config)
    self.checkpointer = ckpt_lib.Checkpointer(
        config.model_dir,
        {"model": self.model, "optimizer": self.optimizer,
         "global_step": self.state.global_step, "state": self.state,
         "config": tf.Variable(config.to_json(), trainable=False)},
        keep=config.keep_checkpoints, is_chief=self.role.is_chief,
        worker_index=self.role.worker_index)
    self.writers = None
    self._eval_data = None
    self._vote = None
    self.progress = None
    self.best = None

  # ---- helpers ----------------------------------------------------------
  @property
  def global_step(self) -> int:
    return int(self.state.global_step.numpy())

  def _open_outputs(self):
    """Creates --model_dir outputs; only after restore has succeeded."""
    if self.writers is None:
      if self.role.is_chief:
        os.makedirs(self.config.model_dir, exist_ok=True)
        with open(os.path.join(self.config.model_dir, "config.json"), "w") as f:
          f.write(self.config.to_json() + "\n")
      self.writers = summary.Writers(self.config.model_dir, self.role.is_chief)

  def _train_iterator(self):
    config, task = self.config, self.task
    position = int(self.state.position.numpy())
    args = (task, config.train_split, config.micro_batch_size, config.seed,
            position)
    if self.role.num_workers > 1 and getattr(task, "train_dataset",
                                             None) is None:
      # Each worker builds only its own rows of every global micro-batch.
      def dataset_fn(context):
        local = context.num_replicas_in_sync // context.num_input_pipelines
        return pipeline.worker_train_dataset(
            *args, num_replicas=context.num_replicas_in_sync,
            first_replica=context.input_pipeline_id * local,
            local_replicas=local)
      return iter(self.strategy.distribute_datasets_from_function(dataset_fn))
    ds = pipeline.train_dataset(*args)
    return iter(self.strategy.experimental_distribute_dataset(ds))

  def _agree(self, flag: bool) -> bool:
    """True if any worker says so (collective under multiworker)."""
    if self.role.num_workers <= 1:
      return flag
    if self._vote is None:
      def vote(flag):
        value = self.strategy.run(lambda: tf.identity(flag))
        # ReduceOp has no MAX: a SUM of 0/1 flags is > 0 iff any is set.
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, value,
                                    axis=None)
      self._vote = tf.function(vote)
    return float(self._vote(tf.constant(1.0 if flag else 0.0))) > 0

  def save(self) -> None:
    path = self.checkpointer.save(self.global_step)
    if path:
      logging.info("saved checkpoint %s", path)

  # ---- evaluation -----------------------------------------------------
  def evaluate(self) -> dict:
    config = self.config
    if self._eval_data is None:
      ds, batches, examples = pipeline.eval_dataset(
          self.task, config.eval_split, config.effective_eval_batch_size)
      self._eval_data = (self.strategy.experimental_distribute_dataset(ds),
                         batches, examples)
    dist, batches, _ = self._eval_data
    self.steps.eval_loop(iter(dist), tf.constant(batches, tf.int64))
    sums = self.steps.eval_sums.read_and_reset()
    weight = max(sums.pop("weight"), 1.0)
    metrics = {name: value / weight for name, value in sums.items()}
    step = self.global_step
    self._open_outputs()
    self.writers.scalars(self.writers.eval, step, metrics)
    if self.role.is_chief:
      logging.info("%s", summary.progress_line("eval", step,
                                               config.train_steps, metrics))
    return {**metrics, "examples": int(weight)}

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
    iterator = self._start_training()
    interval_time, interval_start, last = 0.0, step, {}
    bad_seen = int(state.nonfinite_steps.numpy())
    rollbacks = 0
    while step < config.train_steps:
      began = time.perf_counter()
      iterator = self._run_chunk(iterator, step)
      before, step = step, self.global_step
      elapsed = time.perf_counter() - began
      interval_time += elapsed
      self.progress.tick(step, (step - before) / max(elapsed, 1e-9),
                         config.global_batch_size)
      bad = int(state.nonfinite_steps.numpy())
      if bad > bad_seen:
        rollbacks += self._on_nonfinite(bad, bad_seen, rollbacks)
        bad_seen = bad
        if config.nonfinite == "rollback":
          iterator = self._iterator_after_rollback(iterator)
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
      if self._agree(stop.raised or damaged):
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

  # The three places where strategies differ in how chunks run (the
  # parameter-server coordinator overrides them; the bookkeeping around
  # them in _train_chunks is shared).
  def _start_training(self):
    """The training iterator, at the restored data position."""
    return self._train_iterator()

  def _run_chunk(self, iterator, step: int):
    """Runs the updates up to the next boundary (summary, checkpoint,
    evaluation, histogram, or --steps_per_loop), at most. Returns the
    iterator to continue with."""
    config = self.config
    todo = min(config.steps_per_loop, config.train_steps - step)
    for every in (config.summary_every, config.checkpoint_every,
                  config.eval_every, config.histograms_every):
      if every > 0:
        todo = min(todo, every - step % every)
    probe, profiler = self._wait_probe, self._profiler
    # Windows of the instruments end chunks alike on every worker.
    todo = profiler.limit(step, todo)
    todo, timed = probe.plan(step, todo)
    profiler.before_chunk(step)
    iterator = self._train_chunk(iterator, todo, probe.wrap if timed else None)
    if timed:
      probe.after_chunk()
    profiler.after_chunk(self.global_step)
    return iterator

  def _train_chunk(self, iterator, todo: int, wrap=None):
    """`todo` updates. Through the per-chunk guard when the steps have it:
    a non-finite update makes every worker restore the chunk's start and
    replay it guarded per update, from a new iterator at the chunk's first
    position. Returns the iterator to continue with."""
    steps, num = self.steps, tf.constant(todo, tf.int64)
    wrapped = wrap(iterator) if wrap else iterator
    if not steps.chunk_guard:
      steps.train_loop(wrapped, num)
      return iterator
    if bool(steps.fast_loop(wrapped, num)):
      return iterator
    steps.restore_chunk_start()
    logging.info("non-finite update in the chunk at step %d: replaying it "
                 "with the per-update guard.", self.global_step)
    iterator = self._train_iterator()
    steps.train_loop(wrap(iterator) if wrap else iterator, num)
    return iterator

  def _iterator_after_rollback(self, iterator):
    """After a rollback the data position moved past the bad batch."""
    del iterator
    return self._train_iterator()

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

  def _on_nonfinite(self, bad: int, bad_seen: int, rollbacks: int) -> int:
    """Acts on new non-finite updates; returns 1 if it rolled back."""
    config, state = self.config, self.state
    where = int(state.last_bad_position.numpy())
    logging.warning("%d non-finite update(s) dropped (latest at example "
                    "position %d); --nonfinite=%s.", bad - bad_seen, where,
                    config.nonfinite)
    if config.nonfinite == "fail":
      raise NonFiniteError(
          f"non-finite loss or gradient at example position {where} (step "
          f"{self.global_step}); the weights are unchanged. Use "
          "--nonfinite=skip or rollback to continue past it.")
    if config.nonfinite == "skip":
      return 0
    if rollbacks >= config.max_rollbacks:
      raise NonFiniteError(
          f"non-finite loss or gradient again after {rollbacks} rollback(s) "
          f"(--max_rollbacks={config.max_rollbacks}); latest at example "
          f"position {where}. Lower --learning_rate or check the data.")
    restored = self.checkpointer.restore(config)
    # Move past the bad batch: the restored position would replay it.
    resume_at = max(int(state.position.numpy()),
                    where + config.global_batch_size)
    state.position.assign(resume_at)
    state.nonfinite_steps.assign(bad)
    state.last_bad_position.assign(where)
    logging.warning("rolled back to %s (step %d); training resumes at example "
                    "position %d.", restored or "the current weights",
                    self.global_step, resume_at)
    return 1

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
        "learning_rate": float(optim.learning_rate_at(step, config)),
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

  # ---- evaluation-only modes ------------------------------------------
  def evaluate_checkpoint(self, path: str | None = None) -> dict:
    if path and os.path.isdir(path):   # e.g. --checkpoint=MODEL_DIR/best
      path = tf.train.latest_checkpoint(path) or path
    restored = self.checkpointer.restore(self.config, path)
    if restored is None:
      raise UserError(f"--mode=eval: no checkpoint in --model_dir="
                      f"{self.config.model_dir}; train first or pass "
                      "--checkpoint=PATH.")
    logging.info("evaluating %s (step %d)", restored, self.global_step)
    return {"global_step": self.global_step, "checkpoint": restored,
            **_prefixed("eval", self.evaluate())}

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


def train(config: Config, task=None) -> dict:
  """Trains `task` (default: the one --task/--model/--dataset name) under
  `config`, resuming from --model_dir; returns the JSON summary dict."""
  runner = Runner(config, task)
  return runner.train(evaluate=config.mode == "train_and_eval")


def evaluate(config: Config, task=None, checkpoint: str | None = None) -> dict:
  """Evaluates the latest (or given) checkpoint in --model_dir."""
  return Runner(config, task).evaluate_checkpoint(checkpoint)


def run(config: Config, task=None) -> dict:
  """Dispatches on --mode."""
  runner = Runner(config, task)
  if config.mode == "eval":
    return runner.evaluate_checkpoint(config.checkpoint or None)
  if config.mode == "continuous_eval":
    return runner.continuous_eval()
  return runner.train(evaluate=config.mode == "train_and_eval")


def summary_line(result: dict) -> str:
  """The last stdout line of a run: one JSON object."""
  keys = ("global_step", "train_loss", "eval_loss", "eval_accuracy")
  ordered = {k: result.get(k) for k in keys}
  ordered.update({k: v for k, v in result.items() if k not in ordered})
  return json.dumps(ordered, sort_keys=False)
