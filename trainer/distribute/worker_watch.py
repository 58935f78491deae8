"""Parameter-server training: name workers that stop answering, and bound
the wait when every worker is lost.

A daemon thread probes each worker's gRPC server once a second
(net.grpc_answers: the server itself must answer, so a stopped or hung
process counts as silent although its kernel still accepts connections).

* One worker silent: one line naming it. The coordinator's own RPCs to it
  fail within --peer_timeout_s (gRPC keepalive pings, ps_strategy.grpc_options),
  ClusterCoordinator then re-runs its functions on the other workers and
  takes the worker back once it answers again (another line says so).
* Every worker silent: ClusterCoordinator would wait for one to return
  without a deadline, saying nothing (its join blocking the loop, it could
  not even save on SIGTERM). The thread logs "waiting for workers" every few
  seconds and, after --peer_timeout_s without any, ends the run with one
  line and exit 4. A worker that comes back in time (launch.local
  --max_restarts restarts it on the same port) resets the clock.
"""

import threading
import time

from absl import logging

from trainer import errors
from trainer import exitcodes
from trainer.distribute import net

_POLL_S = 1.0
_PROBE_S = 1.0
# Silent probes in a row before a worker is named (a loaded machine may
# miss one).
_SILENT_PROBES = 2


_answers = net.grpc_answers


class WorkerWatch:
  """Started once the coordinator trains; ends the process when no worker
  has answered for `timeout_s`."""

  def __init__(self, addresses: list[str], timeout_s: float,
               log_every_s: float | None = None):
    self._addresses = list(addresses)
    self._timeout_s = timeout_s
    self._log_every_s = log_every_s or max(1.0, min(10.0, timeout_s / 4))
    self._misses = [0] * len(self._addresses)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name="worker-watch")

  def start(self) -> "WorkerWatch":
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()

  def _probe(self) -> bool:
    """Probes every worker, logs who stops or starts answering; returns
    whether any answers."""
    for index, address in enumerate(self._addresses):
      if _answers(address, _PROBE_S):
        if self._misses[index] >= _SILENT_PROBES:
          logging.info("parameter_server: worker %d (%s) answers again; the "
                       "coordinator takes it back.", index, address)
        self._misses[index] = 0
        continue
      self._misses[index] += 1
      if self._misses[index] == _SILENT_PROBES:
        logging.warning(
            "parameter_server: worker %d (%s) does not answer (exited, "
            "stopped or hung); its functions go to the other workers within "
            "--peer_timeout_s=%g.", index, address, self._timeout_s)
    return any(m == 0 for m in self._misses)

  def _run(self) -> None:
    since, logged = None, 0.0
    while not self._stop.wait(_POLL_S):
      any_answers = self._probe()
      now = time.monotonic()
      if any_answers:
        if since is not None:
          logging.info("parameter_server: a worker answers again.")
        since = None
        continue
      if since is None:
        since, logged = now, now
      waited = now - since
      if waited >= self._timeout_s:
        errors.request_stop(
            "trainer.main",
            f"parameter_server: no worker has answered for {waited:.0f} s "
            f"(--peer_timeout_s={self._timeout_s:g}; workers "
            f"{', '.join(self._addresses)[:200]}); restart the workers "
            "(python -m launch.server) and run the same command to resume "
            "from the last checkpoint.", exitcodes.PEER_LOST)
      if now - logged >= self._log_every_s:
        logged = now
        logging.warning("parameter_server: waiting for workers: none of %d "
                        "answers since %.0f s (giving up after "
                        "--peer_timeout_s=%g).", len(self._addresses), waited,
                        self._timeout_s)


_started = []


def watch(tf_config: dict, timeout_s: float) -> None:
  """Starts the one watch of this process (a second call does nothing)."""
  if not _started:
    _started.append(WorkerWatch(tf_config["cluster"]["worker"],
                                timeout_s).start())
