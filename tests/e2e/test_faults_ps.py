"""Parameter servers with workers lost or frozen: every wait of the
coordinator is bounded by --peer_timeout_s and says so; a frozen worker is
dropped and the run goes on without it (to the end, if it never wakes);
with every worker lost it exits 4. A lost or frozen ps costs one restart
of the group."""

import json
import os
import re
import signal
import time

import pytest

from conftest import PS_FLAGS, Cluster

pytestmark = pytest.mark.timeout(300)


def _summary_times(cluster) -> dict:
  """{step: time.monotonic() when first seen} of the train summaries."""
  for step in re.findall(r"train \| step: (\d+)/", cluster.log()):
    cluster.seen_steps.setdefault(int(step), time.monotonic())
  return cluster.seen_steps


def _freeze_worker1(cluster, timeout_s):
  """SIGSTOPs worker 1 after the first summary; returns its pid once a
  round after the freeze has ended and a line named it, asserting that the
  round ended within --peer_timeout_s (it never did without the bound)."""
  cluster.seen_steps = {}
  cluster.wait_for(lambda: 50 in _summary_times(cluster), 180,
                   "first train summary")
  frozen = cluster.children()["worker1"]
  os.kill(frozen, signal.SIGSTOP)
  stopped, first = time.monotonic(), max(cluster.seen_steps)
  # The round the freeze stalled, and one more: the kernel still accepts
  # connections for a stopped process, so only answers count.
  cluster.wait_for(lambda: max(_summary_times(cluster)) >= first + 100,
                   120, "two rounds after the freeze")
  ended = min(t for s, t in cluster.seen_steps.items() if s > first)
  # Its own work is < 1 s; the margin is for a loaded machine.
  assert ended - stopped < timeout_s + 20, (ended - stopped,
                                            cluster.log()[-3000:])
  cluster.wait_for(lambda: "worker 1 (" in cluster.log(), 30,
                   "the line naming the frozen worker")
  named = [l for l in cluster.log().splitlines() if "worker 1 (" in l]
  assert "does not answer" in named[0], named
  return frozen


def test_frozen_worker_dropped_then_every_worker_lost_exits_4(tmp_path):
  """A stopped worker is dropped within --peer_timeout_s and the run goes
  on; with worker 0 killed as well (worker 1 still stopped) no worker
  answers: exit 4 within --peer_timeout_s, after periodic lines."""
  timeout_s = 8
  cluster = Cluster(tmp_path, [*PS_FLAGS, f"--model_dir={tmp_path / 'run'}",
                               "--train_steps=1000000", "--mode=train",
                               f"--peer_timeout_s={timeout_s}"])
  try:
    _freeze_worker1(cluster, timeout_s)
    os.kill(cluster.children()["worker0"], signal.SIGKILL)
    killed = time.monotonic()
    rc = cluster.wait(timeout=timeout_s + 60)
    took = time.monotonic() - killed
  finally:
    cluster.stop()
  log = cluster.log()
  assert rc == 4, log[-4000:]
  # The watch needs timeout_s of silence, plus its probes (1 s each) and
  # the launcher's stop: a small margin, far below "forever".
  assert took < timeout_s + 15, (took, log[-3000:])
  assert "waiting for workers: none of 2 answers" in log, log[-3000:]
  errors = [l for l in log.splitlines() if "trainer.main: error:" in l]
  assert len(errors) == 1 and "no worker has answered" in errors[0], errors
  assert "Traceback" not in log
  # Its model_dir lock went with it: the next run finds none.
  assert not (tmp_path / "run" / ".trainer.lock").exists()


@pytest.mark.skipif(not os.environ.get("TRAINER_SLOW"),
                    reason="two clusters' worth of CPU; set TRAINER_SLOW=1")
def test_frozen_worker_woken_up_adds_no_updates(tmp_path):
  """Stopped, dropped, then woken up (SIGCONT): the worker is taken back
  and the function it was frozen in stops at its next update check, so
  global_step ends at exactly --train_steps and the model trained."""
  timeout_s = 6
  cluster = Cluster(tmp_path, [*PS_FLAGS, f"--model_dir={tmp_path / 'run'}",
                               "--train_steps=400", "--mode=train_and_eval",
                               "--checkpoint_every=100",
                               f"--peer_timeout_s={timeout_s}"])
  try:
    frozen = _freeze_worker1(cluster, timeout_s)
    os.kill(frozen, signal.SIGCONT)
    rc = cluster.wait(timeout=180)
  finally:
    cluster.stop()
  log = cluster.log()
  assert rc == 0, log[-4000:]
  assert "worker 1 (" in log and "answers again" in log, log[-3000:]
  result = json.loads(log.strip().splitlines()[-1])
  assert result["global_step"] == 400, result
  # A digits CNN after 400 updates of 32: ~0.96 in single-worker runs.
  assert result["eval_accuracy"] > 0.85, result


@pytest.mark.slow
def test_workers_restarted_in_time_are_picked_up(tmp_path):
  """Under launch.local --max_restarts both killed workers come back on
  their ports within --peer_timeout_s: the watch lets the run finish."""
  cluster = Cluster(tmp_path, [*PS_FLAGS, f"--model_dir={tmp_path / 'run'}",
                               "--train_steps=400", "--mode=train",
                               "--peer_timeout_s=60"], name="restarts",
                    launcher_flags=["--max_restarts=2"])
  try:
    cluster.wait_for(lambda: re.search(r"train \| step: 50/", cluster.log()),
                     180, "first train summary")
    children = cluster.children()
    for name in ("worker0", "worker1"):
      os.kill(children[name], signal.SIGKILL)
    rc = cluster.wait(timeout=240)
  finally:
    cluster.stop()
  log = cluster.log()
  assert rc == 0, log[-4000:]
  assert "restart 1/2 after worker" in log and "restart 2/2 after worker" in \
      log, log[-4000:]
  assert '"global_step": 400' in log


@pytest.mark.skipif(not os.environ.get("TRAINER_SLOW"),
                    reason="two clusters' worth of CPU; set TRAINER_SLOW=1")
def test_lost_ps_costs_one_restart(tmp_path):
  """SIGKILL of the ps under --max_restarts=1: the group restarts once,
  resumes from the last checkpoint and finishes the run."""
  cluster = Cluster(tmp_path, [*PS_FLAGS, f"--model_dir={tmp_path / 'run'}",
                               "--train_steps=400", "--mode=train_and_eval",
                               "--checkpoint_every=100"],
                    launcher_flags=["--max_restarts=1"])
  try:
    cluster.wait_for(lambda: "ckpt-200" in cluster.log(), 240,
                     "the checkpoint at step 200")
    os.kill(cluster.children()["ps0"], signal.SIGKILL)
    rc = cluster.wait(timeout=240)
  finally:
    cluster.stop()
  log = cluster.log()
  assert rc == 0, log[-4000:]
  assert "restart 1/1 after chief exited with 4" in log, log[-4000:]
  assert "restart 2/" not in log and "ps 0 exited with -9" in log
  restored = re.findall(r"restored \S*ckpt-(\d+) at step (\d+)", log)
  assert restored and int(restored[-1][0]) >= 200, (restored, log[-4000:])
  result = json.loads(log.strip().splitlines()[-1])
  assert result["global_step"] == 400, result
  assert result["eval_accuracy"] > 0.85, result


def _chief_result(log: str):
  """The coordinator's final JSON line, or None before it is written."""
  lines = [l[len("[chief] "):] for l in log.splitlines()
           if l.startswith("[chief] {")]
  return json.loads(lines[-1]) if lines else None


def _thaw(pid):
  """SIGCONT to a process this test stopped (None: none was), if alive."""
  if pid is not None:
    try:
      os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
      pass


@pytest.mark.skipif(not os.environ.get("TRAINER_SLOW"),
                    reason="a 2-worker, 2-ps cluster for a minute; set "
                    "TRAINER_SLOW=1")
def test_worker_frozen_until_the_end_run_finishes(tmp_path):
  """Worker 1 SIGSTOPped at a known step and never woken: the run trains to
  --train_steps, evaluates, saves and exits 0, within --peer_timeout_s plus
  what the rest of the work takes at the run's own pace, and a line names
  the frozen worker. No round after the drop waits for it again."""
  timeout_s, train_steps = 15, 1000
  cluster = Cluster(tmp_path, [
      "--strategy=parameter_server", "--model=mlp", "--dataset=digits",
      "--global_batch_size=32", "--steps_per_loop=20", "--summary_every=50",
      "--eval_every=0", "--progress=log", "--mode=train_and_eval",
      f"--train_steps={train_steps}", "--checkpoint_every=100",
      f"--model_dir={tmp_path / 'run'}", f"--peer_timeout_s={timeout_s}"],
      ps=2)
  frozen = None
  try:
    cluster.seen_steps = {}
    cluster.wait_for(lambda: 200 in _summary_times(cluster), 180,
                     "the train summary at step 200")
    frozen = cluster.children()["worker1"]
    os.kill(frozen, signal.SIGSTOP)
    stopped = time.monotonic()
    at_stop = max(cluster.seen_steps)
    # Two workers' pace, steps 100-200 (past start-up, with one save).
    pace = (cluster.seen_steps[200] - cluster.seen_steps[100]) / 100
    # One worker does the rest: at most twice the two workers' time for it
    # (two workers are not more than twice as fast as one), after at most
    # --peer_timeout_s to drop the frozen one. The margin covers the final
    # evaluation and save and a loaded machine.
    rest, margin = 2 * pace * (train_steps - at_stop), 30
    bound = timeout_s + rest + margin
    cluster.wait_for(lambda: _summary_times(cluster) and
                     _chief_result(cluster.log()) is not None, bound,
                     "the final line (the bound)")
    took = time.monotonic() - stopped
    rc = cluster.wait(timeout=60)
  finally:
    _thaw(frozen)
    cluster.stop()
  log = cluster.log()
  assert rc == 0, log[-4000:]
  result = _chief_result(log)
  # The frozen worker never ran again: no stale update can land.
  assert result["global_step"] == train_steps, result
  # The digits MLP trained by one worker alone reaches ~0.95.
  assert result["eval_accuracy"] > 0.85, result
  named = [l for l in log.splitlines() if "worker 1 (" in l]
  assert named and "does not answer" in named[0], log[-3000:]
  assert "answers again" not in log
  print(f"frozen at step {at_stop}; two-worker pace {pace * 1000:.1f} ms per "
        f"update; finished {took:.1f} s after the stop; bound "
        f"{timeout_s} + {rest:.1f} + {margin} s; summaries after it (step: s): "
        + ", ".join(f"{s}: {t - stopped:.1f}" for s, t in
                    sorted(cluster.seen_steps.items()) if s > at_stop))
  # After the round the freeze stalled, no round waits for it again.
  steps = sorted(s for s in cluster.seen_steps if s > at_stop)
  gaps = [cluster.seen_steps[b] - cluster.seen_steps[a]
          for a, b in zip(steps[1:], steps[2:])]
  # (a wait for it lasts 2/3 of --peer_timeout_s: the keepalive)
  assert gaps and max(gaps) < timeout_s / 3, (gaps, log[-3000:])


@pytest.mark.skipif(not os.environ.get("TRAINER_SLOW"),
                    reason="a 2-worker, 2-ps cluster started twice; set "
                    "TRAINER_SLOW=1")
def test_ps_frozen_mid_round_costs_one_restart(tmp_path):
  """ps 0 SIGSTOPped while the workers' functions read and update it: they
  wait on it (their channels have no keepalive) and the coordinator's join
  waits on them. The watch names the ps and ends the run with exit 4 within
  2/3 of --peer_timeout_s (before: only the hang watch, after
  --hang_timeout_s, exit 142); launch.local --max_restarts=1 restarts the
  group once (SIGKILL reaches the stopped ps) and the run finishes."""
  timeout_s = 15
  cluster = Cluster(tmp_path, [
      "--strategy=parameter_server", "--model=mlp", "--dataset=digits",
      "--global_batch_size=32", "--steps_per_loop=20", "--summary_every=500",
      "--eval_every=0", "--progress=log", "--mode=train_and_eval",
      "--train_steps=2000", "--checkpoint_every=500",
      f"--model_dir={tmp_path / 'run'}", f"--peer_timeout_s={timeout_s}"],
      ps=2, launcher_flags=["--max_restarts=1"])
  frozen = None
  try:
    cluster.wait_for(lambda: "ckpt-500" in cluster.log(), 180,
                     "the checkpoint at step 500")
    time.sleep(1.0)   # inside the next round (500 updates, several s)
    frozen = cluster.children()["ps0"]
    os.kill(frozen, signal.SIGSTOP)
    stopped = time.monotonic()
    cluster.wait_for(lambda: "restart 1/1" in cluster.log(), 2 * timeout_s,
                     "the restart after the frozen ps")
    took = time.monotonic() - stopped
    rc = cluster.wait(timeout=240)
  finally:
    _thaw(frozen)
    cluster.stop()
  log = cluster.log()
  print(f"ps 0 frozen after ckpt-500; the group restarted {took:.1f} s later "
        f"(2/3 of --peer_timeout_s={timeout_s}: {timeout_s * 2 / 3:.0f} s)")
  assert rc == 0, log[-4000:]
  assert re.search(r"ps 0 \(\S+\) does not answer", log), log[-4000:]
  errors = [l for l in log.splitlines() if "trainer.main: error:" in l]
  assert len(errors) == 1 and re.search(
      r"ps 0 \(\S+\) has not answered for \d+ s", errors[0]), errors
  assert "restart 1/1 after chief exited with 4" in log, log[-4000:]
  assert "restart 2/" not in log and "hang:" not in log
  # The watch's bound, a probe, the launcher's stop: far below the hang
  # watch's 120 s.
  assert took < timeout_s * 2 / 3 + 10, (took, log[-4000:])
  restored = re.findall(r"restored \S*ckpt-(\d+) at step (\d+)", log)
  assert restored and int(restored[-1][0]) == 500, (restored, log[-4000:])
  result = _chief_result(log)
  assert result["global_step"] == 2000, result
  assert result["eval_accuracy"] > 0.85, result
