"""The one table of exit codes: trainer.main exits with them, launch/ reads them.

Pure Python, no imports: the launchers and the watchdog use it without
TensorFlow. README's "Exit codes" table lists the same rows.
"""

OK = 0
BUG = 1             # anything else: there is a traceback
USAGE = 2           # bad flags, TF_CONFIG, data or model_dir: one stderr line; nothing written
NONFINITE = 3       # non-finite loss/gradient with --nonfinite=fail or after --max_rollbacks
PEER_LOST = 4       # a peer (worker, ps) was lost or never came; relaunch to resume
DISK_FULL = 74      # EX_IOERR: a checkpoint could not be written (no space / quota); free space first
PREEMPTED = 75      # EX_TEMPFAIL: SIGTERM/SIGINT, checkpoint saved; run the same command again
TIMEOUT = 124       # launch.local --timeout_s ran out (same code as coreutils `timeout`)
WATCHDOG = 137      # 128 + SIGKILL: the multiworker start-up watchdog ended a cluster that never formed
HANG = 142          # 128 + SIGALRM: no training progress within --hang_timeout_s (trainer/hang.py);
                    # >= 128, so a Kubeflow restartPolicy ExitCode retries it too

# Codes a restart cannot fix: a config error repeats, a full disk stays full,
# a preemption must be rescheduled, not restarted.
NOT_RETRYABLE = frozenset({OK, USAGE, DISK_FULL, PREEMPTED})

MEANINGS = {
    OK: "done",
    BUG: "a bug (traceback)",
    USAGE: "usage or configuration error",
    NONFINITE: "non-finite loss or gradient",
    PEER_LOST: "a peer task was lost",
    DISK_FULL: "a checkpoint could not be written (disk full)",
    PREEMPTED: "preempted, checkpoint saved",
    TIMEOUT: "launcher time limit",
    WATCHDOG: "cluster did not form (start-up watchdog)",
    HANG: "a training step hung (no progress within the hang bound)",
}
