"""Serialized, flushed launcher output: child lines (prefixed) on stdout, its own notes on stderr."""

import sys
import threading

_LOCK = threading.Lock()  # whole lines from many reader threads, never interleaved


def _write(stream, line):
  with _LOCK:
    try:
      stream.write(line + "\n")
      stream.flush()
    except (OSError, ValueError):
      pass  # stream closed (e.g. `| head`): keep going so children never block on a full pipe


def emit(line):
  """Writes one child output line to stdout (looked up per call: tests swap sys.stdout)."""
  _write(sys.stdout, line)


def log(message, prog="launch.local"):
  """Writes one launcher message to stderr as 'launch.local: message'."""
  _write(sys.stderr, f"{prog}: {message}")
