"""Shared by the orchestrator and the worker processes (no TensorFlow import
at module level: the orchestrator stays light)."""

import json
import os
import statistics
import threading

RESULT_TAG = "BENCH_RESULT "
WARMUP_INTERVALS = 2          # tracing + warm-up, dropped from every run

# Shapes of the benchmark models (what the framework gets through
# --dataset=synthetic --synthetic_shape=...).
SHAPES = {"cnn": (28, 28, 1), "resnet20": (32, 32, 3), "mlp": (28, 28, 1)}
NUM_CLASSES = 10


def emit(result: dict) -> None:
  """The last stdout line of a worker: its result as JSON."""
  print(RESULT_TAG + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict | None:
  for line in reversed(stdout.splitlines()):
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG):])
  return None


def steady(rates: list[float]) -> list[float]:
  """The intervals after warm-up."""
  return list(rates[WARMUP_INTERVALS:])


def median(values):
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def quiet_env(extra: dict | None = None) -> dict:
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.pop("TF_CONFIG", None)
  env.update(extra or {})
  return env


def status_kb(field: str, pid="self") -> int:
  """A field of /proc/PID/status in kB (VmHWM: the peak RSS)."""
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


class TreePeaks:
  """Peak RSS of every process below `root` (a pid), by its role: the
  task type and index of its TF_CONFIG ("worker 0", "ps 1", "chief 0"),
  else its command. A thread reads each descendant's VmHWM (the kernel's
  high-water mark, so a peak between two reads is not missed) every
  `every` seconds until stop(); what a process adds in its last interval
  before it exits is. Linux only."""

  def __init__(self, root: int, every: float = 0.2):
    self._root, self._every = root, every
    self.peak_mb: dict[str, float] = {}
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._thread.start()

  def stop(self) -> dict:
    self._done.set()
    self._thread.join(timeout=10)
    return dict(sorted(self.peak_mb.items()))

  def _watch(self) -> None:
    roles = {}
    while not self._done.wait(self._every):
      for pid in self._descendants():
        try:
          role = roles.get(pid) or roles.setdefault(pid, _role(pid))
          mb = status_kb("VmHWM", pid) / 1024
        except (OSError, KeyError, ValueError):
          continue            # exited meanwhile
        self.peak_mb[role] = max(mb, self.peak_mb.get(role, 0.0))

  def _descendants(self) -> list[int]:
    children = {}
    for name in os.listdir("/proc"):
      if name.isdigit():
        try:
          with open(f"/proc/{name}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
          continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [self._root]
    while todo:
      for child in children.get(todo.pop(), ()):
        found.append(child)
        todo.append(child)
    return found


def _role(pid: int) -> str:
  with open(f"/proc/{pid}/environ", "rb") as f:
    env = dict(item.split(b"=", 1) for item in f.read().split(b"\0")
               if b"=" in item)
  if b"TF_CONFIG" in env:
    task = json.loads(env[b"TF_CONFIG"]).get("task", {})
    if task:
      return f"{task.get('type')} {task.get('index', 0)}"
  with open(f"/proc/{pid}/cmdline", "rb") as f:
    return " ".join(a.decode(errors="replace")
                    for a in f.read().split(b"\0")[:3] if a)
