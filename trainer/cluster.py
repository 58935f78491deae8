"""Cluster descriptions: TF_CONFIG validation (pure) and chief/worker roles."""

import json
import os

from trainer.errors import UserError

_TASK_TYPES = ("chief", "worker", "ps", "evaluator")


def parse_tf_config(text: str | None, need_ps: bool = False) -> dict | None:
  """Validates a TF_CONFIG string; returns it parsed, or None when unset.

  Catches what TF itself reports late or as a hang: malformed JSON, no worker
  list, an unknown task type, a task index out of range.
  """
  if text is None or not text.strip():
    return None
  try:
    tf_config = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"TF_CONFIG is not valid JSON ({e.msg} at char {e.pos}); "
                    'set it to {"cluster": {"worker": ["host:port", ...]}, '
                    '"task": {"type": "worker", "index": 0}}.') from None
  if not isinstance(tf_config, dict):
    raise UserError("TF_CONFIG must be a JSON object with 'cluster' and "
                    "'task' keys.")
  cluster = tf_config.get("cluster")
  if not isinstance(cluster, dict) or not cluster:
    raise UserError("TF_CONFIG has no 'cluster' object; it needs at least "
                    '"cluster": {"worker": ["host:port", ...]}.')
  for job, addresses in cluster.items():
    if job not in _TASK_TYPES:
      raise UserError(f"TF_CONFIG cluster has unknown job {job!r}; jobs are "
                      f"{', '.join(_TASK_TYPES)}.")
    if not isinstance(addresses, list) or not all(
        isinstance(a, str) and ":" in a for a in addresses):
      raise UserError(f"TF_CONFIG cluster[{job!r}] must be a list of "
                      f"'host:port' strings (got {addresses!r}).")
  if not cluster.get("worker"):
    raise UserError("TF_CONFIG cluster has no 'worker' list; list the worker "
                    'addresses: "worker": ["host:port", ...].')
  if need_ps and not cluster.get("ps"):
    raise UserError("--strategy=parameter_server needs 'ps' tasks in "
                    "TF_CONFIG's cluster (start them with launch.local --ps=M).")
  task = tf_config.get("task")
  if not isinstance(task, dict) or "type" not in task:
    raise UserError("TF_CONFIG has no 'task' with a 'type'; add "
                    '"task": {"type": "worker", "index": N}.')
  task_type, index = task.get("type"), task.get("index", 0)
  if task_type not in _TASK_TYPES:
    raise UserError(f"TF_CONFIG task type {task_type!r} is unknown; use one "
                    f"of {', '.join(_TASK_TYPES)}.")
  if task_type != "evaluator":
    members = cluster.get(task_type, [])
    if not members:
      raise UserError(f"TF_CONFIG task is a {task_type!r} but the cluster has "
                      f"no {task_type!r} list; add it or fix the task type.")
    if not isinstance(index, int) or isinstance(index, bool) or \
        not 0 <= index < len(members):
      raise UserError(
          f"TF_CONFIG task index {index!r} is out of range for {task_type!r}, "
          f"which has {len(members)} task(s) (valid: 0..{len(members) - 1}).")
  return tf_config


def env_tf_config(need_ps: bool = False) -> dict | None:
  return parse_tf_config(os.environ.get("TF_CONFIG"), need_ps=need_ps)


def check_multiworker(tf_config: dict) -> None:
  """What parse_tf_config accepts but MultiWorkerMirroredStrategy does not."""
  task_type = tf_config["task"]["type"]
  if task_type not in ("chief", "worker"):
    raise UserError(f"TF_CONFIG task type {task_type!r} does not train under "
                    "--strategy=multiworker; its tasks are 'worker' (and an "
                    "optional 'chief').")
  if tf_config["cluster"].get("ps"):
    raise UserError("TF_CONFIG lists 'ps' tasks: use "
                    "--strategy=parameter_server for them, or drop them for "
                    "--strategy=multiworker.")


def precheck(strategy: str, resolver: str) -> None:
  """Checks TF_CONFIG for `strategy` before TensorFlow is even imported, so
  a malformed cluster is reported in well under a second."""
  if strategy == "multiworker" and resolver == "tf_config":
    tf_config = env_tf_config()
    if tf_config is not None:
      check_multiworker(tf_config)
  elif strategy == "parameter_server":
    env_tf_config(need_ps=True)
