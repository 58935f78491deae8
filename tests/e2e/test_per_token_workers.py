"""Per-token losses under 2 workers (launch.local, --strategy=multiworker):
padded and packed rows with ctx.scale_loss(mean_over="weights") and 2 micro-batches
equal the hand-written full-batch loop that divides by the update's
real-token count; Keras' own Adam(gradient_accumulation_steps=5) is refused
on every worker with one line, exit 2. tests/tiny_lm.py holds the tasks
and the loop (tests/unit/test_weighted_loss.py runs them in one process)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, env
import tiny_lm

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not os.environ.get("TRAINER_SLOW"),
                       reason="two launch.local jobs (~4 trainer processes); "
                              "set TRAINER_SLOW=1")]

FLAGS = dict(global_batch_size=tiny_lm.BATCH, train_steps=tiny_lm.UPDATES,
             steps_per_loop=tiny_lm.UPDATES, summary_every=tiny_lm.UPDATES,
             checkpoint_every=tiny_lm.UPDATES, eval_every=0, mode="train",
             optimizer="sgd", learning_rate=tiny_lm.LR, seed=1,
             grad_accum_steps=2)   # tiny_lm.tiny_config's, with K = 2
TASKS_ENV = {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
             "TF_CPP_MIN_LOG_LEVEL": "2"}


def _launch(tmp_path, task: str, timeout=500):
  """launch.local --workers=2 of tiny_lm's `task`; (returncode, output)."""
  tmpdir = tmp_path / "tmp"
  tmpdir.mkdir(exist_ok=True)
  cmd = [sys.executable, "-m", "launch.local", "--workers=2", "--grace_s=5",
         f"--timeout_s={timeout - 20}", "--",
         "--strategy=multiworker", "--peer_timeout_s=60",
         f"--task=tiny_lm:{task}", "--progress=log",
         *(f"--{k}={v}" for k, v in FLAGS.items()),
         f"--model_dir={tmp_path / 'run'}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env(TMPDIR=tmpdir, **TASKS_ENV),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=timeout)
  return proc.returncode, proc.stdout


@pytest.mark.parametrize("task_name", ["TinyLM", "PackedLM"])
def test_two_workers_per_token_mean_equals_full_batch_loop(tmp_path,
                                                           task_name):
  # TinyLM: one padded document a row; PackedLM: several a row.
  import trainer
  from trainer import controller as controller_lib
  code, output = _launch(tmp_path, task_name)
  assert code == 0, output[-5000:]
  # The initial weights are the seed's (the same in one process) and the
  # loop sees the same global batches.
  config = tiny_lm.tiny_config(tmp_path / "single", grad_accum_steps=2)
  task = getattr(tiny_lm, task_name)(config)
  initial = controller_lib.create(config, task).model.get_weights()
  reference = tiny_lm.hand_written(config, task, initial)
  _, model = trainer.load(str(tmp_path / "run"))
  weights = model.get_weights()
  assert tiny_lm.rel(weights, reference) < 2e-5
  assert tiny_lm.rel(reference, initial) > 1e-2   # the weights moved


def test_two_workers_refuse_keras_gradient_accumulation(tmp_path):
  code, output = _launch(tmp_path, "RefusedAccumulation", timeout=300)
  assert code == 2, output[-5000:]
  assert "Traceback" not in output, output[-5000:]
  for worker in (0, 1):
    errors = [l for l in output.splitlines()
              if l.startswith(f"[worker {worker}] trainer.main: error:")]
    assert len(errors) == 1, output[-5000:]
    assert "gradient_accumulation_steps=5" in errors[0], errors
    assert "--grad_accum_steps" in errors[0], errors
