"""One attempt at running a local group: start it, watch it, decide how it ended, stop it."""

import dataclasses
import signal
import time
import typing

from launch import codes
from launch.child import Child
from launch.cluster import HOST
from launch.group import POLL_S, stop_all
from launch.output import log
from trainer.distribute import net


class Restarts:
  """The restart budget shared by every attempt of one launch (group and in-place restarts)."""

  def __init__(self, limit):
    self.limit = limit
    self.used = 0

  def take(self, who, returncode):
    """Spends one restart (logged) if any is left; returns whether it did."""
    if self.used >= self.limit:
      return False
    self.used += 1
    log(f"restart {self.used}/{self.limit} after {who} exited with {returncode}")
    return True


@dataclasses.dataclass
class Context:
  """What every attempt of one launch shares."""
  received: typing.Any  # launch.signals.Received
  restarts: Restarts
  grace_s: float = 10.0
  start_timeout_s: float = 60.0
  deadline: typing.Optional[float] = None  # time.monotonic() value; None: no time limit
  timeout_s: typing.Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How an attempt ended: a Popen-style returncode, whose exit decided it, may we retry."""
  returncode: int
  who: typing.Optional[str] = None
  retry: bool = False
  summary: typing.Optional[str] = None  # the chief's last JSON line, if it printed one


def _with_summary(outcome, chief):
  """The outcome with the chief's JSON summary line (read once its output is drained)."""
  chief.join_output()
  return dataclasses.replace(outcome, summary=chief.summary)


def _failed(child, returncode):
  return Outcome(returncode, child.name, retry=returncode not in codes.NOT_RETRYABLE)


def _stop(ctx, children, sig=signal.SIGTERM):
  # A further signal to the launcher cuts the grace period short.
  seen = ctx.received.count()
  stop_all(children, ctx.grace_s, sig, interrupted=lambda: ctx.received.count() > seen)


def _interrupted(ctx, children, trainers):
  """Handles a signal to the launcher or the time limit; returns the Outcome, or None if neither."""
  sig = ctx.received.first
  if sig is not None:
    log(f"got {signal.Signals(sig).name}; forwarding it to the trainers, then "
        "to any servers")
    # Trainers first, servers after they exit: a parameter-server
    # coordinator needs its ps tasks alive to save its checkpoint.
    _stop(ctx, trainers, sig)
    _stop(ctx, [c for c in children if c not in trainers], sig)
    # Trainers that saved on the forwarded signal and exited 'preempted' say so to our caller.
    preempted = any(t.returncode == codes.PREEMPTED for t in trainers)
    return Outcome(codes.PREEMPTED if preempted else -sig)
  if ctx.deadline is not None and time.monotonic() >= ctx.deadline:
    log(f"time limit of {ctx.timeout_s}s reached; stopping all children")
    _stop(ctx, children)
    return Outcome(codes.TIMEOUT)
  return None


def run_multiworker(tasks, ctx):
  """All tasks are trainers: done when all exit 0; the first non-zero exit ends the attempt."""
  children = [Child(t) for t in tasks]
  try:
    outcome = _watch_multiworker(children, ctx)
  finally:
    _stop(ctx, children)
  # Worker 0 is the chief of a cluster without a 'chief' task.
  return _with_summary(outcome, next(c for c in children if c.task.index == 0))


def _watch_multiworker(children, ctx):
  for c in children:
    c.start()
  while True:
    outcome = _interrupted(ctx, children, children)
    if outcome:
      return outcome
    for c in children:
      returncode = c.poll()
      if returncode not in (None, 0):
        return _failed(c, returncode)
    if all(c.returncode == 0 for c in children):
      return Outcome(0)
    time.sleep(POLL_S)


def _listening(port):
  return net.answers(f"{HOST}:{port}", timeout_s=0.5)


def _wait_listening(servers, ctx):
  """Waits until every server accepts connections, so the coordinator finds a whole cluster."""
  if ctx.start_timeout_s <= 0:
    return None
  deadline = time.monotonic() + ctx.start_timeout_s
  pending = list(servers)
  while pending:
    outcome = _interrupted(ctx, servers, [])
    if outcome:
      return outcome
    for c in list(pending):
      returncode = c.poll()
      if returncode is not None:
        log(f"{c.name} exited with {returncode} before listening on port {c.task.port}")
        return _failed(c, returncode or 1)
      if _listening(c.task.port):
        pending.remove(c)
    if pending and time.monotonic() >= deadline:
      names = ", ".join(c.name for c in pending)
      log(f"{names} not listening after --start_timeout_s={ctx.start_timeout_s}")
      return Outcome(1, pending[0].name, retry=True)
    time.sleep(0.1)
  return None


def run_parameter_server(tasks, ctx):
  """Servers first, then the chief; the chief's exit ends the attempt; worker servers restart
  in place, a lost ps does not (its variables are gone: the group restarts after the chief)."""
  servers = [Child(t) for t in tasks if not t.trainer]
  chief = Child(next(t for t in tasks if t.trainer))
  try:
    outcome = _watch_parameter_server(servers, chief, ctx)
  finally:
    _stop(ctx, servers + [chief])
  return _with_summary(outcome, chief)


def _watch_parameter_server(servers, chief, ctx):
  given_up = set()
  for c in servers:
    c.start()
  outcome = _wait_listening(servers, ctx)
  if outcome:
    return outcome
  chief.start()
  while True:
    outcome = _interrupted(ctx, servers + [chief], [chief])
    if outcome:
      return outcome
    returncode = chief.poll()
    if returncode is not None:
      return _failed(chief, returncode) if returncode else Outcome(0)
    for i, c in enumerate(servers):
      returncode = c.poll()
      if returncode is None or c.name in given_up:
        continue
      if c.task.task_type == "ps":
        # Its variables are gone: a new empty ps on its port would not bring them back. The
        # chief exits 4 with one line once it notices; that exit restarts the whole group
        # from the last checkpoint: one restart for one ps loss, not two.
        given_up.add(c.name)
        log(f"{c.name} exited with {returncode}; the variables it held are lost: not "
            "restarted alone (the chief stops, then the whole group restarts if allowed)")
        continue
      if ctx.restarts.take(c.name, returncode):
        # Same TF_CONFIG, same port: ParameterServerStrategy reconnects to it.
        servers[i] = Child(c.task).start()
      else:
        # Not fatal by itself: the coordinator may finish on the remaining workers.
        given_up.add(c.name)
        log(f"{c.name} exited with {returncode}; not restarted (the chief decides)")
    time.sleep(POLL_S)
