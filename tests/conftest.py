"""Shared test helpers: run the CLI in a subprocess, read checkpoints and
event files.

tests/unit/ holds in-process tests (one process, no trainer subprocess):
`pytest -m "not slow"` runs them alone, in a couple of minutes. tests/e2e/
holds the end-to-end ones (the CLI, launchers, clusters, resume after
kills); every test there is marked `slow` here."""

import atexit
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import forkserver

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# The trainer's caches (image_folder's listings, readers.folder_index) go to
# this test session's own directory, never the user's ~/.cache; every
# trainer subprocess inherits it.
_CACHE = tempfile.mkdtemp(prefix="trainer-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)
E2E = Path(__file__).resolve().parent / "e2e"


# Each test file's seconds in the last recorded run (`make durations`).
DURATIONS = Path(__file__).resolve().parent / "durations.json"


def pytest_collection_modifyitems(config, items):
  for item in items:
    if E2E in Path(str(item.fspath)).resolve().parents:
      item.add_marker(pytest.mark.slow)
  if hasattr(config, "workerinput"):   # an xdist worker (`make test`)
    _longest_files_first(items)


def _longest_files_first(items) -> None:
  """`make test` hands whole files to two workers in collection order
  (--dist loadfile --no-loadscope-reorder); longest first, so that the
  last files to start are short and the workers end together (a 75 s
  file started last would leave the other worker idle that long). A file
  missing from durations.json (new) counts as the longest: it starts
  early, where its length does the least harm. Every worker sorts the
  same collection the same way, as xdist requires."""
  try:
    known = json.loads(DURATIONS.read_text())
  except (OSError, ValueError):
    return
  unknown = max(known.values(), default=0.0) + 1.0
  first_seen = {}
  for item in items:
    first_seen.setdefault(_file_of(item.nodeid), len(first_seen))
  items.sort(key=lambda item: (-known.get(_file_of(item.nodeid), unknown),
                               first_seen[_file_of(item.nodeid)]))


def _file_of(nodeid: str) -> str:
  return nodeid.split("::", 1)[0]


_SECONDS = {}


def pytest_runtest_logreport(report):
  """Sums each file's setup, call and teardown seconds (in the xdist
  controller, every worker's reports) for `make durations`."""
  name = _file_of(report.nodeid)
  _SECONDS[name] = _SECONDS.get(name, 0.0) + report.duration


def pytest_sessionfinish(session):
  target = os.environ.get("TRAINER_WRITE_DURATIONS")
  if target and not hasattr(session.config, "workerinput") and _SECONDS:
    Path(target).write_text(json.dumps(
        {k: round(v, 1) for k, v in sorted(_SECONDS.items())}, indent=0)
        + "\n")


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


# `python -m` runs are forks of a server that imported TensorFlow once
# (tests/forkserver.py says what it carries and when it steps aside).
_FORKS = forkserver.Server(_CACHE, str(REPO))
atexit.register(_FORKS.close)


def run_module(module: str, args, timeout: float, extra_env=None,
               cwd=REPO) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` with the output captured, as subprocess.run
  would (TimeoutExpired after killing it on timeout)."""
  run_env = env(**(extra_env or {}))
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    proc = _FORKS.popen(module, list(args), run_env, cwd, stdout=out,
                        stderr=err, new_session=True)
    if proc is None:
      return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                            env=run_env, capture_output=True, text=True,
                            timeout=timeout)
    try:
      code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      _kill_group(proc.pid)
      proc.wait(timeout=30)
      raise
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(
        proc.args, code, out.read().decode(errors="replace"),
        err.read().decode(errors="replace"))


def _kill_group(pid: int) -> None:
  try:
    os.killpg(pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def run_trainer(*args, timeout=300, check=True, extra_env=None):
  """Runs `python -m trainer.main ARGS`; returns the CompletedProcess."""
  proc = run_module("trainer.main", args, timeout, extra_env)
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
  run_env = env(**(extra_env or {}))
  with open(log_path or os.devnull, "w") as out:
    proc = _FORKS.popen("trainer.main", list(args), run_env, REPO,
                        stdout=out, stderr=out, new_session=True)
    if proc is None:
      proc = subprocess.Popen(trainer_cmd(*args), cwd=REPO, env=run_env,
                              stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)
  return proc


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
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert proc.poll() is None, f"trainer exited {proc.returncode} early"
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.02)


def kill_and_resume(flags, model_dir, first_step: int, last_step: int,
                    jitter_s: float = 0.3, extra_env=None):
  """Starts the trainer with `flags` into `model_dir`, SIGKILLs it a random
  moment (up to jitter_s) after ckpt-<first_step> appears, then runs it
  again to the end; checks the second run restored a step in
  [first_step, last_step). Returns the second run's CompletedProcess."""
  import random
  import re
  proc = start_trainer(*flags, f"--model_dir={model_dir}",
                       extra_env=extra_env)
  try:
    wait_for_file(Path(model_dir) / f"ckpt-{first_step}.index", proc,
                  timeout=240)
    time.sleep(random.uniform(0.0, jitter_s))
    assert stop(proc, signal.SIGKILL) == -signal.SIGKILL
  finally:
    stop(proc)
  resumed = run_trainer(*flags, f"--model_dir={model_dir}",
                        extra_env=extra_env)
  match = re.search(r"restored \S+ at step (\d+)", resumed.stderr)
  assert match and first_step <= int(match.group(1)) < last_step, (
      resumed.stderr[-2000:])
  return resumed


def stop_all(procs, timeout=30):
  """SIGKILLs every process group of `procs` still running and reaps them."""
  for proc in procs:
    if proc.poll() is None:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)


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


@pytest.fixture(autouse=True)
def _absl_verbosity_restored():
  """In-process callers of main()s (bench, trainer) may change absl's
  verbosity; a later test reading log records (caplog) must not depend on
  which test ran before it in the same worker."""
  from absl import logging
  previous = logging.get_verbosity()
  yield
  logging.set_verbosity(previous)


@pytest.fixture
def mnist_dir():
  if not MNIST_DIR.is_dir():
    pytest.skip(f"{MNIST_DIR} is absent: the shared MNIST files come with "
                "the CI checkout (../shared), not with a user's clone.")
  return MNIST_DIR


# ---- data files -----------------------------------------------------------
def cifar_batch(n, seed):
  """(data uint8 [n,3072] channel-major, labels list) of n random images."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 3072), dtype=np.uint8), \
      [int(x) for x in rng.integers(0, 10, n)]


def write_cifar_python(path, data, labels):
  with open(path, "wb") as f:
    pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)


def write_cifar_binary(path, data, labels):
  records = np.concatenate([np.array(labels, np.uint8)[:, None], data], axis=1)
  records.tofile(path)


def write_cifar(root, fmt, sizes=(2, 3, 2, 1, 2), test_size=3, skip=()):
  """Five data batches and a test batch; returns {split: (data, labels)}."""
  directory, suffix, write = {
      "py": ("cifar-10-batches-py", "", write_cifar_python),
      "bin": ("cifar-10-batches-bin", ".bin", write_cifar_binary)}[fmt]
  directory = root / directory
  directory.mkdir()
  batches = [cifar_batch(n, seed=i) for i, n in enumerate(sizes + (test_size,))]
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  for name, (data, labels) in zip(names, batches):
    if name not in skip:
      write(directory / (name + suffix), data, labels)
  train = (np.concatenate([d for d, _ in batches[:5]]),
           np.concatenate([l for _, l in batches[:5]]))
  return directory, {"train": train, "test": batches[5]}


def write_photo_folder(root, per_class: int, part: str, seed: int):
  """Crops of scikit-learn's two real photographs, of many sizes, as JPEG
  (RGB), grayscale PNG and RGBA PNG; train crops come from the left 60% of
  each photo, test crops from the right 40% (no pixel in both)."""
  import sklearn
  import tensorflow as tf
  rng = np.random.default_rng(seed)
  base = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
  for name in ("china", "flower"):
    photo = tf.io.decode_jpeg(tf.io.read_file(
        os.path.join(base, name + ".jpg"))).numpy()
    h, w = photo.shape[:2]
    x0, x1 = (0, int(w * 0.6)) if part == "train" else (int(w * 0.6), w)
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      ch = int(rng.integers(20, 160))
      cw = int(rng.integers(20, min(160, x1 - x0)))
      y, x = int(rng.integers(0, h - ch)), int(rng.integers(x0, x1 - cw))
      crop = photo[y:y + ch, x:x + cw]
      if i % 3 == 0:
        data, ext = tf.io.encode_jpeg(crop), "jpg"
      elif i % 3 == 1:
        data, ext = tf.io.encode_png(tf.image.rgb_to_grayscale(crop)), "png"
      else:
        alpha = np.full(crop.shape[:2] + (1,), 255, np.uint8)
        data, ext = tf.io.encode_png(np.concatenate([crop, alpha], -1)), "png"
      with open(os.path.join(root, name, f"{i:04d}.{ext}"), "wb") as f:
        f.write(data.numpy())


# ---- a local parameter-server cluster -------------------------------------
# Small and fast; train summaries every 50 updates = one coordinator round.
PS_FLAGS = ["--strategy=parameter_server", "--model=cnn", "--dataset=digits",
            "--global_batch_size=32", "--steps_per_loop=20",
            "--summary_every=50", "--eval_every=0", "--progress=log"]


class Cluster:
  """`python -m launch.local --workers=N --ps=M -- FLAGS` in the background,
  output in a log file; finds its server processes through /proc."""

  def __init__(self, tmp_path, flags, workers=2, ps=1, name="launch",
               launcher_flags=()):
    self.log_path = tmp_path / f"{name}.log"
    self._log = open(self.log_path, "w")
    cmd = [sys.executable, "-m", "launch.local", f"--workers={workers}",
           f"--ps={ps}", "--timeout_s=240", "--grace_s=5", *launcher_flags,
           "--", *flags]
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=self._log,
                                 stderr=subprocess.STDOUT,
                                 start_new_session=True)
    self.seen = {}

  def log(self) -> str:
    return self.log_path.read_text(errors="replace")

  def children(self) -> dict:
    """'worker0' / 'ps0' / 'chief0' -> pid, for the launcher's children."""
    found = {}
    for entry in os.listdir("/proc"):
      if not entry.isdigit():
        continue
      try:
        with open(f"/proc/{entry}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        if ppid != self.proc.pid:
          continue
        with open(f"/proc/{entry}/environ", "rb") as f:
          environ = f.read().split(b"\0")
      except (OSError, ValueError, IndexError):
        continue
      for item in environ:
        if item.startswith(b"TF_CONFIG="):
          task = json.loads(item[len(b"TF_CONFIG="):])["task"]
          found[f"{task['type']}{task['index']}"] = int(entry)
    self.seen.update(found)
    return found

  def wait_for(self, predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if predicate():
        return
      if self.proc.poll() is not None:
        raise AssertionError(f"launcher exited {self.proc.returncode} before "
                             f"{what}:\n{self.log()[-4000:]}")
      time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s:\n{self.log()[-4000:]}")

  def wait(self, timeout) -> int:
    return self.proc.wait(timeout=timeout)

  def stop(self):
    """Stops the launcher (its children die with it: PDEATHSIG) and any
    child of it still alive."""
    if self.proc.poll() is None:
      self.children()
      try:
        os.killpg(self.proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      pass
    for pid in self.seen.values():
      try:
        os.kill(pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    self._log.close()
