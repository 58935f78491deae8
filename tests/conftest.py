"""Shared test helpers: run the CLI in a subprocess, read checkpoints and
event files.

tests/unit/ holds in-process tests (one process, no trainer subprocess):
`pytest -m "not slow"` runs them alone, in a couple of minutes. tests/e2e/
holds the end-to-end ones (the CLI, launchers, clusters, resume after
kills); every test there is marked `slow` here."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if E2E in Path(str(item.fspath)).resolve().parents:
      item.add_marker(pytest.mark.slow)
SHARED = REPO.parent / "shared"
MNIST_DIR = SHARED / "data" / "mnist"

# Small and fast: the settings most CLI tests share.
FAST = ["--dataset=digits", "--global_batch_size=32", "--steps_per_loop=10",
        "--summary_every=10", "--eval_every=0"]


def env(**extra) -> dict:
  e = dict(os.environ)
  e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
  e.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  e.pop("TF_CONFIG", None)
  e.update({k: str(v) for k, v in extra.items()})
  return e


def trainer_cmd(*args) -> list[str]:
  return [sys.executable, "-m", "trainer.main", *args]


def run_trainer(*args, timeout=300, check=True, extra_env=None):
  """Runs `python -m trainer.main ARGS`; returns the CompletedProcess."""
  proc = subprocess.run(trainer_cmd(*args), cwd=REPO, env=env(**(extra_env or {})),
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"trainer exited {proc.returncode}\nSTDOUT:\n"
                         f"{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
  return proc


def last_json(proc) -> dict:
  lines = [l for l in proc.stdout.strip().splitlines() if l.strip()]
  assert lines, f"no stdout; stderr:\n{proc.stderr[-3000:]}"
  return json.loads(lines[-1])


def start_trainer(*args, extra_env=None, log_path=None):
  """Starts the trainer in the background (own process group)."""
  out = open(log_path, "w") if log_path else subprocess.DEVNULL
  return subprocess.Popen(trainer_cmd(*args), cwd=REPO, env=env(**(extra_env or {})),
                          stdout=out, stderr=subprocess.STDOUT,
                          start_new_session=True)


def stop(proc, sig=signal.SIGKILL, timeout=30):
  """Stops a process group for sure."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      pass
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=30)


def wait_for_file(path, proc, timeout=120):
  """Waits until `path` exists while `proc` still runs (fails otherwise)."""
  import time
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert proc.poll() is None, f"trainer exited {proc.returncode} early"
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.02)


# Not part of the trained state: how often save() ran, and the run's flags.
_NOT_STATE = ("save_counter/", "config/")


def checkpoint_weights(path) -> dict:
  """Every numeric variable of a checkpoint (prefix or directory) by key:
  model weights, optimizer slots and counters. (Keras 3 trainable weights
  are stored under optimizer/_trainable_variables/N: the object graph
  reaches them through the optimizer first.)"""
  import tensorflow as tf
  path = str(path)
  if os.path.isdir(path):
    path = tf.train.latest_checkpoint(path)
  reader = tf.train.load_checkpoint(path)
  return {k: reader.get_tensor(k)
          for k in reader.get_variable_to_shape_map()
          if k.endswith("VARIABLE_VALUE") and not k.startswith(_NOT_STATE)}


def checkpoint_value(path, key) -> np.ndarray:
  import tensorflow as tf
  return tf.train.load_checkpoint(str(path)).get_tensor(key)


def assert_weights_close(a: dict, b: dict, rtol=1e-5, atol=1e-6):
  assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def max_rel_diff(a: dict, b: dict) -> float:
  worst = 0.0
  for k in a:
    scale = max(float(np.max(np.abs(b[k]))), 1e-12)
    worst = max(worst, float(np.max(np.abs(a[k] - b[k]))) / scale)
  return worst


# ---- TensorBoard event files ------------------------------------------------
def event_accumulator(directory):
  """A loaded EventAccumulator of an event directory (all tensors kept)."""
  from tensorboard.backend.event_processing import event_accumulator as ea
  acc = ea.EventAccumulator(str(directory), size_guidance={"tensors": 0})
  acc.Reload()
  return acc


def event_values(directory, tag) -> dict:
  """{step: float value} of a scalar `tag` in an event directory."""
  from tensorboard.util import tensor_util
  acc = event_accumulator(directory)
  return {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
          for e in acc.Tensors(tag)}


def event_steps(directory, tag) -> list[int]:
  """Steps of every event of `tag`, in file order, repeats kept (raw event
  files: the accumulator would fold a step written twice)."""
  import tensorflow as tf
  steps = []
  for name in sorted(os.listdir(directory)):
    if name.startswith("events."):
      for event in tf.compat.v1.train.summary_iterator(
          os.path.join(directory, name)):
        if any(v.tag == tag for v in event.summary.value):
          steps.append(int(event.step))
  return steps


@pytest.fixture
def mnist_dir():
  if not MNIST_DIR.is_dir():
    pytest.skip(f"{MNIST_DIR} is absent: the shared MNIST files come with "
                "the CI checkout (../shared), not with a user's clone.")
  return MNIST_DIR
