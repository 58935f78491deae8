"""Parameter-server training: name workers that stop answering, bound the
wait when every worker is lost, and end the run when a ps stops answering.

A daemon thread probes each worker's and ps task's gRPC server once a
second (net.grpc_answers: the server itself must answer, so a stopped or
hung process counts as silent although its kernel still accepts
connections).

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
* A ps silent for 2/3 of --peer_timeout_s (what the coordinator's own
  keepalive gives a call to it, ps_strategy.grpc_options): one line naming
  it, then exit 4, as for a ps that is gone. This is the bound for
  functions that wait on a frozen ps inside a worker: the workers' channels
  to the ps keep gRPC's defaults (no keepalive: such a call would wait for
  ever) and the coordinator, whose join waits for those functions, never
  sees them fail. Before the ps has been silent that long, one line names
  it as soon as two probes missed.
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
  has answered for `timeout_s`, or one ps for 2/3 of it."""

  def __init__(self, addresses: list[str], timeout_s: float,
               log_every_s: float | None = None, ps: list[str] = ()):
    self._addresses = list(addresses)
    self._timeout_s = timeout_s
    self._log_every_s = log_every_s or max(1.0, min(10.0, timeout_s / 4))
    self._misses = [0] * len(self._addresses)
    self._ps = list(ps)
    self._ps_misses = [0] * len(self._ps)
    # When each ps's silence began (None: it answers).
    self._ps_silent_since = [None] * len(self._ps)
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

  def _probe_ps(self) -> None:
    """Probes every ps; ends the run when one has been silent for 2/3 of
    the timeout (the coordinator's keepalive bound)."""
    limit = self._timeout_s * 2 / 3
    for index, address in enumerate(self._ps):
      if _answers(address, _PROBE_S):
        if self._ps_misses[index] >= _SILENT_PROBES:
          logging.info("parameter_server: ps %d (%s) answers again.", index,
                       address)
        self._ps_misses[index], self._ps_silent_since[index] = 0, None
        continue
      now = time.monotonic()
      self._ps_misses[index] += 1
      if self._ps_silent_since[index] is None:
        # The probe itself waited _PROBE_S of the silence.
        self._ps_silent_since[index] = now - _PROBE_S
      if self._ps_misses[index] == _SILENT_PROBES:
        logging.warning(
            "parameter_server: ps %d (%s) does not answer (exited, stopped "
            "or hung); the run ends (exit 4) if it is still silent %.0f s "
            "after the first missed probe (2/3 of --peer_timeout_s=%g).",
            index, address, limit, self._timeout_s)
      waited = now - self._ps_silent_since[index]
      if waited >= limit:
        errors.request_stop(
            "trainer.main",
            f"parameter_server: ps {index} ({address}) has not answered for "
            f"{waited:.0f} s (2/3 of --peer_timeout_s={self._timeout_s:g}): "
            "the variables it holds are unreachable, so training stops; "
            "restart it and run the same command to resume from the last "
            "checkpoint (launch.local --max_restarts does both).",
            exitcodes.PEER_LOST)

  def _run(self) -> None:
    since, logged = None, 0.0
    while not self._stop.wait(_POLL_S):
      self._probe_ps()
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
    _started.append(WorkerWatch(tf_config["cluster"]["worker"], timeout_s,
                                ps=tf_config["cluster"]["ps"]).start())
