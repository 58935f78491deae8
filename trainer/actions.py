"""What the outer loop does after each chunk of updates, one action each
(Orbit's Controller actions): the non-finite policy, train summaries,
histograms, the stop vote (preemption, damaged data), checkpoints,
evaluation with best-checkpoint keeping and early stopping, the goodput
account (goodput/) and the hardware efficiency (perf/).

An action is a callable `action(tick)`; the Controller calls its list in
order after every chunk. `tick` says what the chunk did and carries what
actions tell the loop (stop, roll back) and each other (summarized,
saved). Adding behaviour (the benchmark's probe, a user's hook) is adding
an action: `Controller(..., actions=[*defaults, mine])`.
"""

import dataclasses
import os
import time

from absl import logging
import keras
import tensorflow as tf

from trainer import cpuinfo, flops, goodput, guard, optim
from trainer.data import pipeline
from trainer.data.readers import folder_index
from trainer.errors import UserError
from trainer.task import Task


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """What the outer loop and its actions read (field names are the flags');
  trainer.build fills it from the Config."""
  train_steps: int = 1000
  global_batch_size: int = 64
  summary_every: int = 100
  checkpoint_every: int = 500
  eval_every: int = 500
  histograms_every: int = 0
  model_dir: str = "runs/default"
  progress: str = "auto"
  input_wait_steps: int = 10
  deterministic: bool = False
  profile_range: tuple[int, int] | None = None
  tracks_best: bool = False
  early_stopping_patience: int = 0
  early_stopping_metric: str = "loss"
  early_stopping_mode: str = "auto"
  early_stopping_min_delta: float = 0.0
  nonfinite: str = "rollback"
  max_rollbacks: int = 3
  mode: str = "train_and_eval"   # what Controller.run does
  checkpoint: str = ""           # --mode=eval's checkpoint ("": the latest)
  skip_corrupt: bool = False
  eval_timeout_s: float = 3600.0
  hang_timeout_s: float = 120.0      # trainer.hang's floor; 0: no watch
  # The --lr_schedule's inputs (optim.learning_rate_at), for the scalar.
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  lr_schedule: str = "constant"
  perf_flops: str = "auto"
  # The inputs of the step's FLOP count (perf/).
  train_split: str = "train"
  micro_batch_size: int = 64
  seed: int = 0


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint at the current step was saved."""

  def __init__(self, step: int):
    super().__init__(f"preempted: checkpoint saved at step {step}; run the "
                     "same command to resume.")
    self.step = step


def crossed(previous: int, current: int, every: int) -> bool:
  """Did the step pass a multiple of `every` between the two values?

  >>> crossed(95, 105, 100), crossed(100, 150, 100), crossed(5, 9, 0)
  (True, False, False)
  """
  return every > 0 and current // every > previous // every


@dataclasses.dataclass
class Tick:
  """One chunk, as the actions see it."""
  before: int              # global step before the chunk
  step: int                # global step after it
  done: bool               # step >= --train_steps
  seconds: float           # the chunk's wall time
  ended: float = 0.0       # time.perf_counter() at the chunk's end
  # Set by actions:
  rolled_back: bool = False   # the loop restarts its data; later actions skip
  summarized: bool = False
  saved: bool = False
  stop: bool = False          # end training after this tick (early stop)


class NonFinitePolicy:
  """--nonfinite: after a chunk with new non-finite updates, fail, skip on,
  or roll back to the last checkpoint past the bad batch."""

  def __init__(self, loop):
    self._loop = loop
    self._seen = int(loop.state.nonfinite_steps.numpy())
    self._rollbacks = 0

  def __call__(self, tick: Tick) -> None:
    loop = self._loop
    bad = int(loop.state.nonfinite_steps.numpy())
    if bad <= self._seen:
      return
    self._rollbacks += guard.on_nonfinite(
        loop.settings, loop.state, loop.checkpointer, loop.record, bad,
        self._seen, self._rollbacks)
    self._seen = bad
    if loop.settings.nonfinite == "rollback":
      tick.rolled_back = True


class TrainSummaries:
  """Train scalars and the progress line at every --summary_every and at
  the end; `last` is the latest interval's metrics for the JSON line."""

  def __init__(self, loop):
    self._loop = loop
    self.last = {}
    self.last_seconds = 0.0
    self.reset(loop.global_step)

  def reset(self, step: int) -> None:
    self.interval_start, self.interval_time = step, 0.0

  def __call__(self, tick: Tick) -> None:
    self.interval_time += tick.seconds
    if crossed(tick.before, tick.step, self._loop.settings.summary_every) \
        or tick.done:
      self.write(tick)

  def write(self, tick: Tick) -> None:
    self.last = self._loop.write_train_summary(
        tick.step, self.interval_start, self.interval_time)
    # The chunks' seconds of the interval just written (the bench reads it).
    self.last_seconds = self.interval_time
    self.reset(tick.step)
    tick.summarized = True


class WeightHistograms:
  """--histograms_every: weights (and gradients where the backend steps
  synchronously) as train/ histograms."""

  def __init__(self, loop, histograms):
    self._loop = loop
    self._histograms = histograms

  def __call__(self, tick: Tick) -> None:
    if crossed(tick.before, tick.step, self._loop.settings.histograms_every):
      writers = self._loop.writers
      writers.histograms(writers.train, tick.step,
                         self._histograms.values(tick.step))


class StopVote:
  """SIGTERM/SIGINT, or a damaged record without --skip_corrupt: every
  worker agrees, saves, and the run ends (exit 75, or 2 for the data)."""

  def __init__(self, loop, stop_signal):
    self._loop = loop
    self._signal = stop_signal

  def __call__(self, tick: Tick) -> None:
    loop = self._loop
    log = loop.task.damage_log
    damaged = (log is not None and log.found()
               and not loop.settings.skip_corrupt)
    if loop.executor.agree(self._signal.raised or damaged):
      loop.save()
      if damaged:
        raise UserError(log.error_line())
      raise Preempted(tick.step)


class Checkpoints:
  """A checkpoint at every --checkpoint_every and at the end."""

  def __init__(self, loop):
    self._loop = loop

  def __call__(self, tick: Tick) -> None:
    if crossed(tick.before, tick.step, self._loop.settings.checkpoint_every) \
        or tick.done:
      self.save(tick)

  def save(self, tick: Tick) -> None:
    self._loop.save()
    tick.saved = True


class Evaluation:
  """Evaluation at every --eval_every (the final one is the loop's), with
  best/ and early stopping: an early stop writes the interval's summary and
  a checkpoint first, so the run ends at a recorded, saved step."""

  def __init__(self, loop, summaries: TrainSummaries, checkpoints: Checkpoints):
    self._loop = loop
    self._summaries = summaries
    self._checkpoints = checkpoints

  def __call__(self, tick: Tick) -> None:
    loop = self._loop
    if tick.done or not crossed(tick.before, tick.step,
                                loop.settings.eval_every):
      return
    metrics = loop.evaluate()
    if loop.early_stop(tick.step, metrics):
      if not tick.summarized:
        self._summaries.write(tick)
      if not tick.saved:
        self._checkpoints.save(tick)
      loop.stopped_eval = metrics
      tick.stop = True


class GoodputAccount:
  """Where the wall time went (trainer.goodput): after every chunk its time
  and the loop's time since the last account (checkpoint saves and
  evaluation as the loop timed them, the rest as other); at every train
  summary the goodput/ scalars, each worker's step time among them
  (goodput/worker_<i>/step_s: under a synchronous strategy the collectives
  make them alike, so a straggler shows by its own input wait,
  goodput/worker_<i>/input_wait_share)."""

  def __init__(self, loop, summaries: TrainSummaries, started: float,
               start_source: str):
    self._loop = loop
    self._summaries = summaries
    self.recorder = goodput.Recorder(
        loop.settings.model_dir, loop.role.is_chief, started, start_source,
        loop.global_step)
    self._mark = None            # perf_counter at the end of the last account
    self._step = loop.global_step
    self._timed = loop.timed_seconds()
    self._interval = [0.0, 0]    # this worker's chunk seconds and updates

  def _fold(self, until: float) -> None:
    """The loop's time from the last account to `until` (perf_counter):
    saves, evaluations (as the loop timed them) and the rest as other."""
    timed = self._loop.timed_seconds()
    blocked = timed["checkpoint"] - self._timed["checkpoint"]
    evaluating = timed["evaluation"] - self._timed["evaluation"]
    self._timed = timed
    rec = self.recorder
    rec.add("checkpoint_blocked_s", blocked)
    rec.add("evaluation_s", evaluating)
    if self._mark is not None:
      rec.add("other_s", max(0.0, until - self._mark - blocked - evaluating))
    self._mark = until

  def count(self, tick: Tick) -> None:
    """The first action: the chunk and the loop's time before it (placed
    before any action that may end the tick or the run)."""
    rec = self.recorder
    began = tick.ended - tick.seconds
    if self._mark is None:   # the first chunk: start-up ends where it began
      rec.startup(time.time() - (time.perf_counter() - began))
    self._fold(began)
    if tick.before < self._step:   # rolled back: those updates are redone
      rec.redone(self._step - tick.before)
    updates = tick.step - tick.before
    rec.chunk(tick.seconds, updates)
    self._interval[0] += tick.seconds
    self._interval[1] += updates
    self._step = tick.step
    self._mark = tick.ended

  def __call__(self, tick: Tick) -> None:
    """The last built-in action: the record, and goodput/ at a summary."""
    self._fold(time.perf_counter())
    rec = self.recorder
    share = None
    if tick.summarized:
      share = self._loop.input_wait_share
      if share is not None:
        rec.input_wait(share * self._summaries.last_seconds)
    totals = rec.record(time.time(), tick.step, self._background(),
                        force=tick.summarized or tick.saved or tick.done)
    if tick.summarized:
      self._write(tick.step, totals, share)

  def _background(self) -> float:
    return self._loop.checkpointer.background_seconds()

  def _write(self, step: int, totals: goodput.Totals, share) -> None:
    loop = self._loop
    seconds, updates = self._interval
    self._interval = [0.0, 0]
    own = [seconds / updates if updates else 0.0,
           -1.0 if share is None else share]
    # A collective under multi-worker: every worker calls it alike.
    workers = loop.executor.gather(own)
    scalars = scalars_of(totals)
    for i, (step_s, wait) in enumerate(workers):
      scalars[f"goodput/worker_{i}/step_s"] = step_s
      if wait >= 0:
        scalars[f"goodput/worker_{i}/input_wait_share"] = wait
    loop.writers.scalars(loop.writers.train, step, scalars)

  def finish(self, step: int, ended: str) -> dict:
    """The account at the end (after the final evaluation): written, and
    the JSON line's values."""
    self._fold(time.perf_counter())
    totals = self.recorder.record(time.time(), step, self._background(),
                                  ended=ended)
    loop = self._loop
    if loop.writers is not None:
      loop.writers.scalars(loop.writers.train, step, scalars_of(totals))
    return {"goodput": goodput.goodput(totals)}


def scalars_of(totals: goodput.Totals) -> dict:
  """The goodput/ scalars of `totals`."""
  values = {f"goodput/{name}": getattr(totals, name)
            for name in ("wall_s", *goodput.CATEGORIES,
                         "checkpoint_background_s", "lost_updates",
                         "restarts")}
  values["goodput/goodput"] = goodput.goodput(totals)
  return values


class Perf:
  """perf/ scalars at every train summary: the model FLOP/s achieved over
  the interval's chunks (examples/sec x training FLOPs per example) and its
  share of the machine's measured matmul peak in the compute dtype (x the
  number of workers: one machine each is assumed).

  --perf_flops=auto counts the built-in step as 3 x the main model's
  forward pass (the benchmark's convention); a task's own train_step is
  not counted then (one log line), --perf_flops=trace counts any step by
  tracing one micro-step once more (forward and backward exactly as
  written, 1-3 s); off: no perf/."""

  def __init__(self, loop, summaries: TrainSummaries):
    self._loop = loop
    self._summaries = summaries
    settings = loop.settings
    self.flops_per_example = None
    self.peak = None
    how = settings.perf_flops
    if how == "off" or not loop.role.is_chief:
      return   # only the chief writes perf/ (and measures the peak alone)
    try:
      self.flops_per_example, method = step_flops(loop.parts, settings, how)
    except Exception as e:   # noqa: BLE001 - a count that fails is reported
      self.flops_per_example, method = None, (
          f"TensorFlow's profiler could not count this step ({e!r:.200})")
    if not self.flops_per_example:
      logging.info("perf/: model FLOP/s cannot be counted: %s; no perf/ "
                   "scalars.", method)
      return
    dtype = keras.mixed_precision.global_policy().compute_dtype
    try:
      usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
      usable = os.cpu_count()
    cpu = cpuinfo.this_cpu()
    gflops, source = flops.machine_peak(
        dtype, folder_index.location(""),
        {"cpu": cpu.get("cpu"), "flags": cpu.get("flags"), "cpus": usable,
         "tensorflow": tf.__version__,
         "devices": [d.device_type for d in tf.config.list_logical_devices()]})
    self.peak = gflops * 1e9 * loop.role.num_workers
    logging.info("perf/: %.4g training FLOPs per example (%s); matmul peak "
                 "%.0f GFLOP/s in %s (%s).", self.flops_per_example, method,
                 gflops, dtype, source)

  def __call__(self, tick: Tick) -> None:
    if not tick.summarized or not self.flops_per_example:
      return
    rate = self._summaries.last.get("examples_per_sec") or 0.0
    achieved = rate * self.flops_per_example
    loop = self._loop
    loop.writers.scalars(loop.writers.train, tick.step, {
        "perf/model_flops_per_sec": achieved,
        "perf/peak_flops_per_sec": self.peak,
        "perf/peak_share": achieved / self.peak,
        "perf/flops_per_example": self.flops_per_example})


def step_flops(parts, settings, how: str) -> tuple[float | None, str]:
  """(training FLOPs per example of the run's step, how they were counted),
  or (None, why not)."""
  task = parts.task
  builtin = type(task).train_step is Task.train_step
  if how == "auto" and not builtin:
    return None, ("the task has its own train_step (--perf_flops=trace "
                  "counts it by tracing one micro-step once more)")
  batch = settings.micro_batch_size
  spec = pipeline.train_dataset(task, settings.train_split, batch,
                                settings.seed, 0).element_spec
  if how == "auto":
    unbatched = tf.nest.map_structure(
        lambda s: tf.TensorSpec(s.shape[1:], s.dtype), spec[0])
    forward = flops.profiler_forward_flops(parts.model, batch, unbatched)
    return (flops.TRAIN_FACTOR * forward / batch,
            f"{flops.TRAIN_FACTOR:g} x the forward pass, TF profiler")
  step = tf.function(parts.steps._micro_step)  # noqa: SLF001
  graph = step.get_concrete_function(*spec).graph
  return (flops.graph_flops(graph) / batch,
          "one traced micro-step (forward and backward), TF profiler")


def learning_rates(parts, schedule, step: int) -> dict:
  """learning_rate (the --lr_schedule), or each task optimizer's own."""
  if not parts.flag_optimizer:
    # float() of a Keras variable fails when its value is a
    # MirroredVariable (more than one replica): read it as a tensor.
    rates = {name: float(tf.convert_to_tensor(o.learning_rate))
             for name, o in parts.optimizers.items()}
    if len(rates) == 1:
      return {"learning_rate": next(iter(rates.values()))}
    return {f"learning_rate/{name}": v for name, v in rates.items()}
  return {"learning_rate": float(optim.learning_rate_at(step, schedule))}
