"""Exact resume: interrupted + resumed runs equal uninterrupted ones."""

import random
import re
import signal
import time

import numpy as np
import pytest

from conftest import (REPO, assert_weights_close, checkpoint_value,
                      checkpoint_weights, last_json, max_rel_diff, run_trainer,
                      start_trainer, stop, event_values, wait_for_file)

pytestmark = pytest.mark.timeout(900)

# mlp has dropout; adam has slots: both must resume exactly.
MLP = ["--model=mlp", "--optimizer=adam", "--dataset=digits",
       "--global_batch_size=32", "--train_steps=150", "--steps_per_loop=1",
       "--checkpoint_every=10", "--summary_every=50", "--eval_every=0",
       "--mode=train", "--seed=7"]
TESTS = str(REPO / "tests")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  """150 uninterrupted steps."""
  model_dir = tmp_path_factory.mktemp("a") / "run"
  run_trainer(*MLP, f"--model_dir={model_dir}")
  return checkpoint_weights(model_dir / "ckpt-150")




def _interrupt(model_dir, sig, extra=(), log=None):
  """Starts the run, signals it at a random moment after the first
  checkpoint, returns (exit code, log text)."""
  proc = start_trainer(*MLP, f"--model_dir={model_dir}", *extra,
                       log_path=log)
  try:
    wait_for_file(model_dir / "ckpt-10.index", proc)
    time.sleep(random.uniform(0.0, 0.6))
    if sig == signal.SIGKILL:
      code = stop(proc, signal.SIGKILL)
    else:
      proc.send_signal(sig)
      code = proc.wait(timeout=120)
  finally:
    stop(proc)
  return code, open(log).read() if log else ""


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, run_a):
  model_dir = tmp_path / "run"
  code, _ = _interrupt(model_dir, signal.SIGKILL)
  assert code == -signal.SIGKILL
  resumed = run_trainer(*MLP, f"--model_dir={model_dir}")
  match = re.search(r"restored \S+ at step (\d+)", resumed.stderr)
  assert match and 10 <= int(match.group(1)) < 150, resumed.stderr[-2000:]
  assert last_json(resumed)["global_step"] == 150
  b = checkpoint_weights(model_dir / "ckpt-150")
  assert max_rel_diff(b, run_a) <= 1e-6


def test_sigterm_saves_at_the_signal_step_and_resumes(tmp_path, run_a):
  model_dir = tmp_path / "run"
  log = tmp_path / "log.txt"
  code, text = _interrupt(model_dir, signal.SIGTERM, log=str(log))
  assert code == 75, text[-2000:]                  # documented: preempted
  summary = [l for l in text.splitlines() if l.startswith("{")]
  step = int(re.search(r'"global_step": (\d+)', summary[-1]).group(1))
  assert '"preempted": true' in summary[-1]
  assert (model_dir / f"ckpt-{step}.index").exists()   # zero lost steps
  assert int(checkpoint_value(model_dir / f"ckpt-{step}",
                              "global_step/.ATTRIBUTES/VARIABLE_VALUE")) == step
  resumed = run_trainer(*MLP, f"--model_dir={model_dir}")
  assert f"at step {step}" in resumed.stderr
  assert max_rel_diff(checkpoint_weights(model_dir / "ckpt-150"),
                      run_a) <= 1e-6


def test_deterministic_runs_are_bit_identical(tmp_path):
  det = ["--deterministic", "--train_steps=60"]
  first, second, killed = (tmp_path / n for n in ("first", "second", "killed"))
  run_trainer(*MLP, *det, f"--model_dir={first}")
  run_trainer(*MLP, *det, f"--model_dir={second}")
  a = checkpoint_weights(first / "ckpt-60")
  for key, value in checkpoint_weights(second / "ckpt-60").items():
    assert np.array_equal(value, a[key]), key
  code, _ = _interrupt(killed, signal.SIGKILL, extra=det)
  run_trainer(*MLP, *det, f"--model_dir={killed}")
  for key, value in checkpoint_weights(killed / "ckpt-60").items():
    assert np.array_equal(value, a[key]), key


def test_truncated_newest_checkpoint_falls_back(tmp_path, run_a):
  model_dir = tmp_path / "run"
  run_trainer(*MLP, f"--model_dir={model_dir}", "--train_steps=100",
              "--checkpoint_every=50")
  data = next(model_dir.glob("ckpt-100.data-*"))
  data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  resumed = run_trainer(*MLP, f"--model_dir={model_dir}",
                        "--checkpoint_every=50")
  assert re.search(r"checkpoint \S+ckpt-100 is damaged .*using \S+ckpt-50",
                   resumed.stderr), resumed.stderr[-3000:]
  assert "at step 50" in resumed.stderr
  assert max_rel_diff(checkpoint_weights(model_dir / "ckpt-150"),
                      run_a) <= 1e-6


def test_topology_change_mirrored_to_default(tmp_path):
  cnn = ["--model=cnn", "--optimizer=sgd", "--learning_rate=0.05",
         "--dataset=digits", "--global_batch_size=32", "--steps_per_loop=10",
         "--checkpoint_every=50", "--summary_every=50", "--eval_every=0",
         "--mode=train", "--seed=5"]
  straight, changed = tmp_path / "straight", tmp_path / "changed"
  run_trainer(*cnn, f"--model_dir={straight}", "--train_steps=100")
  run_trainer(*cnn, f"--model_dir={changed}", "--train_steps=50",
              "--strategy=mirrored", "--cpu_replicas=2")
  run_trainer(*cnn, f"--model_dir={changed}", "--train_steps=100")
  assert_weights_close(checkpoint_weights(changed / "ckpt-100"),
                       checkpoint_weights(straight / "ckpt-100"), rtol=1e-5)


def test_changed_batch_size_warns(tmp_path):
  model_dir = tmp_path / "run"
  run_trainer(*MLP, f"--model_dir={model_dir}", "--train_steps=10")
  proc = run_trainer(*MLP, f"--model_dir={model_dir}", "--train_steps=20",
                     "--global_batch_size=64")
  assert "the sequence of batches" in proc.stderr
  assert int(checkpoint_value(
      model_dir / "ckpt-20", "state/position/.ATTRIBUTES/VARIABLE_VALUE")) \
      == 10 * 32 + 10 * 64


@pytest.mark.parametrize("mode", ["rollback", "skip"])
def test_injected_nan_never_reaches_the_weights(tmp_path, mode):
  model_dir = tmp_path / "run"
  proc = run_trainer("--task=plugin_tasks:NanDigits", "--optimizer=adam",
                     "--global_batch_size=32", "--train_steps=40",
                     "--steps_per_loop=5", "--checkpoint_every=2",
                     "--summary_every=10", "--eval_every=0", "--mode=train",
                     f"--nonfinite={mode}", f"--model_dir={model_dir}",
                     extra_env={"PYTHONPATH": TESTS})
  result = last_json(proc)
  assert result["global_step"] == 40 and result["nonfinite_steps"] == 1
  weights = checkpoint_weights(model_dir / "ckpt-40")
  assert all(np.all(np.isfinite(w)) for w in weights.values())
  assert "non-finite update(s) dropped" in proc.stderr
  if mode == "rollback":
    assert "rolled back to" in proc.stderr
  counts = event_values(model_dir / "train", "nonfinite_steps")
  assert counts[max(counts)] == 1.0


def test_nonfinite_fail_mode_exits_3(tmp_path):
  proc = run_trainer("--task=plugin_tasks:NanDigits", "--train_steps=40",
                     "--global_batch_size=32", "--steps_per_loop=5",
                     "--eval_every=0", "--nonfinite=fail",
                     f"--model_dir={tmp_path / 'run'}", check=False,
                     extra_env={"PYTHONPATH": TESTS})
  assert proc.returncode == 3
  assert "non-finite loss or gradient at example position 96" in proc.stderr
