"""Print an sbatch script that runs the trainer as one multi-worker job over Slurm tasks.

  python -m launch.slurm --nodes=4 --time=02:00:00 -- --train_steps=1000 --model_dir=/scratch/r1 \\
      > job.sh && sbatch job.sh

Each Slurm task is one worker; the trainer's Slurm cluster resolver builds the cluster from the
SLURM_* variables srun sets, so no TF_CONFIG is written.

Restart policy: the script runs the step again (every worker, same allocation) after an exit
that a restart can fix, at most --max_restarts times, as launch.local --max_restarts does:
the workers resume from the last checkpoint. Codes in trainer/exitcodes.py NOT_RETRYABLE
(0 done, 2 usage, 74 disk full, 75 preempted) end the job with that code; any other (a hang,
142; a lost peer, 4; a cluster that did not form, 137; a bug, 1) restarts it. srun reports the
highest exit code of its tasks (128 + N for a task killed by signal N).
"""

import re
import shlex

from absl import app
from absl import flags

from launch import cli
from launch import codes

PORT_ENV = "TRAINER_SLURM_PORT_BASE"  # trainer.distribute.strategy passes it to SlurmClusterResolver
_TIME = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _has_flag(args, name):
  return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)


def trainer_command(trainer_args):
  """Returns the srun argv: the user's flags plus multi-worker/Slurm ones they did not give."""
  extra = [f"--{name}={value}" for name, value in
           (("strategy", "multiworker"), ("cluster_resolver", "slurm"))
           if not _has_flag(trainer_args, name)]
  return ["srun", "python", "-m", "trainer.main", *extra, *trainer_args]


def script(nodes, trainer_args, tasks_per_node=1, job_name="tf-train", time="01:00:00",
           partition=None, cpus_per_task=None, port=None, max_restarts=3):
  """Returns the sbatch script text."""
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={job_name}",
           f"#SBATCH --nodes={nodes}",
           f"#SBATCH --ntasks-per-node={tasks_per_node}",
           f"#SBATCH --time={time}"]
  if partition:
    lines.append(f"#SBATCH --partition={partition}")
  if cpus_per_task:
    lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
  lines += ["#SBATCH --output=%x-%j.out",
            "",
            "set -euo pipefail",
            "export PYTHONUNBUFFERED=1",
            # One dead worker leaves the others blocked in collectives: end the whole step.
            "export SLURM_KILL_BAD_EXIT=1"]
  if port is not None:
    lines.append(f"export {PORT_ENV}={port}")
  final = "|".join(str(c) for c in sorted(codes.NOT_RETRYABLE))
  lines += ["",
            "train() {",
            "  " + " ".join(shlex.quote(a) for a in trainer_command(trainer_args)),
            "}",
            "",
            f"# Restart policy: run the step again after a retryable exit, at most {max_restarts}",
            "# times (the workers resume from the last checkpoint); exits "
            f"{final.replace('|', ', ')} are final.",
            "restarts=0",
            "while true; do",
            "  code=0",
            "  train || code=$?",
            f'  case "$code" in {final}) exit "$code" ;; esac',
            f'  if [ "$restarts" -ge {max_restarts} ]; then exit "$code"; fi',
            "  restarts=$((restarts + 1))",
            f'  echo "launch.slurm: restart $restarts/{max_restarts} after exit $code" >&2',
            "done",
            ""]
  return "\n".join(lines)


def _define(fv):
  flags.DEFINE_integer("nodes", None, "Nodes to allocate.", flag_values=fv)
  flags.DEFINE_integer("tasks_per_node", 1, "Workers per node.", flag_values=fv)
  flags.DEFINE_string("job_name", "tf-train", "Slurm job name.", flag_values=fv)
  flags.DEFINE_string("time", "01:00:00", "Time limit, [D-]HH:MM:SS.", flag_values=fv)
  flags.DEFINE_string("partition", None, "Slurm partition (default: the cluster's).",
                      flag_values=fv)
  flags.DEFINE_integer("cpus_per_task", None, "CPUs per worker.", flag_values=fv)
  flags.DEFINE_integer("port", None, f"Base port for the workers (exported as {PORT_ENV}).",
                       flag_values=fv)
  flags.DEFINE_integer("max_restarts", 3, "Run the step again after a retryable exit (a hang, "
                       "a lost peer, a bug; not 0, 2, 74, 75) at most this many times.",
                       flag_values=fv)


def _main(argv):
  fv, trainer_args = cli.parse("launch.slurm", _define, argv)
  if fv.nodes is None:
    raise app.UsageError("--nodes is required (number of nodes, >= 1)")
  cli.check(fv.nodes >= 1, "nodes", fv.nodes, "must be >= 1")
  cli.check(fv.tasks_per_node >= 1, "tasks_per_node", fv.tasks_per_node, "must be >= 1")
  cli.check(bool(_TIME.match(fv.time)), "time", fv.time, "must look like [D-]HH:MM:SS")
  cli.check(bool(_NAME.match(fv.job_name)), "job_name", fv.job_name,
            "must use only letters, digits, '.', '_' and '-'")
  if fv.partition is not None:
    cli.check(bool(_NAME.match(fv.partition)), "partition", fv.partition,
              "must use only letters, digits, '.', '_' and '-'")
  if fv.cpus_per_task is not None:
    cli.check(fv.cpus_per_task >= 1, "cpus_per_task", fv.cpus_per_task, "must be >= 1")
  if fv.port is not None:
    cli.check(1024 <= fv.port <= 65535, "port", fv.port, "must lie in 1024..65535")
  cli.check(0 <= fv.max_restarts <= 1000, "max_restarts", fv.max_restarts,
            "must lie in 0..1000")
  print(script(fv.nodes, trainer_args, fv.tasks_per_node, fv.job_name, fv.time, fv.partition,
               fv.cpus_per_task, fv.port, fv.max_restarts), end="")
  return 0


if __name__ == "__main__":
  cli.main("launch.slurm", _main)
