"""One supervised child process: its own session, output prefixed by its id, killed as a group."""

import atexit
import ctypes
import json
import os
import signal
import subprocess
import threading

from launch.output import emit

_LINE_LIMIT = 1 << 16  # a child printing a huge line without newline is split, not buffered
_LIVE = set()  # started and not yet reaped; killed at interpreter exit
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # the running process: libc (prctl) is in it


class Child:
  """A child process started in a new session, so signals and kills reach its whole group."""

  def __init__(self, task):
    self.task = task  # a launch.plan.Task
    self.name = task.name
    self.proc = None
    self.returncode = None
    self._reader = None
    self.summary = None  # the last JSON-object line it printed (trainer.main's summary)

  @property
  def pid(self):
    return self.proc.pid

  def start(self):
    parent = os.getpid()
    cpu = self.task.cpu

    def preexec():
      # Runs in the forked child before exec: only async-signal-safe-ish syscalls here.
      # PDEATHSIG kills the child if the launcher dies without cleaning up (even by SIGKILL).
      # It fires when the *thread* that started the child ends: start from the supervising one.
      _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
      if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)
      if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    self.proc = subprocess.Popen(
        list(self.task.argv), env=self.task.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec)
    _LIVE.add(self)
    self._reader = threading.Thread(target=self._pump, name=f"out-{self.name}", daemon=True)
    self._reader.start()
    return self

  def _pump(self):
    prefix = f"[{self.name}] "
    stream = self.proc.stdout
    for raw in iter(lambda: stream.readline(_LINE_LIMIT), b""):
      line = raw.decode("utf-8", "replace").rstrip("\r\n")
      if _is_json_object(line):
        self.summary = line
      emit(prefix + line)
    stream.close()

  def poll(self):
    """Returns the exit code once the child has exited (and kills what it left behind), else None."""
    if self.returncode is not None:
      return self.returncode
    try:
      # WNOWAIT: look without reaping, so the group id cannot be reused before killpg below.
      info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
      info = True  # already reaped elsewhere; Popen.poll knows the code
    if info is None:
      return None
    self._signal_group(signal.SIGKILL)  # grandchildren of a dead child must not outlive it
    self.returncode = self.proc.wait(timeout=5)
    _LIVE.discard(self)
    return self.returncode

  def send(self, sig):
    """Sends sig to the child's process group if the child is still running."""
    if self.poll() is None:
      self._signal_group(sig)

  def _signal_group(self, sig):
    try:
      os.killpg(self.proc.pid, sig)
    except (ProcessLookupError, PermissionError):
      pass

  def join_output(self, timeout_s=2.0):
    """Waits (bounded) until the child's last output line has been written."""
    if self._reader is not None:
      self._reader.join(timeout_s)


def _is_json_object(line):
  if not line.startswith("{"):
    return False
  try:
    return isinstance(json.loads(line), dict)
  except ValueError:
    return False


@atexit.register
def _kill_leftovers():
  # Last line of defence: an exception or sys.exit in the launcher must not orphan children.
  for child in list(_LIVE):
    child._signal_group(signal.SIGKILL)
    try:
      child.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      pass
