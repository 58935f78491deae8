"""Config -> tf.distribute strategy, and the per-process role it implies."""

import dataclasses
import os

from absl import logging
import tensorflow as tf

from trainer import cluster
from trainer.config import Config
from trainer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Role:
  """What this process does in the cluster."""
  is_chief: bool        # writes checkpoints, summaries and config.json
  worker_index: int     # 0 for single-process strategies
  num_workers: int


def configure_devices(config: Config) -> None:
  """Splits the CPU into logical devices; must run before TF uses devices."""
  if config.cpu_replicas > 1 and not tf.config.list_physical_devices("GPU"):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * config.cpu_replicas)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()


def _local_devices(config: Config) -> list[str] | None:
  gpus = tf.config.list_logical_devices("GPU")
  if gpus:
    return [d.name for d in gpus]
  if config.cpu_replicas > 1:
    return [d.name for d in tf.config.list_logical_devices("CPU")]
  return None


def _communication_options(config: Config):
  implementation = {
      "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
      "ring": tf.distribute.experimental.CommunicationImplementation.RING,
      "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
  }[config.collective]
  # The timeout bounds every collective, so a dead peer turns into an error
  # on the survivors instead of a hang.
  return tf.distribute.experimental.CommunicationOptions(
      implementation=implementation, timeout_seconds=config.peer_timeout_s)


def _multiworker(config: Config):
  if config.cluster_resolver == "slurm":
    resolver = slurm_resolver()
  else:
    tf_config = cluster.env_tf_config()
    if tf_config is None:
      logging.warning("--strategy=multiworker without TF_CONFIG: running as a "
                      "one-worker cluster.")
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  return tf.distribute.MultiWorkerMirroredStrategy(
      cluster_resolver=resolver,
      communication_options=_communication_options(config))


def slurm_resolver():
  """SlurmClusterResolver for one task per worker, from Slurm's environment."""
  missing = [v for v in ("SLURM_PROCID", "SLURM_NTASKS") if v not in os.environ]
  if missing:
    raise UserError(f"--cluster_resolver=slurm but {', '.join(missing)} "
                    "is not set: run under srun (see launch.slurm).")
  ntasks = int(os.environ["SLURM_NTASKS"])
  # gpus_per_node=0 on CPU hosts: otherwise the resolver shells out to
  # nvidia-smi to count GPUs.
  gpus = len(tf.config.list_physical_devices("GPU"))
  return tf.distribute.cluster_resolver.SlurmClusterResolver(
      jobs={"worker": ntasks}, port_base=int(os.environ.get(
          "TRAINER_SLURM_PORT_BASE", "8888")),
      gpus_per_node=gpus, gpus_per_task=1 if gpus else 0,
      auto_set_gpu=bool(gpus))


def build(config: Config):
  """Returns (strategy, role) for the configured strategy."""
  name = config.strategy
  if name == "default":
    return tf.distribute.get_strategy(), Role(True, 0, 1)
  if name == "mirrored":
    devices = _local_devices(config)
    # ReductionToOneDevice for CPU replicas: the NCCL default needs GPUs.
    ops = None if tf.config.list_logical_devices("GPU") else \
        tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=ops), \
        Role(True, 0, 1)
  if name == "multiworker":
    strategy = _multiworker(config)
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
  if name == "parameter_server":
    from trainer import ps  # only this strategy needs it
    return ps.build_strategy(config)
  if name == "tpu":
    from trainer import tpu
    return tpu.build_strategy(config), Role(True, 0, 1)
  raise UserError(f"--strategy={name!r} is not supported.")
