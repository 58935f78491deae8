"""What the outer loop does after each chunk of updates, one action each
(Orbit's Controller actions): the non-finite policy, train summaries,
histograms, the stop vote (preemption, damaged data), checkpoints,
evaluation with best-checkpoint keeping and early stopping.

An action is a callable `action(tick)`; the Controller calls its list in
order after every chunk. `tick` says what the chunk did and carries what
actions tell the loop (stop, roll back) and each other (summarized,
saved). Adding behaviour (the benchmark's probe, a user's hook) is adding
an action: `Controller(..., actions=[*defaults, mine])`.
"""

import dataclasses

from absl import logging
import tensorflow as tf

from trainer import guard, optim
from trainer.errors import UserError


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
  skip_corrupt: bool = False
  eval_timeout_s: float = 3600.0
  hang_timeout_s: float = 120.0      # trainer.hang's floor; 0: no watch
  # The --lr_schedule's inputs (optim.learning_rate_at), for the scalar.
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  lr_schedule: str = "constant"


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
