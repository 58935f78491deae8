"""Exit-code conventions shared by the launchers and the trainer they start.

The codes themselves live in trainer/exitcodes.py (the one table); this
module re-exports what the launchers use and maps Popen return codes.
"""

from trainer.exitcodes import (  # noqa: F401  (re-exported)
    DISK_FULL, NOT_RETRYABLE, OK, PREEMPTED, TIMEOUT, USAGE)


def exit_status(returncode):
  """Maps a Popen returncode to a process exit status: -N (killed by signal N) -> 128 + N."""
  return 128 - returncode if returncode < 0 else returncode
