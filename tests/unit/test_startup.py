"""Start-up: the CLI's TensorFlow import leaves scikit-learn out (Keras
imports it for its wrappers: ~0.8 s of every trainer process), and the
digits set read without scikit-learn equals load_digits."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, env

pytestmark = pytest.mark.timeout(300)


def test_digits_read_directly_equal_load_digits():
  from sklearn.datasets import load_digits
  from trainer.data.readers import digits
  reference = load_digits()
  images, target = digits._digits()  # noqa: SLF001
  assert images.dtype == reference.images.dtype
  np.testing.assert_array_equal(images, reference.images)
  np.testing.assert_array_equal(target, reference.target)


def test_cli_import_and_digits_leave_sklearn_unloaded():
  code = (
      "import sys\n"
      "from trainer import tfimport\n"
      "tf = tfimport.import_tensorflow()\n"
      "from trainer.data.readers import digits\n"
      "parts = digits.load_arrays()\n"
      "print('sklearn' in sys.modules, tf.__name__, len(parts['train'][1]))\n"
      "import sklearn.datasets\n"   # a task's own import still works
      "print(sklearn.datasets.load_digits().target.shape[0])\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["False", "tensorflow", "1500", "1797"]
