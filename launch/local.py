"""Run N trainer workers (+ M parameter servers and a chief) on localhost, each with its TF_CONFIG.

  python -m launch.local --workers=2 -- --strategy=multiworker --train_steps=100
  python -m launch.local --workers=2 --ps=1 -- --strategy=parameter_server --train_steps=100

Every child line is printed with its name as prefix ('[worker 1] ...'); the chief's (worker 0's,
or the ps-mode chief's) last JSON line, trainer.main's summary, is printed once more, unprefixed,
as the launcher's last stdout line: `python -m launch.local ... | tail -1` is the run's result.

Exit status: 0 when every trainer process exited 0; otherwise the first non-zero exit code of
a trainer (128 + N for one killed by signal N); 75 when a trainer was preempted (never
restarted); 2 for bad flags; 124 when --timeout_s ran out; 128 + N when the launcher itself got
signal N (SIGINT/SIGTERM, forwarded to all children) and no trainer reported 75.
"""

import os
import sys
import time

from absl import app
from absl import flags

from launch import attempt
from launch import cli
from launch import cluster
from launch import codes
from launch import plan
from launch import signals
from launch.output import emit, log

RESTART_PAUSE_S = 0.5  # let the killed group release its ports and files before the next one


def run(workers, ps=0, trainer_args=(), max_restarts=0, port_base=None, env=None,
        timeout_s=None, command=None, *, server_command=None, pin_cores=False, grace_s=10.0,
        start_timeout_s=60.0):
  """Runs the group until it is done; returns the launcher's exit status (see module doc).

  Args:
    workers: trainer processes (ps == 0) or worker servers (ps > 0); >= 1.
    ps: parameter servers; > 0 also starts one chief (the coordinator, running the trainer).
    trainer_args: flags appended to the trainer command.
    max_restarts: restarts allowed in total: of the whole group after a trainer failed (with
      ps > 0, also after a ps server was lost: the chief then fails), and (ps > 0) of a dead
      worker server in place, on its own port.
    port_base: use ports port_base, port_base + 1, ...; None: free ports, new each attempt.
    env: variables added to os.environ for every child.
    timeout_s: stop everything and return 124 after this long; None: no limit.
    command: the trainer command (argv list); default [sys.executable, '-m', 'trainer.main'].
    server_command: the server command; default [sys.executable, '-m', 'launch.server'].
    pin_cores: pin worker i to the i-th usable core (mod their number).
    grace_s: seconds between SIGTERM and SIGKILL when stopping children.
    start_timeout_s: (ps > 0) seconds for the servers to listen before the chief starts;
      0: do not wait.
  """
  if workers < 1 or ps < 0 or max_restarts < 0:
    raise ValueError(f"run: workers={workers} must be >= 1, ps={ps} >= 0, "
                     f"max_restarts={max_restarts} >= 0")
  trainer_cmd = list(command or [sys.executable, "-m", "trainer.main"])
  server_cmd = list(server_command or [sys.executable, "-m", "launch.server"])
  base_env = {**os.environ, **(env or {})}
  cpus = sorted(os.sched_getaffinity(0)) if pin_cores else None
  received = signals.Received()
  ctx = attempt.Context(
      received=received, restarts=attempt.Restarts(max_restarts), grace_s=grace_s,
      start_timeout_s=start_timeout_s, timeout_s=timeout_s,
      deadline=None if timeout_s is None else time.monotonic() + timeout_s)
  run_attempt = attempt.run_multiworker if ps == 0 else attempt.run_parameter_server
  n = cluster.ports_needed(workers, ps)
  with received.installed():
    while received.first is None:
      ports = cluster.consecutive_ports(n, port_base) if port_base else cluster.free_ports(n)
      tasks = plan.make_tasks(workers, ps, ports, trainer_cmd, server_cmd, trainer_args,
                              base_env, cpus=cpus)
      outcome = run_attempt(tasks, ctx)
      if outcome.retry and ctx.restarts.take(outcome.who, outcome.returncode):
        time.sleep(RESTART_PAUSE_S)
        continue
      if outcome.summary is not None:
        # Once, unprefixed, last: scripts read it as they read trainer.main's last line.
        emit(outcome.summary)
      return codes.exit_status(outcome.returncode)
    return codes.exit_status(-received.first)  # signalled between attempts


def _define(fv):
  flags.DEFINE_integer("workers", None, "Trainer workers (ps=0), or worker servers (ps>0).",
                       flag_values=fv)
  flags.DEFINE_integer("ps", 0, "Parameter servers; > 0 adds a chief running the trainer.",
                       flag_values=fv)
  flags.DEFINE_integer("port_base", None, "Use consecutive ports from here (default: free ones).",
                       flag_values=fv)
  flags.DEFINE_integer("max_restarts", 0, "Restarts allowed after a failure (see module doc).",
                       flag_values=fv)
  flags.DEFINE_boolean("pin_cores", False, "Pin worker i to core i mod ncores (benchmarks).",
                       flag_values=fv)
  flags.DEFINE_float("start_timeout_s", 60.0, "ps>0: seconds for servers to listen; 0: no wait.",
                     flag_values=fv)
  flags.DEFINE_float("grace_s", 10.0, "Seconds from SIGTERM to SIGKILL when stopping children.",
                     flag_values=fv)
  flags.DEFINE_float("timeout_s", None, "Stop all and exit 124 after this long (default: none).",
                     flag_values=fv)
  flags.DEFINE_string("trainer_module", "trainer.main", "Module the trainer processes run.",
                      flag_values=fv)
  flags.DEFINE_string("server_module", "launch.server", "Module the worker/ps servers run.",
                      flag_values=fv)


def _check(fv, trainer_args):
  if fv.workers is None:
    raise app.UsageError("--workers is required (number of worker processes, >= 1)")
  cli.check(fv.workers >= 1, "workers", fv.workers, "must be >= 1")
  cli.check(fv.ps >= 0, "ps", fv.ps, "must be >= 0")
  cli.check(fv.max_restarts >= 0, "max_restarts", fv.max_restarts, "must be >= 0")
  if fv.port_base is not None:
    last = fv.port_base + cluster.ports_needed(fv.workers, fv.ps) - 1
    cli.check(1 <= fv.port_base and last <= 65535, "port_base", fv.port_base,
              f"ports {fv.port_base}..{last} must lie in 1..65535")
  cli.check(fv.grace_s >= 0, "grace_s", fv.grace_s, "must be >= 0")
  cli.check(fv.start_timeout_s >= 0, "start_timeout_s", fv.start_timeout_s, "must be >= 0")
  if fv.timeout_s is not None:
    cli.check(fv.timeout_s > 0, "timeout_s", fv.timeout_s, "must be > 0")
  if not trainer_args:
    raise app.UsageError("no trainer flags after '--' (e.g. -- --strategy=multiworker "
                         "--train_steps=100)")


def _main(argv):
  fv, trainer_args = cli.parse("launch.local", _define, argv)
  _check(fv, trainer_args)
  if (fv.workers > 1 or fv.ps > 0) and not any(a.startswith("--strategy") for a in trainer_args):
    log("warning: no --strategy in the trainer flags; the processes will not form one cluster "
        "(pass --strategy=multiworker, or --strategy=parameter_server with --ps)")
  return run(fv.workers, fv.ps, trainer_args, max_restarts=fv.max_restarts,
             port_base=fv.port_base, timeout_s=fv.timeout_s,
             command=[sys.executable, "-m", fv.trainer_module],
             server_command=[sys.executable, "-m", fv.server_module], pin_cores=fv.pin_cores,
             grace_s=fv.grace_s, start_timeout_s=fv.start_timeout_s)


if __name__ == "__main__":
  cli.main("launch.local", _main)
