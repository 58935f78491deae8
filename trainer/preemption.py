"""Preemption signals: SIGTERM/SIGINT become a flag the loop checks between
chunks; once one has arrived, further signals cannot change the outcome.

Why the second signal must be absorbed: the run saves at the end of the
chunk and then exits 75. Restoring the default handlers when training ends
(before the exit) let a second SIGTERM 50 ms after the first kill the
process with 143 after the save, which a scheduler reads as a crash. So
after the first signal further signals are logged and ignored while the
chunk and the save finish, and ignored (SIG_IGN) from the end of training
until the process exits; SIGKILL still ends it.
"""

import signal
import threading

from absl import logging

from trainer import exitcodes

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
  """Turns SIGTERM/SIGINT into `raised`, checked by the loop between chunks."""

  def __init__(self):
    self.raised = False
    self._previous = {}

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in _SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.raised:
      logging.warning("signal %d again: already saving for preemption; "
                      "ignored (exit code %d follows the save).", signum,
                      exitcodes.PREEMPTED)
      return
    logging.warning("signal %d: saving a checkpoint at the end of this chunk, "
                    "then exiting with code %d.", signum, exitcodes.PREEMPTED)
    self.raised = True

  def uninstall(self):
    """Restores the previous handlers, unless a signal already arrived: then
    SIGTERM/SIGINT stay ignored until the process exits with 75 (see the
    module doc). In-process callers that go on after catching Preempted
    call restore_handlers()."""
    if self.raised:
      # SIG_IGN, not this Python handler: interpreter shutdown resets Python
      # handlers to SIG_DFL before TF's teardown ends, and a signal in that
      # window killed the saved run with 143 (seen). Ignored ones stay so.
      for sig in self._previous:
        signal.signal(sig, signal.SIG_IGN)
      return
    self.restore_handlers()

  def restore_handlers(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
