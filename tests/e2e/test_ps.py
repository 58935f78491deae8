"""--strategy=parameter_server end to end: 2 workers + 1 ps on localhost
through launch.local; a worker killed mid-run; the ps killed, then resume;
a continuous_eval side-car on the PS-trained model_dir."""

import json
import os
import re
import signal
import time

import pytest

from conftest import PS_FLAGS, Cluster, event_steps, last_json, run_trainer

pytestmark = pytest.mark.timeout(300)

def _chief_json(log: str) -> dict:
  lines = [l[len("[chief] "):] for l in log.splitlines()
           if l.startswith("[chief] {")]
  assert lines, f"no JSON line from the chief:\n{log[-4000:]}"
  return json.loads(lines[-1])




def _event_tags(directory) -> set:
  import tensorflow as tf
  tags = set()
  for name in os.listdir(directory):
    if name.startswith("events."):
      for event in tf.compat.v1.train.summary_iterator(
          os.path.join(directory, name)):
        tags.update(v.tag for v in event.summary.value)
  return tags


def _checkpoint_steps(model_dir) -> list[int]:
  return sorted(int(m.group(1)) for p in model_dir.glob("ckpt-*.index")
                if (m := re.match(r"ckpt-(\d+)\.index", p.name)))


def test_two_workers_one_ps_train_cnn_on_digits(tmp_path):
  model_dir = tmp_path / "run"
  cluster = Cluster(tmp_path, [*PS_FLAGS, f"--model_dir={model_dir}",
                               "--train_steps=300", "--checkpoint_every=150",
                               "--eval_every=150"])
  try:
    rc = cluster.wait(timeout=240)
  finally:
    cluster.stop()
  log = cluster.log()
  assert rc == 0, log[-5000:]
  result = _chief_json(log)
  assert result["global_step"] == 300
  assert result["eval_accuracy"] >= 0.9, result
  assert result["eval_examples"] == 297
  # One train summary per coordinator round, at exact steps.
  assert event_steps(model_dir / "train", "loss") == [50, 100, 150, 200,
                                                       250, 300]
  assert {"loss", "accuracy", "learning_rate", "steps_per_sec",
          "examples_per_sec", "grad_norm"} <= _event_tags(model_dir / "train")
  assert {"loss", "accuracy"} <= _event_tags(model_dir / "eval")
  assert event_steps(model_dir / "eval", "accuracy") == [150, 300]
  assert _checkpoint_steps(model_dir) == [150, 300]
  # The coordinator alone wrote; config.json and the checkpoint say PS.
  config = json.loads((model_dir / "config.json").read_text())
  assert config["strategy"] == "parameter_server"

  # The side-car evaluator (its own process, default strategy) reads the
  # PS-written checkpoints and stops at the one at --train_steps.
  proc = run_trainer("--mode=continuous_eval", "--strategy=default",
                     "--model=cnn", "--dataset=digits",
                     "--global_batch_size=32", "--train_steps=300",
                     "--eval_timeout_s=60", f"--model_dir={model_dir}",
                     timeout=120)
  evaluated = last_json(proc)
  assert evaluated["global_step"] == 300
  assert abs(evaluated["eval_accuracy"] - result["eval_accuracy"]) < 1e-6


def test_killed_worker_does_not_stop_training_and_step_stays_exact(tmp_path):
  model_dir = tmp_path / "run"
  cluster = Cluster(tmp_path, [*PS_FLAGS, f"--model_dir={model_dir}",
                               "--train_steps=600", "--checkpoint_every=300",
                               "--mode=train"])
  try:
    cluster.wait_for(lambda: "train | step: 50/600" in cluster.log(), 180,
                     "first train summary")
    pid = cluster.children()["worker0"]
    os.kill(pid, signal.SIGKILL)
    rc = cluster.wait(timeout=180)
  finally:
    cluster.stop()
  log = cluster.log()
  assert rc == 0, log[-5000:]
  # The coordinator noticed the loss and re-scheduled the function it ran.
  assert re.search(r"Worker /job:worker/replica:0/task:0 failed", log), \
      log[-5000:]
  assert "worker 0 exited with -9; not restarted" in log
  assert _chief_json(log)["global_step"] == 600
  # Every round ended exactly on its boundary, also the one whose function
  # was re-run: a re-run function skips the updates the dead worker ran.
  assert event_steps(model_dir / "train", "loss") == list(range(50, 601, 50))
  assert _checkpoint_steps(model_dir) == [300, 600]


def test_sigterm_to_the_launcher_saves_then_stops_the_servers(tmp_path):
  """Preemption in ps mode: the coordinator gets the signal first and saves
  (its variables live on the ps, which must still be up), then the servers
  are stopped; the launcher exits 75."""
  model_dir = tmp_path / "run"
  cluster = Cluster(tmp_path, [*PS_FLAGS, f"--model_dir={model_dir}",
                               "--train_steps=5000", "--checkpoint_every=5000",
                               "--mode=train"])
  try:
    cluster.wait_for(lambda: "train | step: 50/5000" in cluster.log(), 180,
                     "first train summary")
    cluster.proc.send_signal(signal.SIGTERM)
    rc = cluster.wait(timeout=120)
  finally:
    cluster.stop()
  log = cluster.log()
  assert rc == 75, log[-5000:]
  step = _chief_json(log)["global_step"]
  assert 50 <= step < 5000
  assert _checkpoint_steps(model_dir) == [step]


def test_killed_ps_stops_the_coordinator_then_relaunch_resumes(tmp_path):
  model_dir = tmp_path / "run"
  # Two ps tasks, and the dense kernel (64 KiB) and its Adam slots sharded
  # over them: the relaunch restores into sharded variables.
  flags = [*PS_FLAGS, f"--model_dir={model_dir}", "--checkpoint_every=100",
           "--summary_every=100", "--ps_shard_min_bytes=4096"]
  cluster = Cluster(tmp_path, [*flags, "--train_steps=100000", "--mode=train"],
                    ps=2, name="first")
  try:
    cluster.wait_for(lambda: _checkpoint_steps(model_dir), 180,
                     "first checkpoint")
    os.kill(cluster.children()["ps0"], signal.SIGKILL)
    killed = time.monotonic()
    rc = cluster.wait(timeout=120)
    took = time.monotonic() - killed
  finally:
    cluster.stop()
  log = cluster.log()
  # One line per sharded variable: the two conv kernels and the dense one,
  # and each one's two Adam slots (sharded like it).
  assert len(re.findall(r"parameter_server: \S+ \[[\d, ]+\] sharded over "
                        r"2 ps: rows 0-\d+ on ps \d, rows \d+-\d+ on ps \d",
                        log)) == 9, log[-5000:]
  assert rc == 4, log[-5000:]   # trainer.main: a peer task was lost
  assert took < 120
  errors = [l for l in log.splitlines() if "trainer.main: error:" in l]
  assert len(errors) == 1, log[-5000:]
  assert "parameter server ps 0 is unreachable" in errors[0]
  chief = [l for l in log.splitlines() if l.startswith("[chief]")]
  assert not any("Traceback (most recent call last)" in l for l in chief), (
      "\n".join(chief[-120:]))

  saved = _checkpoint_steps(model_dir)[-1]
  assert saved >= 100
  again = Cluster(tmp_path, [*flags, f"--train_steps={saved + 100}"],
                  ps=2, name="second")
  try:
    rc = again.wait(timeout=240)
  finally:
    again.stop()
  log = again.log()
  assert rc == 0, log[-5000:]
  restored = re.search(r"restored \S+ at step (\d+)", log)
  assert restored and int(restored.group(1)) == saved, log[-5000:]
  result = _chief_json(log)
  assert result["global_step"] == saved + 100
  # The default strategy reads the shards' slices as whole variables and
  # evaluates exactly as the coordinator's copy of the sharded model did.
  proc = run_trainer("--mode=eval", "--strategy=default", "--model=cnn",
                     "--dataset=digits", "--global_batch_size=32",
                     f"--model_dir={model_dir}", timeout=120)
  evaluated = last_json(proc)
  assert evaluated["global_step"] == saved + 100
  assert abs(evaluated["eval_loss"] - result["eval_loss"]) < 1e-5


# ---- fast checks (no cluster) ----------------------------------------------

def test_missing_tf_config_is_one_line_exit_2(tmp_path):
  proc = run_trainer("--strategy=parameter_server", "--dataset=digits",
                     f"--model_dir={tmp_path / 'run'}", check=False,
                     timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1 and "needs TF_CONFIG" in errors[0], proc.stderr
  assert "launch.local" in errors[0]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tf_config, says", [
    ('{"cluster": {"chief": ["h:1"], "worker": ["h:2"]}, '
     '"task": {"type": "chief", "index": 0}}', "needs 'ps' tasks"),
    ('{"cluster": {"chief": ["h:1"], "worker": ["h:2"], "ps": ["h:3"]}, '
     '"task": {"type": "worker", "index": 0}}', "runs only as the coordinator"),
    ("{not json", "not valid JSON"),
])
def test_bad_tf_config_is_a_user_error(monkeypatch, tf_config, says):
  from trainer.distribute import ps_strategy, strategy
  from trainer.errors import UserError
  monkeypatch.setenv("TF_CONFIG", tf_config)
  with pytest.raises(UserError, match=re.escape(says)):
    ps_strategy.build(strategy.Settings())


def test_servers_that_never_start_end_the_wait(monkeypatch):
  from launch.cluster import free_ports
  from trainer.distribute import ps_strategy as ps
  worker, server = free_ports(2)
  config = {"cluster": {"chief": ["127.0.0.1:1"],
                        "worker": [f"127.0.0.1:{worker}"],
                        "ps": [f"127.0.0.1:{server}"]},
            "task": {"type": "chief", "index": 0}}
  began = time.monotonic()
  with pytest.raises(ps.ClusterNotReady, match="worker 0 .* ps 0"):
    ps.wait_for_servers(config, timeout_s=1.0)
  assert time.monotonic() - began < 10


def test_chunk_sizes_keep_every_worker_busy():
  from trainer.executors.ps import _chunk_sizes
  assert _chunk_sizes(100, 20, 2) == [20] * 5
  assert _chunk_sizes(50, 20, 2) == [17, 17, 16]
  assert _chunk_sizes(20, 20, 2) == [10, 10]     # both workers get work
  assert _chunk_sizes(3, 20, 4) == [1, 1, 1]
  for todo, per_loop, workers in [(1, 1, 1), (7, 3, 2), (1000, 50, 8)]:
    sizes = _chunk_sizes(todo, per_loop, workers)
    assert sum(sizes) == todo and max(sizes) <= per_loop


def test_lost_ps_errors_become_one_clear_error():
  import tensorflow as tf
  from tensorflow.python.distribute.coordinator import cluster_coordinator
  from trainer.executors import ps
  raw = tf.errors.UnavailableError(
      None, None, "failed to connect to all addresses\nAdditional GRPC error "
      "information from remote target /job:ps/replica:0/task:1/device:CPU:0")
  for error in (raw, cluster_coordinator.PSUnavailableError(raw),
                cluster_coordinator.ClosureInputError(raw)):
    lost = ps._translate(error)  # noqa: SLF001
    assert isinstance(lost, ps.ParameterServerLost)
    assert isinstance(lost, tf.errors.UnavailableError)   # exit 4
    assert "parameter server ps 1 is unreachable" in str(lost)
    assert "\n" not in str(lost)
  worker = tf.errors.UnavailableError(None, None,
                                      "/job:worker/replica:0/task:0")
  assert ps._translate(worker) is worker  # noqa: SLF001
  other = ValueError("bad")
  assert ps._translate(other) is other  # noqa: SLF001
