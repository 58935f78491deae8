"""Exit-code conventions shared by the launchers and the trainer they start."""

OK = 0
USAGE = 2  # bad flags or config: one line on stderr; retrying cannot help
PREEMPTED = 75  # EX_TEMPFAIL: the trainer was preempted and saved; resubmit, don't restart
TIMEOUT = 124  # launch.local --timeout_s ran out (same code as coreutils `timeout`)

# Codes a restart cannot fix: a config error repeats, a preemption must be rescheduled.
NOT_RETRYABLE = frozenset({OK, USAGE, PREEMPTED})


def exit_status(returncode):
  """Maps a Popen returncode to a process exit status: -N (killed by signal N) -> 128 + N."""
  return 128 - returncode if returncode < 0 else returncode
