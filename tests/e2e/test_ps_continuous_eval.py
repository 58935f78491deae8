"""--mode=continuous_eval as a side-car: it evaluates the checkpoints a
concurrent training run writes and stops after the one at --train_steps."""

import subprocess

import pytest

from conftest import REPO, env, last_json, start_trainer, stop, trainer_cmd, event_steps

pytestmark = pytest.mark.timeout(300)

COMMON = ["--model=cnn", "--dataset=digits", "--global_batch_size=32",
          "--train_steps=120", "--steps_per_loop=10", "--strategy=default"]




def test_continuous_eval_follows_a_concurrent_training_run(tmp_path):
  model_dir = tmp_path / "run"
  # The evaluator starts first and waits for checkpoints to appear.
  evaluator = subprocess.Popen(
      trainer_cmd(*COMMON, "--mode=continuous_eval", "--eval_timeout_s=120",
                  f"--model_dir={model_dir}"),
      cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, start_new_session=True)
  trainer = start_trainer(*COMMON, "--mode=train", "--checkpoint_every=20",
                          "--keep_checkpoints=10", "--summary_every=20",
                          f"--model_dir={model_dir}",
                          log_path=tmp_path / "train.log")
  try:
    assert trainer.wait(timeout=200) == 0, (tmp_path / "train.log").read_text()
    out, err = evaluator.communicate(timeout=120)
  finally:
    stop(trainer)
    stop(evaluator)
  assert evaluator.returncode == 0, err[-3000:]
  result = last_json(subprocess.CompletedProcess([], 0, out, err))
  assert result["global_step"] == 120
  assert result["checkpoint"].endswith("ckpt-120")
  written = {20, 40, 60, 80, 100, 120}
  assert {int(p.name[5:-6]) for p in model_dir.glob("ckpt-*.index")} == written
  evaluated = event_steps(model_dir / "eval", "accuracy")
  # Only checkpoints, each at most once, in order, ending with the last.
  assert evaluated and evaluated[-1] == 120, evaluated
  assert set(evaluated) <= written
  assert evaluated == sorted(set(evaluated))
