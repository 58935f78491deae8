"""Records SIGINT/SIGTERM sent to the launcher, so its supervision loop can forward them."""

import contextlib
import signal
import threading

FORWARDED = (signal.SIGINT, signal.SIGTERM)


class Received:
  """The signals received while installed(), in order; handlers only record (they run anywhere)."""

  def __init__(self):
    self.signals = []

  def _record(self, signum, frame):
    del frame
    self.signals.append(signum)

  @property
  def first(self):
    return self.signals[0] if self.signals else None

  def count(self):
    return len(self.signals)

  @contextlib.contextmanager
  def installed(self):
    """Installs the recording handlers (main thread only: Python allows no other) and restores."""
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    old = {s: signal.signal(s, self._record) for s in FORWARDED}
    try:
      yield self
    finally:
      for s, handler in old.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)
