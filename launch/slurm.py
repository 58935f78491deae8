"""Print an sbatch script that runs the trainer as one multi-worker job over Slurm tasks.

  python -m launch.slurm --nodes=4 --time=02:00:00 -- --train_steps=1000 --model_dir=/scratch/r1 \\
      > job.sh && sbatch job.sh

Each Slurm task is one worker; the trainer's Slurm cluster resolver builds the cluster from the
SLURM_* variables srun sets, so no TF_CONFIG is written.
"""

import re
import shlex

from absl import app
from absl import flags

from launch import cli

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
           partition=None, cpus_per_task=None, port=None):
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
  lines += ["", " ".join(shlex.quote(a) for a in trainer_command(trainer_args)), ""]
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
  print(script(fv.nodes, trainer_args, fv.tasks_per_node, fv.job_name, fv.time, fv.partition,
               fv.cpus_per_task, fv.port), end="")
  return 0


if __name__ == "__main__":
  cli.main("launch.slurm", _main)
