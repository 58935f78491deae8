"""--strategy=parameter_server: connecting the coordinator to its cluster
(TF_CONFIG's worker and ps tasks) and making the strategy, with large
variables sharded over the ps tasks (MinSizePartitioner). How chunks are
scheduled on that strategy is trainer.executors.ps."""

import os
import time

from absl import logging
import tensorflow as tf

from trainer import compat
from trainer.distribute import cluster, net
from trainer.distribute.role import Role
from trainer.errors import UserError


class ClusterNotReady(tf.errors.UnavailableError):
  """Worker/ps servers did not answer within --peer_timeout_s at startup."""

  def __init__(self, message: str):
    super().__init__(None, None, message)


def wait_for_servers(tf_config: dict, timeout_s: float) -> None:
  """Waits until every worker and ps task accepts connections: connecting
  the strategy to a task that is not up blocks without a deadline."""
  servers = [(f"{job} {i}", address) for job in ("worker", "ps")
             for i, address in enumerate(tf_config["cluster"][job])]
  deadline = time.monotonic() + timeout_s
  silent = [s for s in servers if not net.answers(s[1])]
  if silent:
    logging.info("waiting up to --peer_timeout_s=%g for %s", timeout_s,
                 ", ".join(f"{n} ({a})" for n, a in silent))
  while silent:
    if time.monotonic() >= deadline:
      raise ClusterNotReady(
          f"no answer from {', '.join(f'{n} ({a})' for n, a in silent)} "
          f"within --peer_timeout_s={timeout_s:g}; start every worker and "
          "ps task (python -m launch.server) with the same TF_CONFIG "
          "cluster")
    time.sleep(0.5)
    silent = [s for s in silent if not net.answers(s[1])]


def grpc_options(peer_timeout_s: float, given: str = "") -> str:
  """TF_GRPC_DEFAULT_OPTIONS for the coordinator's channels, so that an RPC
  to a stopped or hung worker or ps (its kernel still holds the connection
  open) fails within `peer_timeout_s`: a keepalive ping every third of it,
  unanswered for another third, closes the connection (UnavailableError:
  ClusterCoordinator's worker-failure handling takes over), at most 2/3 of
  it after the freeze: before the hang watch (trainer.hang) would end the
  run, with --hang_timeout_s at its default. Reconnecting to
  such a peer gives up after at most 2 s instead of gRPC's 20 s, which every
  function the coordinator registers with every worker would otherwise pay.
  Options already in `given` (the user's) are kept as they are.

  >>> grpc_options(120)
  'grpc.keepalive_time_ms=40000,grpc.keepalive_timeout_ms=40000,grpc.http2.ping_timeout_ms=40000,grpc.min_reconnect_backoff_ms=2000'
  >>> grpc_options(1, "grpc.keepalive_time_ms=5")
  'grpc.keepalive_time_ms=5,grpc.keepalive_timeout_ms=1000,grpc.http2.ping_timeout_ms=1000,grpc.min_reconnect_backoff_ms=1000'
  """
  third = max(1000, int(peer_timeout_s * 1000 / 3))
  ours = {"grpc.keepalive_time_ms": third, "grpc.keepalive_timeout_ms": third,
          "grpc.http2.ping_timeout_ms": third,
          "grpc.min_reconnect_backoff_ms": min(2000, third)}
  options = [o for o in given.split(",") if o]
  names = {o.split("=", 1)[0] for o in options}
  options += [f"{k}={v}" for k, v in ours.items() if k not in names]
  return ",".join(options)


def build(settings):
  """ParameterServerStrategy from TF_CONFIG; returns (strategy, Role).
  `settings`: a trainer.distribute.strategy.Settings."""
  tf_config = cluster.env_tf_config(need_ps=True)
  if tf_config is None:
    raise UserError(
        "--strategy=parameter_server needs TF_CONFIG describing the chief, "
        "worker and ps tasks; start the cluster with python -m launch.local "
        "--workers=N --ps=M -- --strategy=parameter_server ...")
  task = tf_config["task"]
  if task["type"] != "chief":
    raise UserError(
        f"--strategy=parameter_server: trainer.main runs only as the "
        f"coordinator (TF_CONFIG task type 'chief'), not as "
        f"{task['type']!r}; run worker and ps tasks with python -m "
        "launch.server.")
  if settings.ps_shard_min_bytes <= 0:
    raise UserError(f"--ps_shard_min_bytes={settings.ps_shard_min_bytes} must "
                    "be positive.")
  # RPCs to a dead task fail at once instead of waiting for it to return:
  # the coordinator's worker-failure handling relies on it (see tf-traps).
  os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
  # Read once, when TF makes its first channel: below.
  os.environ["TF_GRPC_DEFAULT_OPTIONS"] = grpc_options(
      settings.peer_timeout_s, os.environ.get("TF_GRPC_DEFAULT_OPTIONS", ""))
  wait_for_servers(tf_config, settings.peer_timeout_s)
  num_ps = len(tf_config["cluster"]["ps"])
  resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
      min_shard_bytes=settings.ps_shard_min_bytes, max_shards=num_ps)
  strategy = tf.distribute.ParameterServerStrategy(
      resolver, variable_partitioner=partitioner)
  # Values made on the ps tasks; optimizer slots sharded like their tables.
  compat.make_variables_on_the_ps(strategy)
  # The coordinator is the one process that runs the loop, saves and writes.
  return strategy, Role(is_chief=True, worker_index=0, num_workers=1)
