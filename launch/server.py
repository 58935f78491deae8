"""Run one TensorFlow gRPC server (a worker or ps task of TF_CONFIG) until SIGTERM/SIGINT.

  TF_CONFIG='{"cluster": {...}, "task": {"type": "worker", "index": 0}}' python -m launch.server

Exit status: 0 after SIGTERM/SIGINT; 2 for a bad TF_CONFIG (one line on stderr); 1 when the
server cannot start (e.g. its port is taken).
"""

import os
import signal
import sys
import threading

from launch import codes

SERVER_TYPES = ("worker", "ps")


def parse_tf_config(text):
  """Returns (cluster, task_type, index) from a TF_CONFIG string; ValueError says what is wrong.
  The checks are the trainer's own (trainer.distribute.cluster), plus: a server runs a worker or ps task."""
  from trainer.distribute import cluster as cluster_lib
  from trainer.errors import UserError
  try:
    config = cluster_lib.parse_tf_config(text)
  except UserError as e:
    raise ValueError(str(e)) from None
  if config is None:
    raise ValueError("TF_CONFIG is not set")
  task_type, index = config["task"]["type"], config["task"].get("index", 0)
  if task_type not in SERVER_TYPES:
    raise ValueError(f"TF_CONFIG task type is {task_type!r}; launch.server runs only "
                     f"{' or '.join(SERVER_TYPES)} tasks (the chief runs trainer.main)")
  return config["cluster"], task_type, index


def inter_op_threads(cluster):
  """Inter-op threads for a server: at least workers + 1, or ParameterServerStrategy can hang."""
  return max(len(cluster.get("worker", [])) + 1, os.cpu_count() or 1)


def _serve(cluster, task_type, index, stop):
  from trainer import tfimport  # pylint: disable=g-import-not-at-top  (after the env is set)
  tf = tfimport.import_tensorflow()

  config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=inter_op_threads(cluster))
  try:
    server = tf.distribute.Server(tf.train.ClusterSpec(cluster), job_name=task_type,
                                  task_index=index, protocol="grpc", config=config, start=True)
  except Exception as e:  # pylint: disable=broad-except  (e.g. the port is taken)
    print(f"launch.server: cannot start {task_type} {index}: {' '.join(str(e).split())}",
          file=sys.stderr, flush=True)
    return 1
  print(f"launch.server: {task_type} {index} serving at {cluster[task_type][index]}", flush=True)
  # join() blocks inside C++, where Python signal handlers never run: join in a daemon thread
  # and let the main thread wait for the stop signal.
  threading.Thread(target=server.join, daemon=True).start()
  while not stop.wait(1.0):
    pass
  return 0


def main():
  if len(sys.argv) > 1:
    print(f"launch.server: takes no flags (its task comes from TF_CONFIG); got "
          f"{' '.join(sys.argv[1:])}", file=sys.stderr)
    return codes.USAGE
  try:
    cluster, task_type, index = parse_tf_config(os.environ.get("TF_CONFIG"))
  except ValueError as e:
    print(f"launch.server: bad TF_CONFIG: {e}", file=sys.stderr)
    return codes.USAGE
  # Before TensorFlow loads (gRPC reads it once): the caller decides whether an RPC to a dead
  # peer fails fast, which ParameterServerStrategy's worker-failure handling relies on.
  os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  code = _serve(cluster, task_type, index, stop)
  if code == 0:
    print(f"launch.server: {task_type} {index} stopping", flush=True)
  sys.stdout.flush()
  sys.stderr.flush()
  # A TF server cannot be stopped, and interpreter shutdown with live gRPC threads can hang:
  # leave at once.
  os._exit(code)  # pylint: disable=protected-access


if __name__ == "__main__":
  sys.exit(main())
