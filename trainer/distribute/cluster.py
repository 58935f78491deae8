"""Cluster descriptions: TF_CONFIG validation (pure) and chief/worker roles.

Everything is checked before TensorFlow starts: TF's own handling of a bad
address is a traceback, a silent acceptance (port 99999) or a hang without
deadline inside the strategy constructor (an unresolvable host).
"""

import json
import os
import socket
import threading
import time

from absl import logging

from trainer.errors import UserError

_TASK_TYPES = ("chief", "worker", "ps", "evaluator")
# DNS names are at most 253 characters (RFC 1035); longer is not a host.
_MAX_HOST = 253
# How long this task's own host may take to resolve (retried): it is this
# machine, so only a freshly started pod's DNS record can lag.
_OWN_RESOLVE_S = 10.0


def _short(value) -> str:
  """repr(value), cut to fit one readable error line."""
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def split_address(address: str) -> tuple[str, int]:
  """'host:port' or '[v6]:port' -> (host, port); UserError if malformed.
  The message starts with the problem; callers prefix where it was found."""
  host, sep, port = address.rpartition(":")
  if not sep or not host:
    raise UserError(f"{address[:80]!r} is not 'host:port'")
  if host.startswith("[") and host.endswith("]"):
    host = host[1:-1]
  if len(host) > _MAX_HOST:
    raise UserError(f"its host is {len(host)} characters long (at most "
                    f"{_MAX_HOST})")
  if not host or any(c.isspace() or c in "/[]@" for c in host):
    raise UserError(f"{address[:80]!r} has no valid host")
  if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
    raise UserError(f"{address[:80]!r} has port {port[:20]!r}, not a number "
                    "in 1..65535")
  return host, int(port)


def _check_addresses(cluster: dict) -> None:
  seen = {}
  for job, addresses in cluster.items():
    for i, address in enumerate(addresses):
      try:
        key = split_address(address)
      except UserError as e:
        raise UserError(f"TF_CONFIG cluster[{job!r}][{i}]: {e}; give "
                        "'host:port' with a port in 1..65535.") from None
      if key in seen:
        raise UserError(f"TF_CONFIG lists {address!r} twice ({seen[key]} and "
                        f"{job} {i}); every task needs its own host:port.")
      seen[key] = f"{job} {i}"
  for job in ("chief", "evaluator"):
    if len(cluster.get(job, [])) > 1:
      raise UserError(f"TF_CONFIG cluster has {len(cluster[job])} {job!r} "
                      f"tasks; there can be at most one {job}.")


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
      raise UserError(f"TF_CONFIG cluster has unknown job {_short(job)}; jobs are "
                      f"{', '.join(_TASK_TYPES)}.")
    if not isinstance(addresses, list) or not all(
        isinstance(a, str) and ":" in a for a in addresses):
      raise UserError(f"TF_CONFIG cluster[{job!r}] must be a list of "
                      f"'host:port' strings (got {_short(addresses)}).")
  _check_addresses(cluster)
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
    raise UserError(f"TF_CONFIG task type {_short(task_type)} is unknown; use one "
                    f"of {', '.join(_TASK_TYPES)}.")
  if task_type != "evaluator":
    members = cluster.get(task_type, [])
    if not members:
      raise UserError(f"TF_CONFIG task is a {task_type!r} but the cluster has "
                      f"no {task_type!r} list; add it or fix the task type.")
    if not isinstance(index, int) or isinstance(index, bool) or \
        not 0 <= index < len(members):
      raise UserError(
          f"TF_CONFIG task index {_short(index)} is out of range for {task_type!r}, "
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


def precheck(strategy: str, resolver: str, timeout_s: float = 120.0) -> None:
  """Checks TF_CONFIG for `strategy` before TensorFlow is even imported, so
  a malformed cluster is reported in well under a second, and resolves
  every host (this task's own at once, peers within `timeout_s`)."""
  tf_config = None
  if strategy == "multiworker" and resolver == "tf_config":
    tf_config = env_tf_config()
    if tf_config is not None:
      check_multiworker(tf_config)
  elif strategy == "parameter_server":
    tf_config = env_tf_config(need_ps=True)
  if tf_config is not None:
    resolve_all(tf_config, timeout_s)


def _own(tf_config: dict) -> str | None:
  task = tf_config["task"]
  members = tf_config["cluster"].get(task["type"], [])
  index = task.get("index", 0)
  return members[index] if isinstance(index, int) and \
      0 <= index < len(members) else None


def _resolve(host: str, timeout_s: float):
  """getaddrinfo bounded in time (it can block for long on a bad resolver):
  the list of IPs, or the error text."""
  result = {}

  def lookup():
    try:
      result["ips"] = sorted({a[4][0] for a in socket.getaddrinfo(
          host, None, type=socket.SOCK_STREAM)})
    except (OSError, UnicodeError) as e:
      result["error"] = str(e) or type(e).__name__

  thread = threading.Thread(target=lookup, daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    return f"no answer from the resolver within {timeout_s:g} s"
  return result.get("ips") or result.get("error", "no address")


def _is_local(ips: list[str]) -> bool:
  """Does any of `ips` belong to this machine (can a socket bind to it)?"""
  for ip in ips:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
      with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
      return True
    except OSError:
      continue
  return False


def resolve_all(tf_config: dict, timeout_s: float) -> None:
  """Every host of the cluster must resolve; this task's own, at once and to
  an address of this machine. Peers get up to `timeout_s` (a Kubernetes
  peer's DNS name appears only when its pod is up), with a log line."""
  own = _own(tf_config)
  task = tf_config["task"]
  if own is not None:
    host = split_address(own)[0]
    # A pod's own DNS name can lag its start by a few seconds: retry briefly.
    give_up = time.monotonic() + min(_OWN_RESOLVE_S, timeout_s)
    ips = _resolve(host, min(_OWN_RESOLVE_S, timeout_s))
    while isinstance(ips, str) and time.monotonic() < give_up:
      time.sleep(0.5)
      ips = _resolve(host, max(0.5, give_up - time.monotonic()))
    if isinstance(ips, str):
      raise UserError(f"TF_CONFIG: this task's own address {own[:120]!r} "
                      f"({task['type']} {task.get('index', 0)}) does not "
                      f"resolve ({ips[:120]}); fix the host name.")
    if not _is_local(ips):
      raise UserError(f"TF_CONFIG: this task's own address {own[:120]!r} "
                      f"({task['type']} {task.get('index', 0)}) resolves to "
                      f"{', '.join(ips)[:120]}, which is not an address of "
                      "this machine; check the task type and index.")
  hosts = {}
  for job, addresses in tf_config["cluster"].items():
    for i, address in enumerate(addresses):
      if address != own:
        hosts.setdefault(split_address(address)[0], f"{job} {i}")
  deadline = time.monotonic() + timeout_s
  pending, why, logged = dict(hosts), {}, False
  while pending:
    for host in list(pending):
      left = max(0.5, min(_OWN_RESOLVE_S, deadline - time.monotonic()))
      answer = _resolve(host, left)
      if isinstance(answer, str):
        why[host] = answer
      else:
        del pending[host]
    if not pending:
      return
    if time.monotonic() >= deadline:
      host, who = next(iter(pending.items()))
      raise UserError(f"TF_CONFIG: {who}'s host {host[:120]!r} did not "
                      f"resolve within --peer_timeout_s={timeout_s:g} "
                      f"({why[host][:120]}); fix the address or raise "
                      "--peer_timeout_s.")
    if not logged:
      logging.warning("waiting up to --peer_timeout_s=%g for the host names "
                      "of %s to resolve.", timeout_s,
                      ", ".join(f"{w} ({h[:60]})" for h, w in pending.items()))
      logged = True
    time.sleep(1.0)


def is_chief(strategy: str, resolver: str) -> bool:
  """Is this process the one that writes --model_dir (decided from the
  environment alone, before TensorFlow)? Run after precheck."""
  if strategy == "multiworker":
    if resolver == "slurm":
      return os.environ.get("SLURM_PROCID", "0").strip() == "0"
    tf_config = env_tf_config()
    if tf_config is None:
      return True
    task = tf_config["task"]
    if "chief" in tf_config["cluster"]:
      return task["type"] == "chief"
    return task["type"] == "worker" and task.get("index", 0) == 0
  return True   # one process, or the parameter-server coordinator
