"""The issue-14 examples run with one command each and do what they say:
distillation from a frozen teacher run, SimCLR then a linear probe,
per-group optimizers, EMA on the cnn."""

import numpy as np
import pytest

from conftest import FAST, checkpoint_weights, last_json, run_trainer

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """The built-in cnn, trained by an earlier run with a moving average."""
  model_dir = tmp_path_factory.mktemp("teacher") / "run"
  result = last_json(run_trainer(*FAST, "--model=cnn", "--train_steps=150",
                                 "--ema_decay=0.9",
                                 f"--model_dir={model_dir}"))
  assert result["eval_accuracy"] >= 0.85
  return model_dir


def test_distilled_student_learns_from_the_frozen_teacher(tmp_path, teacher):
  student = tmp_path / "student"
  proc = run_trainer(*FAST, "--task=examples.distill:Distill",
                     f"--task_args=teacher_dir={teacher}",
                     "--train_steps=300", f"--model_dir={student}")
  assert last_json(proc)["eval_accuracy"] >= 0.85
  # The teacher in the student's checkpoint is the teacher run's model
  # with its moving average swapped in (as its evaluation used it),
  # untouched by 300 updates (frozen), and saved under model/teacher.
  saved = checkpoint_weights(student)
  theirs = checkpoint_weights(teacher)
  teacher_keys = [k for k in saved if k.startswith("model/teacher/")]
  originals = sorted(k for k in theirs if k.startswith("ema/averages/"))
  assert teacher_keys and len(teacher_keys) == len(originals)
  mine = sorted(saved[k].tobytes() for k in teacher_keys)
  assert mine == sorted(theirs[k].tobytes() for k in originals)


def test_distill_refuses_a_missing_teacher(tmp_path):
  proc = run_trainer(*FAST, "--task=examples.distill:Distill",
                     f"--task_args=teacher_dir={tmp_path / 'nothing'}",
                     "--train_steps=10", f"--model_dir={tmp_path / 's'}",
                     check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "teacher_dir" in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "s").exists()


def test_simclr_then_linear_probe(tmp_path):
  encoder = tmp_path / "simclr"
  pretrain = last_json(run_trainer(
      "--task=examples.simclr:SimCLR", "--train_steps=300",
      "--global_batch_size=128", "--optimizer=adam", "--learning_rate=0.003",
      "--eval_every=0", f"--model_dir={encoder}"))
  assert pretrain["eval_alignment"] > 0.9
  probe = last_json(run_trainer(
      "--task=examples.simclr:LinearProbe",
      f"--task_args=encoder_dir={encoder}", "--train_steps=300",
      "--optimizer=adam", "--learning_rate=0.01", "--eval_every=0",
      f"--model_dir={tmp_path / 'probe'}"))
  assert probe["eval_accuracy"] >= 0.85


def test_lr_groups_trains_one_model_with_adam_and_lion(tmp_path):
  proc = run_trainer(*FAST, "--task=examples.lr_groups:LrGroups",
                     "--train_steps=300", f"--model_dir={tmp_path / 'run'}")
  assert last_json(proc)["eval_accuracy"] >= 0.9
  # One model; two optimizers, each with its own iteration count.
  weights = checkpoint_weights(tmp_path / "run")
  assert int(weights["optimizer/body/_iterations/.ATTRIBUTES/"
                     "VARIABLE_VALUE"]) == 300
  assert int(weights["optimizer/head/_iterations/.ATTRIBUTES/"
                     "VARIABLE_VALUE"]) == 300


def test_ema_on_the_cnn_reports_raw_and_ema_eval(tmp_path):
  proc = run_trainer(*FAST, "--model=cnn", "--train_steps=100",
                     "--ema_decay=0.9", f"--model_dir={tmp_path / 'run'}")
  result = last_json(proc)
  assert result["eval_accuracy"] >= 0.8 and result["eval_raw_accuracy"] >= 0.8
  assert result["eval_loss"] != result["eval_raw_loss"]
  averages = [v for k, v in checkpoint_weights(tmp_path / "run").items()
              if k.startswith("ema/averages/")]
  assert averages and all(np.all(np.isfinite(a)) for a in averages)
