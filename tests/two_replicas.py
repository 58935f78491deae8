"""Checks on two replicas of one CPU. TensorFlow must be told of the
logical devices before it initialises any, so the mirrored(2) checks of
several test files run together in ONE child pytest process (one
TensorFlow start for all of them). A test file imports IN_CHILD from here
before TensorFlow runs anything, marks its child tests with it, and one
parent test calls run_child."""

import os
from pathlib import Path
import subprocess
import sys

ENV = "TWO_REPLICAS_CHILD"
IN_CHILD = os.environ.get(ENV) == "1"
if IN_CHILD:
  import tensorflow as tf
  tf.config.set_logical_device_configuration(
      tf.config.list_physical_devices("CPU")[0],
      [tf.config.LogicalDeviceConfiguration()] * 2)

REPO = Path(__file__).resolve().parents[1]


def run_child(tests: list[str], passed: int, timeout_s: float = 400):
  """Runs the node ids `tests` (paths relative to the repo) in a child
  with two logical CPUs; every one of the `passed` tests must pass."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **{ENV: "1"})
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"),
                                       env.get("PYTHONPATH", "")])
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly",
       "-p", "no:cacheprovider", *tests],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
  assert f"{passed} passed" in proc.stdout, proc.stdout[-2000:]
