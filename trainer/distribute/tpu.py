"""--strategy=tpu: TPUStrategy for --tpu=local (a TPU VM), a Cloud TPU name,
or grpc://HOST:PORT; the same step and loop as every other strategy (the
step already has static shapes: drop_remainder batches, padded evaluation).

Without a TPU the run fails within seconds, never hangs: cheap checks come
before TPUClusterResolver, which for a name asks the GCE metadata server and
the Cloud TPU API (a request that can hang off Google Cloud):
  --tpu=local        some /dev/accel* or /dev/vfio/N device must exist;
  --tpu=grpc://H:P   H:P must accept a TCP connection within 2 s;
  --tpu=NAME         the GCE metadata server that the resolver would ask
                     (metadata.google.internal, or $GCE_METADATA_HOST /
                     $GCE_METADATA_IP) must resolve and accept a TCP
                     connection within 2 s; nothing is requested from it.
Every failure to find or reach a TPU is a UserError: one line on stderr,
exit code 2 (a configuration problem: relaunching the same command cannot
help, so launchers do not restart it).
"""

import glob
import os
import threading

from absl import logging
import tensorflow as tf

from trainer.distribute import net
from trainer.errors import UserError, first_line

_PROBE_TIMEOUT_S = 2.0
_RESOLVE_TIMEOUT_S = 60.0
_EXPECTS = ("--tpu expects 'local' on a TPU VM, the name of a Cloud TPU "
            "reachable from this Google Cloud VM, or grpc://HOST:PORT")


def _device_files() -> list[str]:
  return sorted(glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*"))


def _reachable(host: str, port: int, timeout_s: float = _PROBE_TIMEOUT_S):
  """A TCP connect (name lookup included) within timeout_s."""
  try:
    return _with_timeout(lambda: net.answers(f"{host}:{port}", timeout_s),
                         timeout_s, f"connecting to {host}:{port}")
  except UserError:
    return False


def _metadata_server() -> tuple[str, int]:
  """Where TPUClusterResolver's client looks for the GCE metadata server."""
  endpoint = (os.environ.get("GCE_METADATA_HOST") or
              os.environ.get("GCE_METADATA_IP", "metadata.google.internal"))
  host, _, port = endpoint.rpartition(":")
  if host and port.isdigit():
    return host, int(port)
  return endpoint, 80


def _grpc_address(tpu: str) -> tuple[str, int] | None:
  if not tpu.startswith("grpc://"):
    return None
  host, _, port = tpu[len("grpc://"):].rpartition(":")
  try:
    return host.strip("[]"), int(port)
  except ValueError:
    raise UserError(f"--tpu={tpu!r} is not grpc://HOST:PORT; "
                    f"{_EXPECTS}.") from None


def check_reachable(tpu: str) -> None:
  """Raises UserError within seconds when no TPU can be behind --tpu."""
  if not tpu:
    raise UserError(f"--strategy=tpu needs --tpu; {_EXPECTS}.")
  if tpu == "local":
    if not _device_files():
      raise UserError("no TPU found: --tpu=local but this host has no TPU "
                      f"device (/dev/accel*, /dev/vfio/N); {_EXPECTS}.")
    return
  address = _grpc_address(tpu)
  if address is not None:
    if not _reachable(*address):
      raise UserError(f"no TPU found: nothing answers at --tpu={tpu} within "
                      f"{_PROBE_TIMEOUT_S:.0f} s; {_EXPECTS}.")
    return
  host, port = _metadata_server()
  if not _reachable(host, port):
    raise UserError(
        f"no TPU found: --tpu={tpu} names a Cloud TPU, but the GCE metadata "
        f"server ({host}) is not reachable within {_PROBE_TIMEOUT_S:.0f} s "
        f"(this is not a Google Cloud VM); {_EXPECTS}.")


def _with_timeout(fn, timeout_s: float, what: str):
  """fn() in a daemon thread: a hung network call becomes a UserError."""
  box = {}

  def target():
    try:
      box["value"] = fn()
    except Exception as e:  # noqa: BLE001 - handed to the caller
      box["error"] = e

  thread = threading.Thread(target=target, name=what, daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    raise UserError(f"no TPU found: {what} did not finish within "
                    f"{timeout_s:.0f} s; {_EXPECTS}.")
  if "error" in box:
    raise box["error"]
  return box["value"]


def build_strategy(settings):
  """TPUClusterResolver -> connect -> initialize -> TPUStrategy (`settings`:
  a trainer.distribute.strategy.Settings; --tpu is read)."""
  tpu = settings.tpu.strip()
  check_reachable(tpu)
  try:
    resolver = _with_timeout(
        lambda: tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu),
        _RESOLVE_TIMEOUT_S, f"resolving --tpu={tpu}")
    if tpu != "local":
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except UserError:
    raise
  except (ValueError, RuntimeError, OSError, tf.errors.OpError) as e:
    raise UserError(f"no TPU found: --tpu={tpu} could not be used "
                    f"({type(e).__name__}: {first_line(e, 200)}); "
                    f"{_EXPECTS}.") from None
  strategy = tf.distribute.TPUStrategy(resolver)
  logging.info("TPUStrategy on --tpu=%s: %d replicas", tpu,
               strategy.num_replicas_in_sync)
  return strategy
