"""The one exception type that means "the user gave us something wrong",
and the one way the command-line entry points report an error and exit."""

import os
import sys


class UserError(Exception):
  """A problem the user can fix: bad flag values, missing files, a model_dir
  holding a different model. `trainer.main` prints str(error) as ONE line on
  stderr and exits 2; the message must name the problem and the fix."""


def first_line(error, limit: int = 300) -> str:
  """The first line of an exception's message (or its type's name), cut
  to `limit` characters: what a one-line error message quotes of a cause."""
  text = str(error).strip().splitlines()
  return text[0][:limit] if text else type(error).__name__


def fail(program: str, message: str, code: int = 2, hard: bool = False):
  """Writes `program: error: message` as one stderr line and exits `code`.
  hard: os._exit, skipping interpreter teardown (which can block on a TF
  runtime still waiting for a lost peer)."""
  # One line whatever the message quotes (a flag value may hold a newline).
  message = message.replace("\r", "\\r").replace("\n", "\\n")
  sys.stderr.write(f"{program}: error: {message}\n")
  sys.stderr.flush()
  if hard:
    os._exit(code)
  sys.exit(code)


# The process's runner (trainer.cli) says how a watchdog's stop request
# ends the run; without one, the request fails hard itself.
_stop_handler = None


def set_stop_handler(handler) -> None:
  """handler(program, message, code): ends the process; the runner's."""
  global _stop_handler
  _stop_handler = handler


def request_stop(program: str, message: str, code: int) -> None:
  """A watchdog thread asks the runner to end the run now: the main thread
  may be blocked inside TensorFlow, so the runner exits without unwinding
  it (os._exit), after releasing what the run holds."""
  if _stop_handler is not None:
    _stop_handler(program, message, code)
  fail(program, message, code, hard=True)
