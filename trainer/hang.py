"""The hang watch: a training process whose updates stop while it stays
alive (an input read blocked on a stuck file system, a collective waiting
for a peer that is itself stuck, a wedged op) ends itself.

What it watches is the progress of the step itself, not whether the
process answers. A poller thread reads a progress counter (the training
stream position, which every update advances, applied or skipped) about
once a second; another thread checks, while a chunk of updates runs, how
long ago the counter last moved. No progress for longer than the bound is
a hang:

  bound = max(--hang_timeout_s, 10 x the median update time so far)

(default --hang_timeout_s=120; 0 turns the watch off). The bound is per
update, whatever --steps_per_loop: a chunk of many updates is watched
update by update. The median is over the chunks run so far (seconds per
update of each), leaving out the ones that traced or followed a pause.

The loop's own Python is not a step either: the watch also samples the
innermost frames of the thread that runs the chunks, and any movement
there (AutoGraph converting, tracing, scheduling) restarts the clock; a
thread blocked in an op shows one frozen frame. While a training function's
Python trace runs (the first chunk, the input-wait probe's timed copy, a
guarded replay: Steps.on_trace says so), the watch waits. Until the first update after
start-up, a trace, a checkpoint save or an evaluation, the bound is
START_FACTOR (5) times longer: TensorFlow still builds the traced function,
and under multiworker the first collective after any of them waits for the
slowest peer's trace, restore, save or evaluation. Checkpoint saves,
evaluation, summaries and the stop vote run between chunks, where the watch
is paused: a long save or evaluation is not a hang (the collective timeout,
--peer_timeout_s, still bounds their waits on peers).

Not tried on TPUs: there a read of the counter may wait for the running
program, so a chunk longer than the bound would look like a hang; raise
--hang_timeout_s above a chunk's time there, or set 0.

A process that sees a hang logs one line saying so, then every thread's
Python stack (sys._current_frames: the main thread inside the chunk's
tf.function call, and any Python input function where it blocks) and the
loop's state it knows without calling TensorFlow (which may be wedged),
flushes its output and ends with exit 142 (trainer/exitcodes.py HANG),
which launch.local --max_restarts restarts: the group resumes from the
last checkpoint. A blocked op cannot be interrupted, so this is the
watchdogs' hard exit (errors.request_stop), not a graceful stop.

No TensorFlow here: the counter is read through the callable it is given.
"""

import collections
import contextlib
import logging as std_logging
import statistics
import sys
import threading
import time
import traceback
from typing import Callable

from absl import logging

from trainer import errors
from trainer import exitcodes

START_FACTOR = 5      # the bound until the first update after start, a trace, a pause
MEDIAN_FACTOR = 10    # the bound is at least this many median update times
_SAMPLES = 101        # chunk times the median is taken over (the latest ones)


class HangWatch:
  """One process's watch over its training chunks (see the module doc).

  timeout_s: --hang_timeout_s, the bound's floor (> 0).
  read_progress: returns the progress counter; called from the poller
    thread only.
  context: facts the report names (strategy, worker, ...).
  clock, on_hang: for tests; on_hang(message) ends the process by default.
  """

  def __init__(self, timeout_s: float, read_progress: Callable[[], int],
               context: dict | None = None, *, poll_s: float | None = None,
               clock: Callable[[], float] = time.monotonic,
               on_hang: Callable[[str], None] | None = None,
               program: str = "trainer.main"):
    if not timeout_s > 0:
      raise ValueError(f"timeout_s={timeout_s} must be > 0")
    self.timeout_s = float(timeout_s)
    self._read = read_progress
    self._context = dict(context or {})
    self._poll_s = poll_s or max(0.05, min(1.0, self.timeout_s / 20))
    self._clock = clock
    self._on_hang = on_hang or self._exit
    self._program = program
    self._lock = threading.Lock()
    self._stopped = threading.Event()
    self._threads = []
    self._samples = collections.deque(maxlen=_SAMPLES)
    # Guarded by _lock:
    self._armed_at = None     # clock() when the running chunk started
    self._chunk_step = None   # the global step it started at
    self._moved_at = None     # clock() of the last progress seen
    self._moves = 0           # progress seen in the running chunk
    self._value = None        # the counter as last read
    self._long = True         # START_FACTOR applies until the next update
    self._long_chunk = False  # this chunk traced or followed a pause
    self._tracing = False     # a training function's Python trace runs
    self._traced_at = None    # clock() when the last trace ended
    self._python_at = None    # clock() when the loop's thread last ran Python
    self._loop_thread = None  # threading.get_ident() of the thread that arms
    self._loop_frame = None   # its innermost frame as last sampled
    self._fired = False

  # ---- what the loop tells it -----------------------------------------
  def start(self) -> "HangWatch":
    for name, target in (("hang-poll", self._poll), ("hang-watch", self._watch)):
      thread = threading.Thread(target=target, name=name, daemon=True)
      thread.start()
      self._threads.append(thread)
    return self

  def stop(self) -> None:
    self._stopped.set()

  def arm(self, step: int) -> None:
    """A chunk starting at global step `step` runs from now."""
    with self._lock:
      self._armed_at = self._clock()
      self._loop_thread = threading.get_ident()
      self._chunk_step = step
      self._moves = 0
      self._long_chunk = self._long
      self._tracing = False   # a trace that raised never said it ended

  def disarm(self, updates: int) -> None:
    """The chunk ended after `updates` updates; its time per update joins
    the median unless it traced or followed a pause."""
    with self._lock:
      if self._armed_at is None:
        return
      seconds = self._clock() - self._armed_at
      if updates > 0 and not self._long_chunk:
        self._samples.append(seconds / updates)
      self._armed_at = None
      self._tracing = False

  @contextlib.contextmanager
  def chunk(self, step: int):
    """Watches the chunk run inside the `with`; the caller sets
    `.updates` on the yielded record once it knows them."""
    record = ChunkRecord()
    self.arm(step)
    try:
      yield record
    finally:
      self.disarm(record.updates)

  def note_trace(self, active: bool) -> None:
    """A training function's trace begins (True: the watch waits) or its
    Python body ended (False: the clock starts again, with START_FACTOR
    until the next update)."""
    with self._lock:
      self._tracing = active
      self._long = self._long_chunk = True
      if not active:
        self._traced_at = self._clock()

  def note_pause(self) -> None:
    """A checkpoint save or an evaluation ran between chunks."""
    with self._lock:
      self._long = True

  def bound(self) -> float:
    """The bound on the time between updates (seconds), START_FACTOR not
    included."""
    with self._lock:
      return self._bound()

  def _bound(self) -> float:
    if not self._samples:
      return self.timeout_s
    return max(self.timeout_s,
               MEDIAN_FACTOR * statistics.median(self._samples))

  # ---- the threads ------------------------------------------------------
  def _poll(self) -> None:
    failed = False
    while not self._stopped.is_set():
      try:
        value = self._read()
      except Exception as e:   # noqa: BLE001 - the watch must not die
        if not failed:
          logging.warning("hang watch: cannot read the progress counter "
                          "(%s); the watch sees no progress while it fails.",
                          errors.first_line(e))
        failed = True
      else:
        failed = False
        self.progress(value)
      self._stopped.wait(self._poll_s)

  def progress(self, value: int) -> None:
    """The counter read `value` (the poller's call; tests call it too)."""
    with self._lock:
      if value == self._value:
        return
      self._value = value
      if self._armed_at is not None:
        self._moved_at = self._clock()
        self._moves += 1
        self._long = False

  def python_ran(self) -> None:
    """The loop's thread ran Python since the last look: it is not blocked
    in an op (it traces, converts, schedules); the clock starts again."""
    with self._lock:
      if self._armed_at is not None:
        self._python_at = self._clock()

  def _sample_loop_thread(self) -> None:
    """Calls python_ran() if the loop thread's innermost Python frame moved
    since the last sample. A thread blocked in TensorFlow's C++ (a step, a
    collective, an input fetch) shows the same frame at the same
    instruction for as long as it is blocked."""
    frame = sys._current_frames().get(self._loop_thread)   # noqa: SLF001
    seen = []
    while frame is not None:   # (code, instruction) of the innermost 4, depth
      if len(seen) < 4:
        seen.append((id(frame.f_code), frame.f_lasti))
      seen.append(None)
      frame = frame.f_back
    seen = (len(seen), tuple(x for x in seen if x is not None))
    if seen != self._loop_frame:
      self._loop_frame = seen
      self.python_ran()

  def _watch(self) -> None:
    while not self._stopped.wait(self._poll_s):
      self._sample_loop_thread()
      message = self.check()
      if message is not None:
        self._fire(message)
        return

  def check(self) -> str | None:
    """The hang's one-line description if the running chunk has made no
    progress for longer than its bound, else None."""
    with self._lock:
      if self._armed_at is None or self._fired or self._tracing:
        return None
      now = self._clock()
      since = self._armed_at
      if self._moves and self._moved_at is not None:
        since = max(since, self._moved_at)
      if self._traced_at is not None:
        since = max(since, self._traced_at)
      if self._python_at is not None:
        since = max(since, self._python_at)
      bound = self._bound()
      limit = bound * (START_FACTOR if self._long else 1)
      waited = now - since
      if waited <= limit:
        return None
      self._fired = True
      median = (f"{statistics.median(self._samples):.3g} s"
                if self._samples else "not measured yet")
      what = ("its first update" if not self._moves else
              f"the next update after {self._moves} seen")
      return (f"hang: no training progress for {waited:.0f} s in the chunk "
              f"from step {self._chunk_step} (waiting for {what}); the bound "
              f"is {limit:.0f} s = "
              + (f"{START_FACTOR} x " if self._long else "")
              + f"max(--hang_timeout_s={self.timeout_s:g}, {MEDIAN_FACTOR} x "
              f"the median update time, {median})")

  def _fire(self, message: str) -> None:
    logging.error("%s. Every thread's stack follows.", message)
    context = ", ".join(f"{k}={v}" for k, v in self._context.items())
    logging.error("hang: state: %s, progress counter %s, %d chunk times "
                  "measured, %s OS threads", context or "-", self._value,
                  len(self._samples), _os_threads())
    for line in thread_stacks():
      logging.error("%s", line)
    _flush()
    self._on_hang(message)

  def _exit(self, message: str) -> None:
    errors.request_stop(
        self._program,
        f"{message}; stacks logged above. Exit {exitcodes.HANG}: run the "
        "same command again (launch.local --max_restarts does) to resume "
        "from the last checkpoint.", exitcodes.HANG)


class ChunkRecord:
  """What the loop tells the watch about a chunk once it ended."""
  updates = 0


def thread_stacks() -> list[str]:
  """One text per live thread: its name and Python stack, main first."""
  names = {t.ident: t.name for t in threading.enumerate()}
  frames = sys._current_frames()   # noqa: SLF001 - the documented way
  main = threading.main_thread().ident
  out = []
  for ident in sorted(frames, key=lambda i: (i != main, names.get(i, ""))):
    stack = "".join(traceback.format_stack(frames[ident])).rstrip()
    name = names.get(ident, "a thread not started by Python (TensorFlow's)")
    out.append(f"hang: thread {name!r} ({ident}), most recent call "
               f"last:\n{stack}")
  return out


def _os_threads() -> str:
  """The process's OS threads (TensorFlow's pools included), from /proc."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Threads:"):
          return line.split()[1]
  except OSError:
    pass
  return "?"


def _flush() -> None:
  for handler in (logging.get_absl_logger().handlers
                  + std_logging.getLogger().handlers):
    with contextlib.suppress(Exception):
      handler.flush()
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
