"""The one way a trainer command-line tool runs and ends: parse its absl
flags, call its body, and turn what comes out into an exit code from
trainer/exitcodes.py. Only `run` ends the process; bodies return a code or
raise.

  >>> exit_code(UserError("--model_dir is required."))
  (2, '--model_dir is required.', False)
  >>> exit_code(KeyError("a bug")) is None   # a traceback is its report
  True
"""

import sys
from typing import Callable

from absl import app
from absl import flags

from trainer import dirlock
from trainer import errors
from trainer import exitcodes
from trainer import precision
from trainer.errors import UserError

# Lines of a TF error message that say what went wrong, in order of interest.
_CAUSES = ("unhealthy", "heartbeat", "reset by peer", "socket closed",
           "connection refused", "failed to connect", "deadline", "timed out",
           "unavailable", "cancelled", "aborted")
# TensorFlow's errors that mean a peer task is gone (by class name: this
# module must not import TensorFlow, which flag errors are reported before).
_PEER_ERRORS = ("UnavailableError", "DeadlineExceededError", "CancelledError",
                "AbortedError")


def cause(message: str) -> str:
  """The informative line of a TF error (its first line is often just
  'Graph execution error:')."""
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  for key in _CAUSES:
    for line in lines:
      if key in line.lower() and not line.startswith("File "):
        return line[:300]
  return lines[0][:300] if lines else "no details"


def _own_words(message: str) -> str:
  """A UserError raised while a step was traced comes back from AutoGraph
  with the traced frames before it ("in user code: ... UserError: ..."):
  its own message is what follows the last 'UserError: '."""
  marker = "UserError: "
  if "in user code:" in message and marker in message:
    message = message.rsplit(marker, 1)[1]
  return " ".join(message.split())


def _is_peer_error(error: BaseException) -> bool:
  tf_errors = sys.modules.get("tensorflow.python.framework.errors_impl")
  if tf_errors is None:
    return False
  return any(isinstance(error, getattr(tf_errors, name))
             for name in _PEER_ERRORS)


def _mixed_precision_hint(error: BaseException) -> str | None:
  """precision.dtype_hint for a TypeError (raised at tracing) or an
  InvalidArgumentError (eager) under the Keras policy in force."""
  tf_errors = sys.modules.get("tensorflow.python.framework.errors_impl")
  eager = tf_errors is not None and isinstance(
      error, tf_errors.InvalidArgumentError)
  keras = sys.modules.get("keras")
  if keras is None or not (isinstance(error, TypeError) or eager):
    return None
  return precision.dtype_hint(str(error), keras.config.dtype_policy().name)


def exit_code(error: BaseException) -> tuple[int, str, bool] | None:
  """(exit code, one-line message, hard) for an error a tool reports
  without a traceback, or None (a bug: the traceback is the report).
  An exception may carry its own `exit_code` (NonFiniteError, DiskFull);
  hard: the process must end with os._exit (a dead cluster's collectives
  can block the interpreter's teardown)."""
  if isinstance(error, UserError):
    return exitcodes.USAGE, _own_words(str(error)), False
  code = getattr(error, "exit_code", None)
  if isinstance(code, int):
    return code, str(error), False
  hint = _mixed_precision_hint(error)
  if hint is not None:
    return exitcodes.USAGE, hint, False
  if _is_peer_error(error):
    return (exitcodes.PEER_LOST,
            f"lost contact with a peer task ({type(error).__name__}: "
            f"{cause(str(error))}); relaunch all tasks to resume from the "
            "last checkpoint.", True)
  return None


# absl's help flags print and exit 1; asked-for help is a success here.
_HELP_FLAGS = {"help", "helpshort", "helpfull", "helpxml", "?"}


def parse(program: str, argv: list[str]) -> list[str]:
  """absl's FLAGS(argv); a flag error is one line and exit 2; --help,
  --helpshort, --helpfull, --helpxml exit 0."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    errors.fail(program, f"{e}. See --helpfull.")
  except SystemExit as e:
    asked = {a.lstrip("-").split("=", 1)[0] for a in argv[1:]
             if a.startswith("-")}
    if e.code == 1 and asked & _HELP_FLAGS:
      sys.exit(exitcodes.OK)
    raise


def run(program: str, body: Callable[[], int | None],
        define: Callable[[], None] | None = None) -> None:
  """Defines the flags (`define`), parses sys.argv, runs `body()` and exits
  with its code (None: 0) or the code of what it raised."""
  if define is not None:
    define()

  def stop(program_name, message, code):
    # A watchdog's request: the main thread may be blocked in TensorFlow,
    # so the locks it holds are released here before the hard exit.
    dirlock.release_all()
    errors.fail(program_name, message, code, hard=True)
  errors.set_stop_handler(stop)

  def main(argv):
    if len(argv) > 1:
      errors.fail(program, f"unexpected arguments {argv[1:]}; flags look "
                  "like --name=value.")
    try:
      code = body()
    except Exception as e:   # noqa: BLE001 - mapped or re-raised
      known = exit_code(e)
      if known is None:
        raise
      code, message, hard = known
      errors.fail(program, message, code, hard=hard)
    sys.exit(code or exitcodes.OK)

  app.run(main, flags_parser=lambda argv: parse(program, argv))
