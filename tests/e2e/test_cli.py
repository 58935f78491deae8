"""The CLI end to end: train, outputs, resume, bad input."""

import hashlib
import json
import os
import re

import pytest

from conftest import FAST, checkpoint_value, last_json, run_trainer, event_accumulator

pytestmark = pytest.mark.timeout(600)


def _event_tags(directory):
  acc = event_accumulator(directory)
  return acc, set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])


def _snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[path] = (os.path.getmtime(path), hashlib.sha256(f.read()).hexdigest())
  return out


def test_train_outputs_and_resume(tmp_path):
  model_dir = tmp_path / "run"
  first = run_trainer(*FAST, f"--model_dir={model_dir}", "--train_steps=20",
                      "--checkpoint_every=10")
  result = last_json(first)
  assert result["global_step"] == 20
  for key in ("train_loss", "eval_loss", "eval_accuracy"):
    assert isinstance(result[key], float)
  assert result["eval_examples"] == 297          # every test example, once
  assert sorted(p.name for p in model_dir.glob("ckpt-*.index")) == [
      "ckpt-10.index", "ckpt-20.index"]
  assert (model_dir / "checkpoint").is_file()
  config = json.loads((model_dir / "config.json").read_text())
  assert config["train_steps"] == 20 and config["model"] == "cnn"
  # The checkpoint carries the config and the counters a resume needs.
  saved = json.loads(checkpoint_value(model_dir / "ckpt-20",
                                      "config/.ATTRIBUTES/VARIABLE_VALUE"))
  assert saved["global_batch_size"] == 32
  assert int(checkpoint_value(model_dir / "ckpt-20",
                              "global_step/.ATTRIBUTES/VARIABLE_VALUE")) == 20
  assert int(checkpoint_value(
      model_dir / "ckpt-20",
      "state/position/.ATTRIBUTES/VARIABLE_VALUE")) == 20 * 32

  train_acc, train_tags = _event_tags(model_dir / "train")
  assert {"loss", "accuracy", "learning_rate", "steps_per_sec",
          "examples_per_sec", "grad_norm"} <= train_tags
  _, eval_tags = _event_tags(model_dir / "eval")
  assert {"loss", "accuracy"} <= eval_tags
  steps = [e.step for e in train_acc.Tensors("loss")]
  assert steps == [10, 20]

  # Same command, more steps: continues from 20, not from 0.
  second = run_trainer(*FAST, f"--model_dir={model_dir}", "--train_steps=30",
                       "--checkpoint_every=10")
  assert last_json(second)["global_step"] == 30
  assert re.search(r"restored \S+ckpt-20 at step 20", second.stderr)
  assert "train | step: 30/30" in second.stderr
  assert "train | step: 10/30" not in second.stderr

  # Already at --train_steps: evaluates only, exits 0, writes no checkpoint.
  before = sorted(p.name for p in model_dir.glob("ckpt-*.index"))
  third = run_trainer(*FAST, f"--model_dir={model_dir}", "--train_steps=30")
  result = last_json(third)
  assert result["global_step"] == 30 and "train_loss" not in result
  assert isinstance(result["eval_accuracy"], float)
  assert sorted(p.name for p in model_dir.glob("ckpt-*.index")) == before


def test_default_command_reaches_95_percent(tmp_path):
  """What `make run` runs: the default cnn on digits."""
  proc = run_trainer(f"--model_dir={tmp_path / 'run'}")
  result = last_json(proc)
  assert result["global_step"] == 1000
  assert result["eval_accuracy"] >= 0.95, result
  progress = [l for l in proc.stderr.splitlines() if "train | step:" in l]
  assert len(progress) == 10
  assert re.search(r"train \| step: 100/1000 \| loss: [\d.]+ \| accuracy: "
                   r"[\d.]+ \| steps/sec: [\d.]+ \| examples/sec: [\d.]+ \| "
                   r"eta: \d+:\d\d:\d\d$", progress[0]), progress[0]


@pytest.mark.parametrize("args, message", [
    (["--strategy=bogus"], "--strategy='bogus' is not one of"),
    (["--model=vgg"], "--model='vgg' is not one of"),
    (["--optimizer=lbfgs"], "--optimizer='lbfgs' is not one of"),
    (["--global_batch_size=0"], "--global_batch_size=0 must be positive"),
    (["--train_steps=-5"], "--train_steps=-5 must be positive"),
    (["--global_batch_size=30", "--grad_accum_steps=4"],
     "--global_batch_size (30) must be divisible by --grad_accum_steps (4)"),
    (["--strategy=mirrored", "--cpu_replicas=3"],
     "must be divisible by replicas x --grad_accum_steps (3 x 1 = 3)"),
    (["--learning_rate=0"], "--learning_rate=0.0 must be > 0"),
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--train_steps=abc"], "train_steps"),
    (["--dataset=mnist", "--data_dir=/nonexistent/dir"], "/nonexistent/dir"),
    (["--train_split=train[:abc]"], "train[:abc]"),
    (["--task=nomodule_xyz:Task"], "cannot import 'nomodule_xyz'"),
    (["--model=os.path:no_such_fn"], "has no attribute 'no_such_fn'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
  proc = run_trainer(f"--model_dir={tmp_path / 'run'}", *args, check=False,
                     timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert message in errors[0], errors[0]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()     # nothing written


@pytest.mark.parametrize("change", ["--model=mlp", "--optimizer=sgd"])
def test_model_dir_of_another_model_is_left_untouched(tmp_path, change):
  model_dir = tmp_path / "run"
  run_trainer(*FAST, f"--model_dir={model_dir}", "--train_steps=10")
  before = _snapshot(model_dir)
  proc = run_trainer(*FAST, f"--model_dir={model_dir}", "--train_steps=20",
                     change, check=False)
  assert proc.returncode == 2
  error = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(error) == 1 and "use a new --model_dir" in error[0], error
  assert _snapshot(model_dir) == before


def test_shape_mismatch_in_checkpoint_is_a_clear_error(tmp_path):
  """Same --model name, different variable shapes (a plug-in model)."""
  model_dir = tmp_path / "run"
  run_trainer(*FAST, f"--model_dir={model_dir}", "--train_steps=10",
              "--model=mlp")
  before = _snapshot(model_dir)
  # Same model and dataset names, but a 10x10 input: the Dense kernel shape
  # differs from the checkpoint's.
  proc = run_trainer(*FAST, f"--model_dir={model_dir}", "--train_steps=20",
                     "--model=mlp", "--dataset=synthetic",
                     "--synthetic_shape=10,10,1", check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  error = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(error) == 1, proc.stderr[-3000:]
  assert "--model_dir" in error[0]
  assert _snapshot(model_dir) == before


def test_helpfull_documents_every_flag():
  import dataclasses
  from trainer.config import Config
  proc = run_trainer("--helpfull", check=False, timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = proc.stdout + proc.stderr
  for field in dataclasses.fields(Config):
    assert f"--{field.name}" in text or f"--[no]{field.name}" in text, field.name
