"""--strategy=multiworker on localhost: 2 workers equal one process with 2
replicas, only the chief writes, a killed worker is restarted and the job
resumes exactly, a dead peer ends the survivor within --peer_timeout_s."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (REPO, assert_weights_close, checkpoint_weights, env,
                      max_rel_diff, run_trainer, stop_all, trainer_cmd)
from launch import cluster as launch_cluster

pytestmark = pytest.mark.timeout(400)

STEPS = 200
EVERY = 40
# Global batch 64: 32 per worker, 32 per replica under --cpu_replicas=2.
# --augment: each worker crops and flips only its own rows (drawn for the
# whole global batch), as one process with 2 replicas crops them all.
FLAGS = ["--dataset=digits", "--model=cnn", "--optimizer=sgd",
         "--learning_rate=0.05", "--global_batch_size=64",
         f"--train_steps={STEPS}", "--steps_per_loop=10", "--summary_every=40",
         f"--checkpoint_every={EVERY}", "--eval_every=0", "--mode=train",
         "--seed=3", "--augment"]
# TF's warnings (level 1) stay on: the auto-shard warning is one of them.
LOG_ENV = {"TF_CPP_MIN_LOG_LEVEL": "1"}
# A line of TensorFlow's C++ logger, or gRPC's detail lines under one.
_TF_LOG_LINE = re.compile(r"^([EWIF]\d{4} |Additional GRPC error|:UNKNOWN:)")
AUTO_SHARD = re.compile(r"AutoShardPolicy|auto-shard|auto sharding|"
                        r"sharding policy", re.IGNORECASE)
_EVENTS_PID = re.compile(r"^events\.out\.tfevents\.\d+\..+\.(\d+)\.\d+\.v2$")


def _launch(model_dir, tmpdir, *launcher_flags, timeout=300, wait=True):
  """launch.local --workers=2 with TMPDIR=tmpdir for the workers."""
  tmpdir.mkdir(exist_ok=True)
  cmd = [sys.executable, "-m", "launch.local", "--workers=2",
         "--grace_s=5", "--timeout_s=280", *launcher_flags, "--",
         "--strategy=multiworker", "--peer_timeout_s=60", *FLAGS,
         f"--model_dir={model_dir}"]
  e = env(TMPDIR=tmpdir, **LOG_ENV)
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
  return subprocess.run(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _json_lines(output, worker):
  prefix = f"[worker {worker}] {{"
  return [json.loads(l[len(f"[worker {worker}] "):])
          for l in output.splitlines() if l.startswith(prefix)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """One uninterrupted 2-worker job: (model_dir, launcher output, TMPDIR)."""
  root = tmp_path_factory.mktemp("uninterrupted")
  proc = _launch(root / "model", root / "tmp")
  assert proc.returncode == 0, proc.stdout[-5000:]
  return root / "model", proc.stdout, root / "tmp"


def test_two_workers_equal_mirrored_two_replicas(uninterrupted, tmp_path):
  model_dir, output, _ = uninterrupted
  for worker in (0, 1):
    assert _json_lines(output, worker)[-1]["global_step"] == STEPS
  single = tmp_path / "mirrored"
  run_trainer(*FLAGS, "--strategy=mirrored", "--cpu_replicas=2",
              f"--model_dir={single}")
  two_workers = checkpoint_weights(model_dir / f"ckpt-{STEPS}")
  assert_weights_close(two_workers, checkpoint_weights(single / f"ckpt-{STEPS}"),
                       rtol=1e-5)
  # The weights moved: the comparison is not between two initializations.
  first = checkpoint_weights(model_dir / f"ckpt-{STEPS - EVERY}")
  assert any(abs(two_workers[k] - first[k]).max() > 1e-4 for k in first)


def test_explicit_shard_policy_no_auto_shard_warning(uninterrupted):
  _, output, _ = uninterrupted
  # TF's C++ warnings of both workers are in the log (so one would show).
  for worker in (0, 1):
    assert re.search(rf"^\[worker {worker}\] W\d{{4}} ", output, re.M), \
        output[-3000:]
  warned = [l for l in output.splitlines() if AUTO_SHARD.search(l)]
  assert not warned, warned[:5]


def test_only_the_chief_writes(uninterrupted):
  model_dir, output, tmpdir = uninterrupted
  # Worker 1 saved into TMPDIR at every checkpoint and deleted it each time.
  assert list(tmpdir.iterdir()) == []
  names = {p.name for p in model_dir.iterdir()}
  allowed = re.compile(r"^(checkpoint|config\.json|history\.jsonl|train|eval|"
                       r"goodput\.json|"
                       r"ckpt-\d+\.(index|data-\d+-of-\d+)|events\.out\..*)$")
  assert not [n for n in names if not allowed.match(n)], names
  assert {"checkpoint", "config.json", "train", f"ckpt-{STEPS}.index"} <= names
  # Every event file comes from one process: the chief's.
  pids = set()
  for path in model_dir.rglob("events.out.tfevents.*"):
    match = _EVENTS_PID.match(path.name)
    assert match, path.name
    pids.add(match.group(1))
  assert len(pids) == 1, pids
  assert json.loads((model_dir / "config.json").read_text())[
      "strategy"] == "multiworker"
  # One run, one history line: the chief's alone.
  history = (model_dir / "history.jsonl").read_text().splitlines()
  assert len(history) == 1 and json.loads(history[0])["mode"] == "train"


def _worker_pid(model_dir, index):
  """The pid of the trainer for task `index` writing to model_dir, or None."""
  for entry in Path("/proc").iterdir():
    if not entry.name.isdigit():
      continue
    try:
      cmdline = (entry / "cmdline").read_bytes().split(b"\0")
      if f"--model_dir={model_dir}".encode() not in cmdline or \
          b"trainer.main" not in cmdline:
        continue
      environ = (entry / "environ").read_bytes().split(b"\0")
    except OSError:
      continue
    for var in environ:
      if var.startswith(b"TF_CONFIG="):
        task = json.loads(var[len(b"TF_CONFIG="):])["task"]
        if task["type"] == "worker" and task["index"] == index:
          return int(entry.name)
  return None


def test_killed_worker_restarts_and_resumes_exactly(uninterrupted, tmp_path):
  """--max_restarts=1; SIGKILL worker 1 once a checkpoint exists: the
  launcher restarts the group, which restores it and ends at --train_steps
  with the weights of the uninterrupted job."""
  model_dir = tmp_path / "model"
  launcher = _launch(model_dir, tmp_path / "tmp", "--max_restarts=1",
                     wait=False)
  killed = None
  try:
    deadline = time.monotonic() + 200
    pid = None
    while time.monotonic() < deadline and launcher.poll() is None:
      pid = pid or _worker_pid(model_dir, 1)
      if pid and (model_dir / "checkpoint").exists():
        os.kill(pid, signal.SIGKILL)
        killed = pid
        break
      time.sleep(0.02)
    output, _ = launcher.communicate(timeout=280)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
      launcher.communicate(timeout=30)
  assert killed, f"worker 1 never seen with a checkpoint\n{output[-5000:]}"
  assert launcher.returncode == 0, output[-5000:]
  # Whichever exit the launcher saw first: worker 1's SIGKILL, or worker 0
  # noticing its dead peer.
  assert re.search(r"restart 1/1 after worker (1 exited with -9|0 exited "
                   r"with 4)", output), output[-5000:]
  restored = re.findall(r"\[worker 0\] .*restored \S+ckpt-(\d+) at step (\d+)",
                        output)
  assert restored and int(restored[-1][1]) > 0, output[-5000:]
  assert restored[-1][0] == restored[-1][1]
  assert int(restored[-1][1]) < STEPS, "killed too late to test a resume"
  print(f"worker 1 killed; the restart restored step {restored[-1][1]}")
  for worker in (0, 1):
    assert _json_lines(output, worker)[-1]["global_step"] == STEPS
  resumed = checkpoint_weights(model_dir / f"ckpt-{STEPS}")
  reference = checkpoint_weights(uninterrupted[0] / f"ckpt-{STEPS}")
  assert resumed.keys() == reference.keys()
  assert max_rel_diff(resumed, reference) <= 1e-6


def _start_two_workers(tmp_path, model_dir, *flags):
  """Two trainers with their own TF_CONFIG (no launcher); returns (procs,
  logs) once the first checkpoint exists. The caller stops the procs."""
  cluster = launch_cluster.make_cluster(2, 0, launch_cluster.free_ports(2))
  procs, logs = [], []
  try:
    for index in (0, 1):
      tf_config = json.dumps(launch_cluster.tf_config(cluster, "worker",
                                                      index))
      logs.append(tmp_path / f"worker{index}.log")
      procs.append(subprocess.Popen(
          trainer_cmd(*FLAGS, "--train_steps=100000",
                      "--strategy=multiworker", *flags,
                      f"--model_dir={model_dir}"),
          cwd=REPO, env=env(TF_CONFIG=tf_config, **LOG_ENV),
          stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT,
          start_new_session=True))
    deadline = time.monotonic() + 200
    while not (model_dir / "checkpoint").exists():
      assert time.monotonic() < deadline, logs[0].read_text()[-3000:]
      assert procs[0].poll() is None and procs[1].poll() is None, \
          logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
      time.sleep(0.1)
  except BaseException:
    stop_all(procs)          # the caller never gets them: stop them here
    raise
  return procs, logs




def test_dead_peer_ends_the_survivor_within_peer_timeout(tmp_path):
  """No launcher: two trainers with their own TF_CONFIG; SIGKILL worker 1
  mid-training. Worker 0 exits 4 with one error line, within
  --peer_timeout_s (plus slack for a loaded machine)."""
  peer_timeout_s = 15
  model_dir = tmp_path / "model"
  procs = []
  try:
    procs, logs = _start_two_workers(tmp_path, model_dir,
                                     f"--peer_timeout_s={peer_timeout_s}")
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
      code = procs[0].wait(timeout=peer_timeout_s + 30)
    except subprocess.TimeoutExpired:
      pytest.fail(f"worker 0 still running {peer_timeout_s + 30} s after its "
                  f"peer died\n{logs[0].read_text()[-3000:]}")
    took = time.monotonic() - killed_at
  finally:
    stop_all(procs)
  text = logs[0].read_text()
  assert code == 4, text[-3000:]
  # TensorFlow's own C++ log lines (E0000 ... ring_alg.cc: "last error:
  # ...") appear when a collective was already dialling the dead peer; they
  # are TF's (TF_CPP_MIN_LOG_LEVEL silences them), the rest is ours.
  errors = [l for l in text.splitlines()
            if "error:" in l and not _TF_LOG_LINE.match(l)]
  assert len(errors) == 1, text[-3000:]
  assert errors[0].startswith("trainer.main: error: lost contact with a peer "
                              "task"), errors
  assert "Traceback" not in text
  assert took < peer_timeout_s + 15, took
  print(f"worker 0 exited {code} {took:.1f} s after worker 1 was killed")


def test_sigterm_to_one_worker_makes_every_worker_save(tmp_path):
  """Preemption of ONE worker (no launcher forwarding): the workers agree
  at the next chunk boundary, all save at that step and exit 75."""
  model_dir = tmp_path / "model"
  procs = []
  try:
    procs, logs = _start_two_workers(tmp_path, model_dir)
    procs[1].send_signal(signal.SIGTERM)          # worker 1 only
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    stop_all(procs)
  texts = [log.read_text() for log in logs]
  assert codes == [75, 75], [t[-2000:] for t in texts]
  steps = {json.loads([l for l in t.splitlines() if l.startswith("{")][-1])
           ["global_step"] for t in texts}
  assert len(steps) == 1, steps                   # the same step everywhere
  step = steps.pop()
  assert (model_dir / f"ckpt-{step}.index").exists()
