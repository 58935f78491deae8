"""`python -m trainer.main`: flags -> Config -> train/evaluate -> JSON line.

Exit codes (the table is trainer/exitcodes.py): 0 done; 2 usage or
configuration error (one line on stderr); 3 non-finite loss/gradient
(--nonfinite=fail or too many rollbacks); 4 a peer worker or parameter server
was lost; 74 a checkpoint could not be written (disk full); 75 preempted
(SIGTERM/SIGINT) after saving a checkpoint: run the same command to resume;
1 anything else.
"""

import os
import sys

# TF's C++ INFO lines (oneDNN notices, ...) drown the progress lines; a user
# who wants them sets TF_CPP_MIN_LOG_LEVEL=0.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from trainer.distribute import cluster  # noqa: E402
from trainer import config as config_lib  # noqa: E402
from trainer import dirlock  # noqa: E402
from trainer import errors  # noqa: E402
from trainer import exitcodes  # noqa: E402
from trainer import rundir  # noqa: E402
from trainer.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
config_lib.define_flags()

EXIT_USAGE = exitcodes.USAGE
EXIT_NONFINITE = exitcodes.NONFINITE
EXIT_PEER_LOST = exitcodes.PEER_LOST
EVAL_MODES = ("eval", "continuous_eval")


def _fail(code: int, message: str, lock=None):
  if lock is not None:
    lock.release()
  errors.fail("trainer.main", message, code, hard=code == EXIT_PEER_LOST)


# Lines of a TF error message that say what went wrong, in order of interest.
_CAUSES = ("unhealthy", "heartbeat", "reset by peer", "socket closed",
           "connection refused", "failed to connect", "deadline", "timed out",
           "unavailable", "cancelled", "aborted")


def _cause(message: str) -> str:
  """The informative line of a TF error (its first line is often just
  'Graph execution error:')."""
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  for key in _CAUSES:
    for line in lines:
      if key in line.lower() and not line.startswith("File "):
        return line[:300]
  return lines[0][:300] if lines else "no details"


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(EXIT_USAGE, f"{e}. See --helpfull.")


def checked_config(flag_values) -> config_lib.Config:
  """The Config, after every check that needs no TensorFlow: flag values and
  bounds, TF_CONFIG and its hosts. Raises UserError; writes nothing."""
  config = config_lib.from_flags(flag_values)
  if config.mode in EVAL_MODES:
    # Evaluation takes the run's own configuration from --model_dir; the
    # flags given on this command line override only what they name.
    present = {name for name in flag_values if flag_values[name].present}
    config = rundir.config_for(config.model_dir, config, present)
  config_lib.validate(config)
  cluster.precheck(config.strategy, config.cluster_resolver,
                   config.peer_timeout_s)
  return config


def main(argv):
  if len(argv) > 1:
    _fail(EXIT_USAGE, f"unexpected arguments {argv[1:]}; flags look like "
          "--name=value.")
  try:
    config = checked_config(FLAGS)
    # One training run per model_dir, held until this process ends.
    lock = dirlock.for_run(config.model_dir, config.mode, cluster.is_chief(
        config.strategy, config.cluster_resolver))
    lock.acquire()
  except UserError as e:
    _fail(EXIT_USAGE, str(e))
  # Imported after validation: flag mistakes are reported in well under a
  # second instead of after TensorFlow's multi-second import.
  try:
    from trainer import tfimport
    tf = tfimport.import_tensorflow()
    from trainer import checkpoint
    from trainer import controller
  except ImportError as e:
    _fail(EXIT_USAGE, f"TensorFlow is not installed ({e}): pip install "
          "'tf-trainer[cpu]' (or 'tf-trainer[gpu]' on a GPU host).", lock)
  except BaseException:
    lock.release()
    raise
  try:
    result = controller.run(config)
  except UserError as e:
    _fail(EXIT_USAGE, str(e), lock)
  except controller.Preempted as e:
    logging.warning("%s", e)
    print(controller.summary_line({"global_step": e.step, "preempted": True}),
          flush=True)
    lock.release()
    sys.exit(exitcodes.PREEMPTED)
  except controller.NonFiniteError as e:
    _fail(EXIT_NONFINITE, str(e), lock)
  except checkpoint.DiskFull as e:
    _fail(exitcodes.DISK_FULL, str(e), lock)
  except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
          tf.errors.CancelledError, tf.errors.AbortedError) as e:
    # os._exit: collective ops of a dead cluster can block interpreter exit.
    _fail(EXIT_PEER_LOST, f"lost contact with a peer task ({type(e).__name__}: "
          f"{_cause(str(e))}); relaunch all tasks to resume from the last "
          "checkpoint.", lock)
  except BaseException:
    lock.release()
    raise
  lock.release()
  print(controller.summary_line(result), flush=True)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
