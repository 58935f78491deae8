"""Strategy settings -> a tf.distribute strategy for the synchronous kinds
(default, mirrored, multiworker), and the per-process role it implies.
Which kind a run uses is decided once, by trainer.build's table."""

import dataclasses
import os
import subprocess
import sys

from absl import logging
import tensorflow as tf

from trainer import compat, dirlock
from trainer.distribute import cluster
from trainer.distribute.role import Role
from trainer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Settings:
  """What making a strategy needs (field names are the flags')."""
  cpu_replicas: int = 0
  deterministic: bool = False
  cluster_resolver: str = "tf_config"
  collective: str = "auto"
  peer_timeout_s: float = 120.0
  tpu: str = ""
  ps_shard_min_bytes: int = 256 << 10


def configure_devices(settings: Settings) -> None:
  """Splits the CPU into logical devices; must run before TF uses devices."""
  if settings.cpu_replicas > 1 and not tf.config.list_physical_devices("GPU"):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * settings.cpu_replicas)
  compat.set_op_determinism(bool(settings.deterministic))


def _local_devices(settings: Settings) -> list[str] | None:
  gpus = tf.config.list_logical_devices("GPU")
  if gpus:
    return [d.name for d in gpus]
  if settings.cpu_replicas > 1:
    return [d.name for d in tf.config.list_logical_devices("CPU")]
  return None


def _communication_options(settings: Settings):
  implementation = {
      "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
      "ring": tf.distribute.experimental.CommunicationImplementation.RING,
      "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
  }[settings.collective]
  # The timeout bounds every collective, so a dead peer turns into an error
  # on the survivors instead of a hang.
  return tf.distribute.experimental.CommunicationOptions(
      implementation=implementation, timeout_seconds=settings.peer_timeout_s)


def _multiworker(settings: Settings):
  if settings.cluster_resolver == "slurm":
    resolver = slurm_resolver()
  else:
    tf_config = cluster.env_tf_config()
    if tf_config is None:
      logging.warning("--strategy=multiworker without TF_CONFIG: running as a "
                      "one-worker cluster.")
    else:
      cluster.check_multiworker(tf_config)
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  with _StartupDeadline(settings.peer_timeout_s, _peers(resolver)):
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver,
        communication_options=_communication_options(settings))


def _peers(resolver) -> list[tuple[str, str]]:
  """[(name, 'host:port')] of the other chief/worker tasks."""
  spec = resolver.cluster_spec().as_dict()
  me = (resolver.task_type, resolver.task_id or 0)
  return [(f"{job} {i}", address)
          for job in ("chief", "worker") for i, address in
          enumerate(spec.get(job, [])) if (job, i) != me]


# The watchdog of _StartupDeadline, a separate tiny process (no TensorFlow):
# argv = parent pid, seconds, peers as NAME=HOST:PORT, then "--" and what to
# remove for the killed parent (its model_dir lock file, then the directories
# the lock created: empty ones only). A byte or EOF on stdin (the cluster
# formed, or the parent is gone) ends it quietly.
_WATCHDOG = r"""
import os, select, signal, sys
from trainer.distribute.net import answers   # socket only: no TensorFlow
args = sys.argv[1:]
cleanup = args[args.index("--") + 1:] if "--" in args else []
args = args[:args.index("--")] if "--" in args else args
parent, seconds, peers = int(args[0]), float(args[1]), args[2:]
if select.select([sys.stdin], [], [], seconds)[0]:
  sys.exit(0)
silent = [f"{p.split('=', 1)[0]} ({p.split('=', 1)[1]})" for p in peers
          if not answers(p.split("=", 1)[1])]
why = (f"no answer from {', '.join(silent)}" if silent else
       "every peer answers, but not all of them joined")
sys.stderr.write(
    f"trainer.main: error: the cluster did not form within "
    f"--peer_timeout_s={seconds:g}: {why}; start every task of the cluster "
    "(same cluster, own task index) or raise --peer_timeout_s.\n")
sys.stderr.flush()
os.kill(parent, signal.SIGKILL)
for i, path in enumerate(cleanup):
  try:
    if i == 0:
      with open(path) as f:
        if f'"pid": {parent},' in f.read():
          os.remove(path)
    else:
      os.rmdir(path)
  except OSError:
    pass
"""


class _StartupDeadline:
  """Bounds forming the cluster by --peer_timeout_s.

  Creating MultiWorkerMirroredStrategy waits for every task to register with
  the coordination service. On the leader (worker 0) that wait
  (CoordinationServiceAgent::WaitForAllTasks) has no deadline when a peer
  never starts, holds the GIL (so no Python thread or signal handler runs)
  and swallows SIGTERM. So a watchdog process ends it: after the deadline it
  says which peers do not answer on one stderr line and SIGKILLs this process.
  """

  def __init__(self, seconds: float, peers: list[tuple[str, str]]):
    self._seconds = seconds
    self._peers = peers
    self._watchdog = None

  def __enter__(self):
    if self._peers:
      self._watchdog = subprocess.Popen(
          [sys.executable, "-c", _WATCHDOG, str(os.getpid()),
           str(self._seconds), *(f"{n}={a}" for n, a in self._peers),
           "--", *dirlock.held_paths()],
          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    return self

  def __exit__(self, *exc):
    if self._watchdog is not None:
      try:
        self._watchdog.stdin.close()
        self._watchdog.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._watchdog.kill()
        self._watchdog.wait()


_SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NODELIST",
               "SLURM_STEP_TASKS_PER_NODE")


def slurm_resolver():
  """SlurmClusterResolver for one task per worker, from Slurm's environment
  (the variables srun sets: SLURM_PROCID, SLURM_NTASKS, SLURM_STEP_NODELIST,
  SLURM_STEP_TASKS_PER_NODE; ports from TRAINER_SLURM_PORT_BASE, default
  8888, plus the task's slot on its node)."""
  missing = [v for v in _SLURM_VARS if not os.environ.get(v)]
  if missing:
    raise UserError(f"--cluster_resolver=slurm but {', '.join(missing)} "
                    "is not set: run under srun (see launch.slurm).")
  try:
    ntasks = int(os.environ["SLURM_NTASKS"])
    port_base = int(os.environ.get("TRAINER_SLURM_PORT_BASE", "8888"))
    # gpus_per_node must be given: otherwise the resolver shells out to
    # nvidia-smi to count GPUs.
    gpus = len(tf.config.list_physical_devices("GPU"))
    if gpus:
      resolver = compat.SlurmResolver(
          False, jobs={"worker": ntasks}, port_base=port_base,
          gpus_per_node=gpus, gpus_per_task=1, auto_set_gpu=True)
    else:
      resolver = compat.SlurmResolver(
          True, jobs={"worker": ntasks}, port_base=port_base,
          gpus_per_node=ntasks, gpus_per_task=1, auto_set_gpu=False)
    resolver.cluster_spec()   # resolves task_type/task_id; checks the lists
  except (ValueError, RuntimeError) as e:
    raise UserError(f"--cluster_resolver=slurm: Slurm's environment does not "
                    f"describe a cluster ({e}).") from None
  if resolver.task_type is None:
    raise UserError(f"--cluster_resolver=slurm: SLURM_PROCID="
                    f"{os.environ['SLURM_PROCID']} is not a task of the "
                    f"{ntasks} in SLURM_NTASKS.")
  return resolver


def default(settings: Settings):
  del settings
  return tf.distribute.get_strategy(), Role(True, 0, 1)


def mirrored(settings: Settings):
  devices = _local_devices(settings)
  # ReductionToOneDevice for CPU replicas: the NCCL default needs GPUs.
  ops = None if tf.config.list_logical_devices("GPU") else \
      tf.distribute.ReductionToOneDevice()
  return tf.distribute.MirroredStrategy(devices, cross_device_ops=ops), \
      Role(True, 0, 1)


def multiworker(settings: Settings):
  strategy = _multiworker(settings)
  resolver = strategy.cluster_resolver
  spec = resolver.cluster_spec().as_dict()
  num_workers = len(spec.get("worker", [])) + len(spec.get("chief", [])) or 1
  index = resolver.task_id or 0
  if resolver.task_type == "chief":
    index = 0
  elif "chief" in spec:
    index += 1
  return strategy, Role(strategy.extended.should_checkpoint, index,
                        num_workers)
