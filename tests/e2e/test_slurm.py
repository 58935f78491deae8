"""--cluster_resolver=slurm: SlurmClusterResolver from a faked Slurm
environment (the variables srun sets; TF 2.21's resolver reads only the
environment, it does not call scontrol)."""

import os
import socket
import subprocess

import pytest

from conftest import REPO, env, last_json, trainer_cmd
from launch import cluster as launch_cluster

pytestmark = pytest.mark.timeout(300)

_SLURM_KEYS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
               "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST",
               "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
               "TRAINER_SLURM_PORT_BASE", "TF_CONFIG")


def _slurm_env(procid, ntasks, nodelist, tasks_per_node, port_base):
  return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks),
          "SLURM_STEP_NUM_TASKS": str(ntasks),
          "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist,
          "SLURM_NODELIST": nodelist,
          "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
          "SLURM_TASKS_PER_NODE": tasks_per_node,
          "TRAINER_SLURM_PORT_BASE": str(port_base)}


@pytest.fixture
def slurm(monkeypatch):
  """Sets a faked Slurm environment in this process (undone after)."""
  for key in _SLURM_KEYS:
    monkeypatch.delenv(key, raising=False)

  def set_env(**kwargs):
    for key, value in _slurm_env(**kwargs).items():
      monkeypatch.setenv(key, value)
  return set_env


def _resolve():
  from trainer.distribute import strategy
  resolver = strategy.slurm_resolver()
  return (resolver.cluster_spec().as_dict(), resolver.task_type,
          resolver.task_id, resolver.num_accelerators())


def test_two_tasks_on_one_node(slurm):
  """TF 2.21's own resolver fails here on a CPU host (range step 0 for 0
  GPUs); trainer.distribute.strategy's subclass packs the tasks by node instead."""
  slurm(procid=1, ntasks=2, nodelist="127.0.0.1", tasks_per_node="2",
        port_base=23456)
  spec, task_type, task_id, accelerators = _resolve()
  assert spec == {"worker": ["127.0.0.1:23456", "127.0.0.1:23457"]}
  assert (task_type, task_id) == ("worker", 1)
  assert accelerators.get("GPU", 0) == 0   # the replica goes on the CPU
  assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_one_task_per_node_over_a_hostlist(slurm):
  slurm(procid=2, ntasks=4, nodelist="node[01-03],gpu7", tasks_per_node="1(x4)",
        port_base=8888)
  spec, task_type, task_id, _ = _resolve()
  assert spec == {"worker": ["gpu7:8888", "node01:8888", "node02:8888",
                             "node03:8888"]}   # sorted by host, as TF does
  assert (task_type, task_id) == ("worker", 2)


def test_uneven_tasks_per_node(slurm):
  slurm(procid=0, ntasks=3, nodelist="a,b", tasks_per_node="2,1",
        port_base=9000)
  spec, task_type, task_id, _ = _resolve()
  assert spec == {"worker": ["a:9000", "a:9001", "b:9000"]}
  assert (task_type, task_id) == ("worker", 0)


@pytest.mark.parametrize("change, message", [
    ({"SLURM_PROCID": None}, "SLURM_PROCID is not set"),
    ({"SLURM_STEP_NODELIST": None}, "SLURM_STEP_NODELIST is not set"),
    ({"SLURM_NTASKS": "3"}, "does not describe a cluster"),
    ({"SLURM_STEP_TASKS_PER_NODE": "two"}, "does not describe a cluster"),
    ({"SLURM_STEP_NODELIST": "node[1-"}, "does not describe a cluster"),
    ({"SLURM_PROCID": "5"}, "not a task of the 2"),
])
def test_bad_slurm_environment_is_a_user_error(slurm, monkeypatch, change,
                                               message):
  from trainer.errors import UserError
  slurm(procid=0, ntasks=2, nodelist="127.0.0.1", tasks_per_node="2",
        port_base=8888)
  for key, value in change.items():
    if value is None:
      monkeypatch.delenv(key)
    else:
      monkeypatch.setenv(key, value)
  with pytest.raises(UserError, match=message):
    _resolve()


def _two_free_consecutive_ports():
  for _ in range(50):
    port, = launch_cluster.free_ports(1)
    if port >= 65535:
      continue
    with socket.socket() as s:
      try:
        s.bind((launch_cluster.HOST, port + 1))
      except OSError:
        continue
    return port
  raise RuntimeError("no two consecutive free ports")


SGD = ["--dataset=digits", "--model=cnn", "--optimizer=sgd",
       "--learning_rate=0.05", "--global_batch_size=64", "--train_steps=20",
       "--steps_per_loop=10", "--summary_every=10", "--eval_every=0",
       "--mode=train", "--seed=3"]


def test_two_slurm_tasks_train_together(tmp_path):
  """Two processes with srun's variables for 2 tasks on one node
  (127.0.0.1) form one cluster and train together."""
  port = _two_free_consecutive_ports()
  model_dir = tmp_path / "slurm"
  procs = []
  try:
    for rank in (0, 1):
      e = env(**_slurm_env(rank, 2, "127.0.0.1", "2", port),
              TMPDIR=tmp_path)
      procs.append(subprocess.Popen(
          trainer_cmd(*SGD, "--strategy=multiworker",
                      "--cluster_resolver=slurm", "--peer_timeout_s=60",
                      f"--model_dir={model_dir}"),
          cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True, start_new_session=True))
    outputs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate(timeout=30)
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
    assert last_json(subprocess.CompletedProcess([], 0, out, err))[
        "global_step"] == 20
  for _, err in outputs:   # MWMS's own log line: one cluster of both tasks
    assert "num_workers = 2" in err, err[-3000:]
    assert f"'127.0.0.1:{port}', '127.0.0.1:{port + 1}'" in err
  # Both took the same updates (the loss is reduced across workers).
  results = [last_json(subprocess.CompletedProcess([], 0, out, err))
             for out, err in outputs]
  assert results[0]["train_loss"] == results[1]["train_loss"]
  assert (model_dir / "ckpt-20.index").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith("trainer-")]
