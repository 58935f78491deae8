"""No code runs from data files: a crafted CIFAR-10 python batch is refused
before any of it runs, and no reader uses pickle, eval or allow_pickle=True."""

import os
import pickle
import re

import pytest

from conftest import REPO, run_trainer
from conftest import cifar_batch, write_cifar
from trainer.data import registry
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(180)


class _Payload:
  """Unpickling this runs `command` (what a hostile data_batch_1 does)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def _hostile_batch(path, marker):
  data, labels = cifar_batch(2, seed=0)
  batch = {b"data": data, b"labels": [int(l) for l in labels],
           b"batch_label": _Payload(f"touch {marker}")}
  path.write_bytes(pickle.dumps(batch, protocol=2))


def test_hostile_pickle_is_refused_before_it_runs(tmp_path):
  directory, _ = write_cifar(tmp_path, "py")
  marker = tmp_path / "ran"
  _hostile_batch(directory / "data_batch_1", marker)
  with pytest.raises(UserError) as e:
    registry.get("cifar10")("train", registry.DataArgs(data_dir=str(directory)))
  assert not marker.exists()
  message = str(e.value)
  assert "data_batch_1" in message and re.search(r"(posix|os)\.system",
                                                 message), message
  assert "\n" not in str(e.value)
  # The same file through the CLI: exit 2, one line, nothing ran or written.
  model_dir = tmp_path / "run"
  proc = run_trainer("--dataset=cifar10", f"--data_dir={tmp_path}",
                     "--global_batch_size=2", "--train_steps=1",
                     f"--model_dir={model_dir}", check=False, timeout=150)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1 and "refusing CIFAR-10 batch" in errors[0], errors
  assert "Traceback" not in proc.stderr
  assert not marker.exists() and not model_dir.exists()


def test_real_format_pickles_still_load(tmp_path):
  """Protocol 2 with NumPy 1's module names (numpy.core.multiarray, as the
  published files use) and protocol 4 with NumPy 2's both load."""
  directory, expected = write_cifar(tmp_path, "py")
  data, labels = cifar_batch(3, seed=9)
  old = pickle.dumps({b"data": data, b"labels": [int(l) for l in labels],
                      b"batch_label": b"testing batch 1 of 1",
                      b"filenames": [b"a.png", b"b.png", b"c.png"]}, protocol=2)
  old = old.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  assert b"numpy.core.multiarray" in old
  (directory / "test_batch").write_bytes(old)
  source = registry.get("cifar10")("test",
                                   registry.DataArgs(data_dir=str(directory)))
  assert source.num_examples == 3
  (directory / "test_batch").write_bytes(pickle.dumps(
      {b"data": data, b"labels": list(map(int, labels))}, protocol=4))
  os.utime(directory / "test_batch", ns=(1, 1))   # a new cache key
  assert registry.get("cifar10")(
      "test", registry.DataArgs(data_dir=str(directory))).num_examples == 3


def test_no_reader_unpickles_or_evals_user_data():
  """A grep of every module that reads files: no pickle.load(s), eval, exec
  or allow_pickle=True; cifar10's restricted unpickler is the one exception."""
  # eval/exec as calls of the builtins (not a method or `def eval(self)`).
  bad = re.compile(r"pickle\.loads?\(|(?<![\w.])(?<!def )eval\(|"
                   r"(?<![\w.])(?<!def )exec\(|allow_pickle\s*=\s*True"
                   r"|yaml\.load\(|marshal\.loads?\(")
  found = []
  for root in ("trainer", "launch", "layers"):
    for dirpath, _, files in os.walk(REPO / root):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(dirpath, name)
          for n, line in enumerate(open(path), 1):
            if bad.search(line.split("#")[0]):
              found.append(f"{path}:{n}: {line.strip()}")
  assert not found, found
