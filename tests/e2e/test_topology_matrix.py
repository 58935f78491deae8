"""--deterministic=topology, the full matrix (TRAINER_SLOW=1): 200 Adam
updates of the cnn with dropout on MNIST (digits when ../shared is absent
is NOT substituted: the test skips), of the resnet20 (batch norm) and of
the two-optimizer DCGAN, each on one replica, mirrored(2), mirrored(4) and
two workers (launch.local), each with --grad_accum_steps 1, 2 and 4, and a
run that starts on two workers, is SIGKILLed after its first checkpoint
and resumes on one: every checkpoint bit-identical to the one-replica run
(max abs difference 0.0). The cheap core is unit/test_topology.py."""

import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from conftest import (MNIST_DIR, REPO, checkpoint_weights, env,
                      run_trainer, stop_all, wait_for_file)

pytestmark = [
    pytest.mark.skipif(not os.environ.get("TRAINER_SLOW"),
                       reason="the full topology matrix takes long; set "
                       "TRAINER_SLOW=1"),
    pytest.mark.timeout(7200)]

UPDATES = 200
COMMON = ["--deterministic=topology", "--virtual_shards=16",
          "--global_batch_size=64", f"--train_steps={UPDATES}",
          "--optimizer=adam", "--mode=train", "--steps_per_loop=50",
          "--summary_every=100", "--eval_every=0", "--progress=log",
          f"--checkpoint_every={UPDATES // 2}", "--peer_timeout_s=120"]
MODELS = {
    # The shared MNIST holds its test split only.
    "cnn": ["--model=plugin_tasks:cnn_dropout", "--dataset=mnist",
            "--train_split=test"],
    "resnet20": ["--model=resnet20", "--dataset=digits"],
    "dcgan": ["--task=examples.dcgan:DCGAN", "--learning_rate=2e-4"],
}
TOPOLOGIES = {
    "default": [], "mirrored2": ["--strategy=mirrored", "--cpu_replicas=2"],
    "mirrored4": ["--strategy=mirrored", "--cpu_replicas=4"],
}


@pytest.fixture(autouse=True)
def _plugins_on_path(monkeypatch):
  # --model=plugin_tasks:cnn_dropout in every trainer and launcher child.
  monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))


def _flags(model, tmp_path, name, *extra):
  flags = [*COMMON, *MODELS[model], f"--model_dir={tmp_path / name}", *extra]
  if model == "cnn":
    # MNIST_DIR: where the shared MNIST files are, when not in ../shared.
    data = Path(os.environ.get("MNIST_DIR", MNIST_DIR))
    if not data.is_dir():
      pytest.skip(f"{data} is absent: the shared MNIST files come with the "
                  "CI checkout (../shared), or set MNIST_DIR.")
    flags.append(f"--data_dir={data}")
  return flags


def _workers(flags, log_path, timeout=1800):
  """Two workers via launch.local (no parameter servers); their exit."""
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.local", "--workers=2", "--ps=0",
         "--", "--strategy=multiworker", *flags],
        cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
      return proc, proc.wait(timeout=timeout)
    finally:
      stop_all([proc])


def _max_abs(a: dict, b: dict) -> float:
  assert a.keys() == b.keys() and a
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k])))
             for k in a)


@pytest.mark.parametrize("model", list(MODELS))
def test_every_topology_gives_the_same_bits(tmp_path, model):
  run_trainer(*_flags(model, tmp_path, "reference"), timeout=1800)
  reference = checkpoint_weights(tmp_path / "reference")
  diffs = {}
  for k in (1, 2, 4):
    for name, extra in TOPOLOGIES.items():
      if name == "default" and k == 1:
        continue
      run = f"{name}_k{k}"
      run_trainer(*_flags(model, tmp_path, run, *extra,
                          f"--grad_accum_steps={k}"), timeout=1800)
      diffs[run] = _max_abs(reference, checkpoint_weights(tmp_path / run))
    run = f"workers2_k{k}"
    _, code = _workers(_flags(model, tmp_path, run, f"--grad_accum_steps={k}"),
                       tmp_path / f"{run}.log")
    assert code == 0, (tmp_path / f"{run}.log").read_text()[-4000:]
    diffs[run] = _max_abs(reference, checkpoint_weights(tmp_path / run))
  # Two workers, SIGKILLed after the first checkpoint, resumed on one.
  flags = _flags(model, tmp_path, "resumed")
  log_path = tmp_path / "resumed.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.local", "--workers=2", "--ps=0",
         "--", "--strategy=multiworker", *flags],
        cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
      wait_for_file(tmp_path / "resumed" / f"ckpt-{UPDATES // 2}.index", proc,
                    timeout=1800)
    finally:
      stop_all([proc])
  assert not (tmp_path / "resumed" / f"ckpt-{UPDATES}.index").exists()
  run_trainer(*flags, timeout=1800)
  diffs["workers2_then_default"] = _max_abs(
      reference, checkpoint_weights(tmp_path / "resumed"))
  print(model, diffs)
  assert all(d == 0.0 for d in diffs.values()), diffs
