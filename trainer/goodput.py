"""The goodput account: where a run's wall time went, across restarts.

Categories (seconds, summed over every process of the run in --model_dir):
  startup_s              process start to the first chunk of updates (Python,
                         TensorFlow's import, the build, the restore, the
                         first iterator); the first chunk's trace is stepping
  stepping_s             the chunks of updates, less the two below
  input_wait_s           the input-wait probe's share x its interval's chunk
                         time (0 without the probe: --input_wait_steps=0 or
                         --deterministic; the wait is then in stepping_s)
  checkpoint_blocked_s   the loop blocked in the checkpoint save call
  evaluation_s           evaluation (periodic and final) and best/ keeping
  other_s                the loop's own host work between chunks: summaries,
                         progress, the stop vote (a collective), histograms
  lost_s                 updates redone: after a restart, the updates between
                         the checkpoint it resumed from and the last step the
                         previous process recorded (after a rollback, the
                         updates rolled back), x that process's update time
                         (the median per-update time of its latest chunks,
                         its first chunk, which traces, left out when there
                         are others); moved out of stepping_s
  downtime_s             from the previous process's last record to this
                         process's start (not after a run that had finished:
                         a later run that extends it starts a new session)
They add up to wall_s, the sum of each process's span (its start to its last
record) and the downtimes. checkpoint_background_s (background writes,
overlapping the others) is reported beside them, not in the sum.
`goodput` = stepping_s / wall_s.

The chief writes MODEL_DIR/goodput.json (atomically) after chunks, at most
once per RECORD_EVERY_S and at every summary, checkpoint and end: a killed
process's last ~second after its last record counts as downtime.
This module has no TensorFlow: pure arithmetic and the record file.
"""

import collections
import dataclasses
import json
import os
import statistics
import time

FILE = "goodput.json"
RECORD_EVERY_S = 1.0
_RECENT_CHUNKS = 64   # the update time is the median over these
CATEGORIES = ("startup_s", "stepping_s", "input_wait_s",
              "checkpoint_blocked_s", "evaluation_s", "other_s", "lost_s",
              "downtime_s")
# How a process ended, as its last record says.
RUNNING, FINISHED, PREEMPTED, FAILED = "running", "finished", "preempted", \
    "failed"

_IMPORTED = time.time()


def process_start() -> tuple[float, str]:
  """(this process's start as a time.time() value, where it came from):
  /proc/self/stat's start time (clock ticks since boot) against
  /proc/uptime, 10 ms resolution; elsewhere the import of this module."""
  try:
    with open("/proc/self/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    ticks = int(fields[19])   # field 22 of proc(5); fields[0] is field 3
    age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - max(age, 0.0), "process start (/proc/self/stat)"
  except (OSError, ValueError, IndexError):
    return _IMPORTED, "import of trainer.goodput"


@dataclasses.dataclass
class Totals:
  """Seconds per category and update counts, summed over processes."""
  wall_s: float = 0.0
  startup_s: float = 0.0
  stepping_s: float = 0.0
  input_wait_s: float = 0.0
  checkpoint_blocked_s: float = 0.0
  evaluation_s: float = 0.0
  other_s: float = 0.0
  lost_s: float = 0.0
  downtime_s: float = 0.0
  checkpoint_background_s: float = 0.0
  updates: int = 0          # updates stepped, redone ones included
  lost_updates: int = 0
  restarts: int = 0

  def plus(self, other: "Totals") -> "Totals":
    return Totals(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                     for f in dataclasses.fields(Totals)})


def goodput(totals: Totals) -> float:
  """The share of wall time spent stepping.

  >>> goodput(Totals(wall_s=10.0, stepping_s=7.5))
  0.75
  """
  return totals.stepping_s / totals.wall_s if totals.wall_s > 0 else 0.0


def accounted(totals: Totals) -> float:
  """The categories' sum (wall_s when nothing escaped the account)."""
  return sum(getattr(totals, name) for name in CATEGORIES)


def lose(totals: Totals, updates: int, update_s: float) -> Totals:
  """`updates` redone at `update_s` each: moved from stepping to lost.

  >>> t = lose(Totals(stepping_s=5.0, updates=50), 10, 0.1)
  >>> round(t.stepping_s, 6), round(t.lost_s, 6), t.lost_updates
  (4.0, 1.0, 10)
  """
  if updates <= 0:
    return totals
  seconds = min(updates * update_s, totals.stepping_s)
  return dataclasses.replace(
      totals, stepping_s=totals.stepping_s - seconds,
      lost_s=totals.lost_s + seconds,
      lost_updates=totals.lost_updates + updates)


def resumed(record: dict | None, start: float, restored_step: int) -> Totals:
  """The totals a process carries in from the previous one's `record`
  (goodput.json), given its own start and the step it restored.

  >>> prev = {"totals": dataclasses.asdict(Totals(wall_s=20.0,
  ...         stepping_s=12.0, updates=120)), "last": {"record": 100.0,
  ...         "step": 120, "update_s": 0.1, "ended": "running"}}
  >>> t = resumed(prev, 103.0, 100)
  >>> t.downtime_s, t.lost_updates, round(t.lost_s, 6), t.restarts
  (3.0, 20, 2.0, 1)
  >>> round(t.wall_s, 6), round(t.stepping_s, 6)
  (23.0, 10.0)
  """
  if not record:
    return Totals()
  names = {f.name for f in dataclasses.fields(Totals)}
  totals = Totals(**{k: v for k, v in record.get("totals", {}).items()
                     if k in names})
  last = record.get("last", {})
  if last.get("ended") != FINISHED:
    down = max(0.0, start - float(last.get("record", start)))
    totals = dataclasses.replace(totals, downtime_s=totals.downtime_s + down,
                                 wall_s=totals.wall_s + down,
                                 restarts=totals.restarts + 1)
  redone = int(last.get("step", restored_step)) - restored_step
  return lose(totals, redone, float(last.get("update_s", 0.0)))


def read(model_dir: str) -> dict | None:
  """goodput.json of `model_dir` (None if absent or unreadable)."""
  try:
    with open(os.path.join(model_dir, FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write(model_dir: str, record: dict) -> None:
  """goodput.json, atomically (a reader never sees half a file)."""
  path = os.path.join(model_dir, FILE)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


class Recorder:
  """This process's part of the account, over the carried totals.

  The loop calls `chunk` after every chunk, `add` for the other
  categories and `record` to write; times are time.time() seconds."""

  def __init__(self, model_dir: str, is_chief: bool, start: float,
               start_source: str, restored_step: int):
    self.model_dir = model_dir
    self.is_chief = is_chief
    previous = read(model_dir)
    last = float((previous or {}).get("last", {}).get("record", 0.0))
    if last > start:
      # Another run of this model dir recorded after this process started
      # (an earlier run inside this same process): this run starts after it.
      start, start_source = last, "the previous record of this model dir"
    self.start = start
    self.start_source = start_source
    self.carried = resumed(previous, start, restored_step)
    self.own = Totals()
    self.step = restored_step
    self._written_at = 0.0
    self._per_update = collections.deque(maxlen=_RECENT_CHUNKS)
    self._first_chunk = None   # its per-update time (it includes a trace)
    self._redone = 0           # updates rolled back in this process

  def startup(self, until: float) -> None:
    self.own.startup_s = max(0.0, until - self.start)

  def chunk(self, seconds: float, updates: int) -> None:
    self.own.stepping_s += seconds
    self.own.updates += updates
    if updates > 0:
      if self._first_chunk is None:
        self._first_chunk = seconds / updates
      else:
        self._per_update.append(seconds / updates)

  def add(self, category: str, seconds: float) -> None:
    setattr(self.own, category, getattr(self.own, category) + seconds)

  def input_wait(self, seconds: float) -> None:
    """Part of the stepping time was spent waiting for input."""
    seconds = min(seconds, self.own.stepping_s)
    self.own.stepping_s -= seconds
    self.own.input_wait_s += seconds

  def redone(self, updates: int) -> None:
    """`updates` are to be stepped again (a rollback); their time is the
    update time as known at each record."""
    self._redone += updates

  def update_s(self) -> float:
    """This process's update time: the median per-update time of its
    latest chunks but the first (a trace); the first's alone; 0 before."""
    if self._per_update:
      return statistics.median(self._per_update)
    return self._first_chunk or 0.0

  def totals(self, now: float, background_s: float) -> Totals:
    own = dataclasses.replace(self.own, wall_s=max(0.0, now - self.start),
                              checkpoint_background_s=background_s)
    return self.carried.plus(lose(own, self._redone, self.update_s()))

  def record(self, now: float, step: int, background_s: float,
             ended: str = RUNNING, force: bool = True) -> Totals:
    """The totals now; written to goodput.json by the chief (at most once
    per RECORD_EVERY_S unless `force`)."""
    self.step = step
    totals = self.totals(now, background_s)
    if self.is_chief and (force or now - self._written_at >= RECORD_EVERY_S):
      self._written_at = now
      write(self.model_dir, {
          "totals": dataclasses.asdict(totals), "goodput": goodput(totals),
          "last": {"pid": os.getpid(), "start": self.start,
                   "start_from": self.start_source, "record": now,
                   "step": step, "update_s": self.update_s(),
                   "ended": ended}})
    return totals
