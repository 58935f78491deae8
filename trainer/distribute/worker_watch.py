"""Parameter-server training: bound the wait when every worker is lost.

ClusterCoordinator tolerates lost workers by waiting for them to return,
without a deadline: with every worker gone, the coordinator waited forever,
said nothing, and (its join blocking the loop) could not even save on
SIGTERM. A daemon thread probes the workers' ports once a second; while none
answers it logs a "waiting for workers" line every few seconds, and after
--peer_timeout_s without any it ends the run with one line and exit 4. A
worker that comes back in time (launch.local --max_restarts restarts it on
the same port) resets the clock, and the coordinator picks it up itself.
"""

import threading
import time

from absl import logging

from trainer import errors
from trainer import exitcodes
from trainer.distribute import net

_POLL_S = 1.0


_answers = net.answers


class WorkerWatch:
  """Started once the coordinator trains; ends the process when no worker
  has answered for `timeout_s`."""

  def __init__(self, addresses: list[str], timeout_s: float,
               log_every_s: float | None = None):
    self._addresses = list(addresses)
    self._timeout_s = timeout_s
    self._log_every_s = log_every_s or max(1.0, min(10.0, timeout_s / 4))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name="worker-watch")

  def start(self) -> "WorkerWatch":
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()

  def _run(self) -> None:
    since, logged = None, 0.0
    while not self._stop.wait(_POLL_S):
      now = time.monotonic()
      if any(_answers(a) for a in self._addresses):
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
