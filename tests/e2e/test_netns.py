"""Two hosts for real: each worker in its own network namespace with its own
address (10.200.0.1 and 10.200.0.2 on a veth pair, which exist only inside
those namespaces). Training runs over that link; taking a link down mid-run
(no RST, the peer just goes silent) ends both workers within
--peer_timeout_s, and a relaunch resumes from the last checkpoint.

Needs root and iproute2 (`ip`); skips otherwise (CI: apt-get install -y
iproute2)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, env, stop_all
from launch import cluster as launch_cluster

pytestmark = pytest.mark.timeout(400)

ADDRESSES = ("10.200.0.1", "10.200.0.2")
PEER_TIMEOUT_S = 15
FLAGS = ["--strategy=multiworker", "--dataset=digits", "--model=cnn",
         "--optimizer=sgd", "--learning_rate=0.05", "--global_batch_size=64",
         "--steps_per_loop=10", "--summary_every=40", "--checkpoint_every=40",
         "--eval_every=0", "--mode=train", "--seed=3",
         f"--peer_timeout_s={PEER_TIMEOUT_S}"]


def _ip(*args, check=True):
  return subprocess.run(["ip", *args], capture_output=True, text=True,
                        timeout=30, check=check)


@pytest.fixture
def two_hosts():
  """[(namespace, interface)] for worker 0 and 1, linked by a veth pair;
  deleted (with their interfaces) after the test, whatever happened."""
  if os.geteuid() != 0:
    pytest.skip("network namespaces need root")
  if shutil.which("ip") is None:
    pytest.skip("iproute2 ('ip') is not installed")
  tag = f"mwt{os.getpid() % 100000}"
  hosts = [(f"{tag}a", f"{tag}va"), (f"{tag}b", f"{tag}vb")]
  created = []
  try:
    for ns, _ in hosts:
      proc = _ip("netns", "add", ns, check=False)
      if proc.returncode != 0:
        pytest.skip(f"'ip netns add' failed: {proc.stderr.strip()}")
      created.append(ns)
    (ns_a, if_a), (ns_b, if_b) = hosts
    _ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name",
        if_b, "netns", ns_b)
    for (ns, interface), address in zip(hosts, ADDRESSES):
      _ip("-n", ns, "addr", "add", f"{address}/24", "dev", interface)
      _ip("-n", ns, "link", "set", interface, "up")
      _ip("-n", ns, "link", "set", "lo", "up")
    yield hosts
  finally:
    for ns in created:
      _ip("netns", "del", ns, check=False)


def _start(hosts, model_dir, log_dir, attempt, *extra):
  ports = launch_cluster.free_ports(2)
  cluster = {"worker": [f"{a}:{p}" for a, p in zip(ADDRESSES, ports)]}
  procs = []
  for index, (ns, _) in enumerate(hosts):
    tf_config = json.dumps({"cluster": cluster,
                            "task": {"type": "worker", "index": index}})
    log = open(log_dir / f"{attempt}.worker{index}.log", "w")
    procs.append(subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "trainer.main",
         *FLAGS, f"--model_dir={model_dir}", *extra],
        cwd=REPO, env=env(TF_CONFIG=tf_config), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True))
    log.close()
  return procs




def _latest_step(model_dir):
  text = (model_dir / "checkpoint").read_text()
  return int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"', text).group(1))


def test_link_down_ends_both_workers_and_a_relaunch_resumes(two_hosts,
                                                            tmp_path):
  model_dir = tmp_path / "model"
  read = lambda name: (tmp_path / name).read_text()  # noqa: E731
  procs = _start(two_hosts, model_dir, tmp_path, "first",
                 "--train_steps=100000")
  try:
    deadline = time.monotonic() + 200
    while not (model_dir / "checkpoint").exists():
      assert all(p.poll() is None for p in procs), \
          read("first.worker0.log")[-3000:] + read("first.worker1.log")[-3000:]
      assert time.monotonic() < deadline, read("first.worker0.log")[-3000:]
      time.sleep(0.05)
    # Worker 1's host drops off the network: its packets go nowhere.
    _ip("-n", two_hosts[1][0], "link", "set", two_hosts[1][1], "down")
    down_at = time.monotonic()
    took = []
    for index, proc in enumerate(procs):
      left = down_at + PEER_TIMEOUT_S + 30 - time.monotonic()
      try:
        proc.wait(timeout=max(left, 1))
      except subprocess.TimeoutExpired:
        pytest.fail(f"worker {index} still running {PEER_TIMEOUT_S + 30} s "
                    f"after the link went down\n"
                    f"{read(f'first.worker{index}.log')[-3000:]}")
      took.append(time.monotonic() - down_at)
  finally:
    stop_all(procs)
  for index, proc in enumerate(procs):
    text = read(f"first.worker{index}.log")
    assert proc.returncode not in (0, None), text[-3000:]
    errors = [l for l in text.splitlines() if "error:" in l]
    assert len(errors) == 1, text[-3000:]
    assert "lost contact with a peer task" in errors[0], errors
  assert max(took) < PEER_TIMEOUT_S + 15, took
  print(f"after the link went down: worker exits after {took} s, codes "
        f"{[p.returncode for p in procs]}")

  # The relaunch: link up, both workers again, on to 40 steps further.
  _ip("-n", two_hosts[1][0], "link", "set", two_hosts[1][1], "up")
  saved = _latest_step(model_dir)
  assert saved > 0
  target = saved + 40
  procs = _start(two_hosts, model_dir, tmp_path, "second",
                 f"--train_steps={target}")
  try:
    for proc in procs:
      proc.wait(timeout=240)
  finally:
    stop_all(procs)
  for index, proc in enumerate(procs):
    text = read(f"second.worker{index}.log")
    assert proc.returncode == 0, text[-3000:]
    # stdout and stderr share the log: TF may log after the JSON line.
    results = [l for l in text.splitlines() if l.startswith("{")]
    assert results and json.loads(results[-1])["global_step"] == target, \
        text[-3000:]
  assert re.search(rf"restored \S+ckpt-{saved} at step {saved}",
                   read("second.worker0.log"))
  assert _latest_step(model_dir) == target
