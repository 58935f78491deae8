"""Bounded waiting for, and stopping of, a set of children (SIGTERM, grace period, SIGKILL)."""

import signal
import time

POLL_S = 0.05


def wait_all(children, timeout_s, interrupted=lambda: False):
  """Polls until every child has exited (True), timeout_s passes or interrupted() (False)."""
  deadline = time.monotonic() + timeout_s
  while True:
    if all(c.poll() is not None for c in children):
      return True
    if time.monotonic() >= deadline or interrupted():
      return False
    time.sleep(POLL_S)


def stop_all(children, grace_s, sig=signal.SIGTERM, interrupted=lambda: False):
  """Sends sig to every running child; SIGKILLs whoever is left after grace_s (or interrupted())."""
  children = [c for c in children if c.proc is not None]
  for c in children:
    c.send(sig)
  if not wait_all(children, grace_s, interrupted):
    for c in children:
      c.send(signal.SIGKILL)
    wait_all(children, 10.0)
  for c in children:
    c.join_output()
