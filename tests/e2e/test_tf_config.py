"""TF_CONFIG: checked before TensorFlow connects anywhere; bad values are one
line and exit 2 in seconds; an unreachable peer is bounded by
--peer_timeout_s; no TF_CONFIG is a one-worker cluster with a warning."""

import json
import subprocess
import time

import pytest

from conftest import REPO, env, last_json, trainer_cmd
from launch import cluster as launch_cluster
from trainer.distribute.cluster import parse_tf_config
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(300)

ARGS = ["--strategy=multiworker", "--dataset=digits", "--global_batch_size=32",
        "--train_steps=2", "--steps_per_loop=1", "--summary_every=1",
        "--eval_every=0", "--mode=train"]


def _cluster(n=2):
  return launch_cluster.make_cluster(n, 0, launch_cluster.free_ports(n))


def _tf_config(cluster, task_type="worker", index=0):
  return json.dumps({"cluster": cluster, "task": {"type": task_type,
                                                  "index": index}})


# (name, TF_CONFIG text, a piece of the one error line)
_BAD = [
    ("malformed", '{"cluster": {"worker": ["127.0.0.1:1"]', "not valid JSON"),
    ("not_object", '["127.0.0.1:1"]', "must be a JSON object"),
    ("no_cluster", '{"task": {"type": "worker", "index": 0}}',
     "no 'cluster' object"),
    ("no_worker_list",
     '{"cluster": {"chief": ["127.0.0.1:1"]}, "task": {"type": "chief"}}',
     "no 'worker' list"),
    ("empty_worker_list",
     '{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}',
     "no 'worker' list"),
    ("address_not_host_port",
     '{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker"}}',
     "'host:port' strings"),
    ("index_out_of_range",
     '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
     '"task": {"type": "worker", "index": 2}}', "index 2 is out of range"),
    ("negative_index",
     '{"cluster": {"worker": ["127.0.0.1:1"]}, '
     '"task": {"type": "worker", "index": -1}}', "out of range"),
    ("unknown_task_type",
     '{"cluster": {"worker": ["127.0.0.1:1"]}, '
     '"task": {"type": "master", "index": 0}}', "task type 'master' is unknown"),
    ("unknown_job",
     '{"cluster": {"worker": ["127.0.0.1:1"], "boss": ["127.0.0.1:2"]}, '
     '"task": {"type": "worker", "index": 0}}', "unknown job 'boss'"),
    ("no_task", '{"cluster": {"worker": ["127.0.0.1:1"]}}', "no 'task'"),
    ("task_type_without_list",
     '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps"}}',
     "no 'ps' list"),
]


@pytest.mark.parametrize("name, text, message", _BAD, ids=[b[0] for b in _BAD])
def test_parse_tf_config_rejects(name, text, message):
  with pytest.raises(UserError) as e:
    parse_tf_config(text)
  assert message in str(e.value), str(e.value)
  assert "\n" not in str(e.value)


def test_parse_tf_config_accepts():
  assert parse_tf_config(None) is None
  assert parse_tf_config("  ") is None
  good = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
          "task": {"type": "worker", "index": 1}}
  assert parse_tf_config(json.dumps(good)) == good
  chief = {"cluster": {"chief": ["h:1"], "worker": ["h:2"]},
           "task": {"type": "chief", "index": 0}}
  assert parse_tf_config(json.dumps(chief)) == chief


def _start(tf_config, model_dir, *extra):
  e = env(TF_CONFIG=tf_config) if tf_config is not None else env()
  return subprocess.Popen(
      trainer_cmd(*ARGS, f"--model_dir={model_dir}", *extra), cwd=REPO, env=e,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)


def _finish_all(procs, timeout):
  """Waits for every process; returns [(returncode, stdout, stderr, secs)]."""
  began = time.monotonic()
  results = []
  try:
    for proc in procs:
      left = max(1.0, timeout - (time.monotonic() - began))
      out, err = proc.communicate(timeout=left)
      results.append((proc.returncode, out, err, time.monotonic() - began))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=30)
  return results


# Through the CLI: the multiworker-specific cases plus a sample of the parser's.
_CLI = [b for b in _BAD if b[0] in ("malformed", "no_worker_list",
                                    "index_out_of_range",
                                    "unknown_task_type")] + [
    ("evaluator_task",
     '{"cluster": {"worker": ["127.0.0.1:1"]}, '
     '"task": {"type": "evaluator", "index": 0}}',
     "does not train under --strategy=multiworker"),
    ("ps_in_cluster",
     '{"cluster": {"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]}, '
     '"task": {"type": "worker", "index": 0}}', "--strategy=parameter_server"),
]


def test_bad_tf_config_through_the_cli_is_one_line_exit_2(tmp_path):
  """All cases at once (each is mostly TensorFlow's import time): every one
  exits 2 with one error line in seconds, touching nothing. Ports 1 and 2:
  nothing listens there, so a run that got as far as connecting would hang
  or fail differently."""
  procs = [_start(text, tmp_path / name) for name, text, _ in _CLI]
  results = _finish_all(procs, timeout=150)
  for (name, _, message), (code, out, err, secs) in zip(_CLI, results):
    assert code == 2, (name, code, err[-2000:])
    errors = [l for l in err.splitlines() if "error:" in l]
    assert len(errors) == 1 and message in errors[0], (name, err[-2000:])
    assert errors[0].startswith("trainer.main: error: TF_CONFIG"), errors
    assert "Traceback" not in err, name
    # Seconds: TF's import (sharing 2 cores with the other cases) and no wait.
    assert secs < 120, (name, secs)
    assert not (tmp_path / name).exists(), name


def test_unreachable_peer_is_bounded_by_peer_timeout(tmp_path):
  """A well-formed TF_CONFIG whose peer never starts is no config error, but
  it must not hang: both the leader (worker 0) and a non-leader give up after
  --peer_timeout_s with one line naming the silent peer."""
  timeout_s = 5
  # Two unrelated clusters: each process's peer port has nobody behind it.
  cluster, other = _cluster(2), _cluster(2)
  procs = [_start(_tf_config(cluster, "worker", 0), tmp_path / "w0",
                  f"--peer_timeout_s={timeout_s}"),
           _start(_tf_config(other, "worker", 1), tmp_path / "w1",
                  f"--peer_timeout_s={timeout_s}")]
  began = time.monotonic()
  results = _finish_all(procs, timeout=150)
  for i, (code, out, err, secs) in enumerate(results):
    assert code != 0, (i, err[-2000:])
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, (i, err[-3000:])
    assert "did not form within --peer_timeout_s=5" in lines[0], lines
    peer = other["worker"][0] if i == 1 else cluster["worker"][1]
    assert f"no answer from worker {1 - i} ({peer})" in lines[0], lines
  # TF import + 5 s, on a shared machine: far below "forever".
  assert time.monotonic() - began < 120
  assert not (tmp_path / "w0").exists() and not (tmp_path / "w1").exists()


def test_no_tf_config_is_a_one_worker_cluster_with_a_warning(tmp_path):
  proc = _start(None, tmp_path / "run")
  (code, out, err, _), = _finish_all([proc], timeout=200)
  assert code == 0, err[-3000:]
  warnings = [l for l in err.splitlines()
              if "without TF_CONFIG: running as a one-worker cluster" in l]
  assert len(warnings) == 1, err[-3000:]
  assert last_json(subprocess.CompletedProcess([], 0, out, err))[
      "global_step"] == 2
  assert (tmp_path / "run" / "ckpt-2.index").exists()
