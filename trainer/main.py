"""`python -m trainer.main`: flags -> Config -> train/evaluate -> JSON line.

Exit codes (the table is trainer/exitcodes.py): 0 done; 2 usage or
configuration error (one line on stderr); 3 non-finite loss/gradient
(--nonfinite=fail or too many rollbacks); 4 a peer worker or parameter server
was lost; 74 a checkpoint could not be written (disk full); 75 preempted
(SIGTERM/SIGINT) after saving a checkpoint: run the same command to resume;
1 anything else.
"""

import os

# TF's C++ INFO lines (oneDNN notices, ...) drown the progress lines; a user
# who wants them sets TF_CPP_MIN_LOG_LEVEL=0.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from trainer import cli  # noqa: E402
from trainer.distribute import cluster  # noqa: E402
from trainer import config as config_lib  # noqa: E402
from trainer import dirlock  # noqa: E402
from trainer import exitcodes  # noqa: E402
from trainer import goodput  # noqa: E402
from trainer import rundir  # noqa: E402
from trainer import saved_config  # noqa: E402
from trainer.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
config_lib.define_flags()

EXIT_USAGE = exitcodes.USAGE
EXIT_NONFINITE = exitcodes.NONFINITE
EXIT_PEER_LOST = exitcodes.PEER_LOST
EVAL_MODES = ("eval", "continuous_eval")


def checked_config(flag_values) -> config_lib.Config:
  """The Config, after every check that needs no TensorFlow: flag values and
  bounds, TF_CONFIG and its hosts, the run's config.json. Raises UserError;
  writes nothing. --mode=continuous_eval first waits (up to
  --eval_timeout_s) for config.json."""
  config = config_lib.from_flags(flag_values)
  if config.mode in EVAL_MODES:
    # Evaluation takes the run's own configuration from --model_dir; the
    # flags given on this command line override only what they name. An
    # evaluator started beside its trainer waits for it, never guesses it.
    if config.mode == "continuous_eval":
      rundir.wait_for_config(config.model_dir, config.eval_timeout_s)
    present = {name for name in flag_values if flag_values[name].present}
    config = saved_config.config_for(config.model_dir, config, present)
  config_lib.validate(config)
  if config.mode not in EVAL_MODES:
    rundir.check_resumable(config.model_dir)
  cluster.precheck(config.strategy, config.cluster_resolver,
                   config.peer_timeout_s)
  return config


def _import_tensorflow():
  """TensorFlow, imported only after the flags were checked: a flag mistake
  is reported in well under a second instead of after its import."""
  try:
    from trainer import tfimport
    return tfimport.import_tensorflow()
  except ImportError as e:
    raise UserError(f"TensorFlow is not installed ({e}): pip install "
                    "'tf-trainer[cpu]' (or 'tf-trainer[gpu]' on a GPU "
                    "host).") from None


def main() -> int:
  config = checked_config(FLAGS)
  # One training run per model_dir, held until the run ends.
  with dirlock.for_run(config.model_dir, config.mode, cluster.is_chief(
      config.strategy, config.cluster_resolver)):
    _import_tensorflow()
    from trainer import controller
    try:
      # The goodput account's start-up begins at this process's start.
      result = controller.run(config, started=goodput.process_start())
    except controller.Preempted as e:
      logging.warning("%s", e)
      print(controller.summary_line({"global_step": e.step,
                                     "preempted": True}), flush=True)
      return exitcodes.PREEMPTED
  print(controller.summary_line(result), flush=True)
  return exitcodes.OK


def run():
  cli.run("trainer.main", main)


if __name__ == "__main__":
  run()
