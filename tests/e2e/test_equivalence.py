"""The same global batch gives the same update whatever the topology."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, assert_weights_close, checkpoint_weights, env, run_trainer

pytestmark = pytest.mark.timeout(600)

SGD = ["--dataset=digits", "--optimizer=sgd", "--learning_rate=0.05",
       "--global_batch_size=64", "--train_steps=20", "--steps_per_loop=5",
       "--summary_every=10", "--eval_every=0", "--mode=train", "--seed=3"]


def _weights(tmp_path, name, *args):
  model_dir = tmp_path / name
  run_trainer(*SGD, f"--model_dir={model_dir}", *args)
  return checkpoint_weights(model_dir / "ckpt-20")


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_mirrored_two_replicas_equals_default(tmp_path, model):
  """20 SGD steps; mlp has dropout, so this also checks that masks do not
  depend on how the batch is split."""
  single = _weights(tmp_path, "default", f"--model={model}")
  mirrored = _weights(tmp_path, "mirrored", f"--model={model}",
                      "--strategy=mirrored", "--cpu_replicas=2")
  assert_weights_close(mirrored, single, rtol=1e-5)
  # The runs really trained: the weights moved from their initial values.
  moved = _weights(tmp_path, "short", f"--model={model}", "--train_steps=20",
                   "--learning_rate=0.0001")
  assert any(abs(single[k] - moved[k]).max() > 1e-3 for k in single)


def test_accumulation_equals_one_big_batch(tmp_path):
  one = _weights(tmp_path, "k1", "--grad_accum_steps=1")
  four = _weights(tmp_path, "k4", "--grad_accum_steps=4")
  assert_weights_close(four, one, rtol=1e-5)
  mirrored_four = _weights(tmp_path, "m2k4", "--grad_accum_steps=4",
                           "--strategy=mirrored", "--cpu_replicas=2")
  assert_weights_close(mirrored_four, one, rtol=1e-5)


def test_accumulation_differs_from_a_small_batch(tmp_path):
  """Guards the test above: K micro-batches are not K updates."""
  one = _weights(tmp_path, "k1", "--grad_accum_steps=1")
  small = _weights(tmp_path, "b16", "--global_batch_size=16")
  assert any(abs(one[k] - small[k]).max() > 1e-4 for k in one)


@pytest.mark.parametrize("replicas, accum", [(2, 4), (2, 1), (1, 4)])
def test_one_cross_replica_reduction_per_update(tmp_path, replicas, accum):
  updates = 6
  proc = subprocess.run(
      [sys.executable, str(REPO / "tests" / "scripts" / "count_reductions.py"),
       str(tmp_path / "run"), str(replicas), str(accum), str(updates)],
      cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  counts = json.loads(proc.stdout.strip().splitlines()[-1])
  assert counts["replicas"] == replicas
  # Each replica takes part in each reduction once: R per reduction.
  assert counts["reductions"] == updates * replicas, counts
