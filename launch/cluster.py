"""Pure cluster bookkeeping for local launches: free ports, cluster dicts, TF_CONFIG values."""

import socket

HOST = "127.0.0.1"


def free_ports(n):
  """Returns n distinct ports on HOST that were free a moment ago."""
  if n < 0:
    raise ValueError(f"free_ports: n={n} must be >= 0")
  socks = []
  try:
    # Keep every socket bound until all n are chosen, or the OS may hand out a port twice.
    for _ in range(n):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      socks.append(s)
      s.bind((HOST, 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def consecutive_ports(n, base):
  """Returns [base, base + 1, ..., base + n - 1], checked to lie in 1..65535."""
  if base < 1 or base + n - 1 > 65535:
    raise ValueError(f"port_base={base}: ports {base}..{base + n - 1} must lie in 1..65535")
  return list(range(base, base + n))


def ports_needed(workers, ps):
  """Number of tasks (= ports): the workers, plus the ps servers and one chief when ps > 0."""
  return workers + ps + (1 if ps > 0 else 0)


def make_cluster(workers, ps, ports):
  """Returns the cluster dict; ports are used in the order chief, workers, ps."""
  if workers < 1 or ps < 0:
    raise ValueError(f"make_cluster: workers={workers} must be >= 1 and ps={ps} >= 0")
  if len(ports) != ports_needed(workers, ps):
    raise ValueError(
      f"make_cluster: got {len(ports)} ports, need {ports_needed(workers, ps)}")
  addrs = [f"{HOST}:{p}" for p in ports]
  if ps == 0:
    # MultiWorkerMirroredStrategy has no chief job: worker 0 acts as the chief.
    return {"worker": addrs}
  return {"chief": addrs[:1], "worker": addrs[1:1 + workers], "ps": addrs[1 + workers:]}


def tasks(cluster):
  """Returns [(task_type, index), ...] for every task, servers (ps, worker) before the chief."""
  order = [t for t in ("ps", "worker", "chief") if t in cluster]
  return [(t, i) for t in order for i in range(len(cluster[t]))]


def tf_config(cluster, task_type, index):
  """Returns the TF_CONFIG value (a dict) for one task of the cluster."""
  if task_type not in cluster or not 0 <= index < len(cluster[task_type]):
    raise ValueError(f"tf_config: no task {task_type}:{index} in cluster {cluster}")
  return {"cluster": cluster, "task": {"type": task_type, "index": index}}


def task_name(task_type, index):
  """Returns the id that prefixes a task's output: 'worker 0', 'ps 1', 'chief'."""
  return "chief" if task_type == "chief" else f"{task_type} {index}"


def port_of(address):
  """Returns the port of a 'host:port' address."""
  return int(address.rsplit(":", 1)[1])
