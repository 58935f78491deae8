"""best/ (the best checkpoint so far), early stopping, and --mode=eval."""

import json

import pytest

from conftest import (assert_weights_close, checkpoint_weights, last_json,
                      run_trainer, event_values)

pytestmark = pytest.mark.timeout(300)

# --input_wait_steps=0: no second trace of the train loop (a faster test).
FAST = ["--model=mlp", "--global_batch_size=32", "--steps_per_loop=10",
        "--summary_every=10", "--eval_every=10", "--checkpoint_every=10",
        "--keep_checkpoints=20", "--input_wait_steps=0"]


def _eval_values(model_dir, tag="loss"):
  return event_values(model_dir / "eval", tag)


def _best(model_dir):
  return json.loads((model_dir / "best" / "best.json").read_text())


def test_best_checkpoint_follows_the_eval_metric(tmp_path):
  """SGD with a rate too large: eval accuracy goes up and down; best/ keeps
  the maximum, and its checkpoint is that step's checkpoint."""
  model_dir = tmp_path / "run"
  flags = [*FAST, f"--model_dir={model_dir}", "--optimizer=sgd"]
  proc = run_trainer(*flags, "--train_steps=60", "--learning_rate=3.0",
                     "--keep_best", "--early_stopping_metric=eval_accuracy")
  result = last_json(proc)
  accuracy = _eval_values(model_dir, "accuracy")
  assert sorted(accuracy) == [10, 20, 30, 40, 50, 60]
  best_step = max(accuracy, key=accuracy.get)   # the first of equal ones
  best = _best(model_dir)
  assert best == {"step": best_step, "metric": "accuracy", "mode": "max",
                  "value": pytest.approx(accuracy[best_step], rel=1e-6),
                  "checkpoint": f"ckpt-{best_step}"}
  assert result["best_step"] == best_step and "early_stopped" not in result
  assert result["best_eval_accuracy"] == pytest.approx(best["value"])
  files = sorted(p.name for p in (model_dir / "best").iterdir())
  assert files == ["best.json", "checkpoint",
                   f"ckpt-{best_step}.data-00000-of-00001",
                   f"ckpt-{best_step}.index"]
  assert_weights_close(checkpoint_weights(model_dir / "best"),
                       checkpoint_weights(model_dir / f"ckpt-{best_step}"),
                       rtol=0, atol=0)

  # --mode=eval on best/ reproduces the recorded metric; on the latest
  # checkpoint it reports step 60. Each prints the JSON line.
  on_best = last_json(run_trainer(*flags, "--mode=eval",
                                  f"--checkpoint={model_dir / 'best'}"))
  assert on_best["global_step"] == best_step
  assert on_best["checkpoint"] == str(model_dir / "best" / f"ckpt-{best_step}")
  assert on_best["eval_accuracy"] == pytest.approx(best["value"], rel=1e-6)
  latest = last_json(run_trainer(*flags, "--mode=eval"))
  assert latest["global_step"] == 60
  assert latest["checkpoint"] == str(model_dir / "ckpt-60")
  assert latest["eval_accuracy"] == pytest.approx(accuracy[60], rel=1e-6)


def test_early_stopping_counts_across_a_restart(tmp_path):
  """A learning rate too small to matter: after the first evaluation
  nothing improves by --early_stopping_min_delta. Patience 2 with evals at
  10 (best), 20 (run ends: 1 without improvement), restart, 30 (2: stop)."""
  model_dir = tmp_path / "run"
  flags = [*FAST, f"--model_dir={model_dir}", "--learning_rate=1e-9",
           "--early_stopping_patience=2", "--early_stopping_min_delta=0.01"]
  first = last_json(run_trainer(*flags, "--train_steps=20"))
  assert first["global_step"] == 20 and first["early_stopped"] is False
  assert _best(model_dir)["step"] == 10

  proc = run_trainer(*flags, "--train_steps=200")
  second = last_json(proc)
  assert proc.returncode == 0
  assert second["global_step"] == 30 and second["early_stopped"] is True
  assert second["best_step"] == 10
  assert sorted(_eval_values(model_dir)) == [10, 20, 30]
  assert second["eval_loss"] == pytest.approx(_eval_values(model_dir)[30])
  assert (model_dir / "ckpt-30.index").exists()     # the final checkpoint
  assert _best(model_dir)["step"] == 10
  assert_weights_close(checkpoint_weights(model_dir / "best"),
                       checkpoint_weights(model_dir / "ckpt-10"),
                       rtol=0, atol=0)

  # Run again: already stopped, so it trains nothing and says so.
  third = last_json(run_trainer(*flags, "--train_steps=200"))
  assert third["global_step"] == 30 and third["early_stopped"] is True
  assert not (model_dir / "ckpt-40.index").exists()


@pytest.mark.parametrize("args, message", [
    (["--early_stopping_patience=2", "--eval_every=0"],
     "--early_stopping_patience=2 needs evaluations during training"),
    (["--early_stopping_patience=2", "--mode=train"],
     "use --mode=train_and_eval"),
    (["--profile_steps=5"], "--profile_steps='5' must be 'A,B'"),
    (["--early_stopping_mode=up"], "--early_stopping_mode='up' is not one of"),
])
def test_bad_flags_are_one_line(tmp_path, args, message):
  proc = run_trainer(f"--model_dir={tmp_path / 'run'}", "--train_steps=10",
                     *args, check=False, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1 and message in errors[0], errors


def test_pure_rules(tmp_path):
  from trainer import best
  from trainer.errors import UserError
  keeper = best.BestKeeper(str(tmp_path), "eval_f1", "auto", 0.0, 2, 10,
                           is_chief=True)
  assert (keeper.metric, keeper.mode) == ("f1", "max")
  with pytest.raises(UserError, match="--early_stopping_metric='f1' is not "
                     "an eval metric of this task; choose one of: accuracy, "
                     "loss"):
    keeper.check_metric(["loss", "accuracy"])
  assert best.resolve_mode("accuracy", "auto") == "max"
  assert best.resolve_mode("loss", "auto") == "min"
  assert best.metric_name("eval_accuracy") == "accuracy"
  assert best.improved(0.5, None, "min")
  assert not best.improved(0.5, 0.5, "min")
  assert best.improved(0.49, 0.5, "min")
  assert not best.improved(0.495, 0.5, "min", min_delta=0.01)
  assert best.improved(0.9, 0.8, "max") and not best.improved(0.8, 0.9, "max")
  # Evaluations at multiples of eval_every after the best one.
  assert best.evals_since(10, 30, 10) == 2
  assert best.evals_since(250, 300, 100) == 1
  assert best.evals_since(600, 500, 100) == 0   # best from a lost future


def test_best_files_and_restart(tmp_path):
  """best.json carries the comparison and the patience count over a
  restart; a re-written step gets a fresh name, older files go."""
  import os
  import tensorflow as tf
  from trainer import best
  from trainer.errors import UserError
  v = tf.Variable([1.0, 2.0])
  ckpt = tf.train.Checkpoint(v=v)
  keeper = best.BestKeeper(str(tmp_path), "loss", "auto", 0.0, 2, 10, True)
  assert keeper.update(10, {"loss": 1.0}, ckpt)
  v.assign([3.0, 4.0])
  assert not keeper.update(20, {"loss": 1.5}, ckpt)
  again = best.BestKeeper(str(tmp_path), "eval_loss", "min", 0.0, 2, 10, True)
  assert (again.record.step, again.record.value) == (10, 1.0)
  assert not again.should_stop(20) and again.should_stop(30)
  assert again.update(10, {"loss": 0.5}, ckpt)     # a replayed step
  assert again.record.checkpoint == "ckpt-10_1"
  assert sorted(os.listdir(tmp_path / "best")) == [
      "best.json", "checkpoint", "ckpt-10_1.data-00000-of-00001",
      "ckpt-10_1.index"]
  latest = tf.train.latest_checkpoint(str(tmp_path / "best"))
  assert latest == str(tmp_path / "best" / "ckpt-10_1")
  v.assign([0.0, 0.0])
  ckpt.read(latest).assert_consumed()
  assert v.numpy().tolist() == [3.0, 4.0]
  with pytest.raises(UserError, match="tracks min of 'loss', not max of "
                     "'accuracy'"):
    best.BestKeeper(str(tmp_path), "accuracy", "auto", 0.0, 2, 10, True)
