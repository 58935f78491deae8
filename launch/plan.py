"""Pure: which processes one local launch starts (argv, environment, core) for given ports."""

import json
import os
import typing

from launch import cluster as cluster_lib

# The directory holding the `launch` package, so children can `-m launch.server` from any cwd.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Task(typing.NamedTuple):
  """One process of the group: 'worker 0' runs argv with env, pinned to cpu (None: not pinned)."""
  name: str
  task_type: str
  index: int
  argv: tuple
  env: dict
  cpu: typing.Optional[int]
  port: int
  trainer: bool  # runs the trainer (its exit code matters) rather than a TF server


def child_env(base, tf_config):
  """Returns base plus TF_CONFIG, PYTHONUNBUFFERED=1 and the project root on PYTHONPATH."""
  env = dict(base)
  env["TF_CONFIG"] = json.dumps(tf_config)
  env["PYTHONUNBUFFERED"] = "1"  # lines reach the prefixing reader as they are printed
  path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  if PROJECT_ROOT not in path:
    env["PYTHONPATH"] = os.pathsep.join([PROJECT_ROOT] + path)
  return env


def make_tasks(workers, ps, ports, trainer_cmd, server_cmd, trainer_args, base_env,
               cpus=None):
  """Returns the Tasks, servers first: the chief (ps mode) must start once servers listen."""
  cluster = cluster_lib.make_cluster(workers, ps, ports)
  tasks = []
  for task_type, index in cluster_lib.tasks(cluster):
    trainer = ps == 0 or task_type == "chief"
    argv = tuple(trainer_cmd) + tuple(trainer_args) if trainer else tuple(server_cmd)
    # cpus: the cores to pin workers to, worker i on cpus[i mod len]; None: no pinning.
    # Only workers are pinned (benchmarks: 1 vs N workers, one core each); others float.
    cpu = cpus[index % len(cpus)] if cpus and task_type == "worker" else None
    address = cluster[task_type][index]
    tasks.append(Task(
        name=cluster_lib.task_name(task_type, index), task_type=task_type, index=index,
        argv=argv, env=child_env(base_env, cluster_lib.tf_config(cluster, task_type, index)),
        cpu=cpu, port=cluster_lib.port_of(address), trainer=trainer))
  return tasks
