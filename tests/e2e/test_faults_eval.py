"""Evaluation under stress: an evaluator started before its trainer, a
finished run on read-only storage, and a model dir that cannot be trained in.

Read-only storage is a real read-only bind mount (`mount -o remount,bind,ro`)
in a private mount namespace (`unshare -m`) around one subprocess: root
ignores permission bits, so `chmod a-w` would test nothing; the mount goes
away with the namespace whatever happens to the test. Where mounting is not
permitted the read-only tests skip, saying so.
"""

import json
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO, env, last_json, stop, trainer_cmd

pytestmark = pytest.mark.timeout(300)

RUN = ["--model=mlp", "--train_steps=30", "--checkpoint_every=10",
       "--global_batch_size=32", "--steps_per_loop=10", "--summary_every=10",
       "--eval_every=0", "--learning_rate=0.01"]


def _popen(args, log):
  return subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                          stderr=open(log, "w"), text=True,
                          start_new_session=True)


@pytest.fixture(scope="module")
def side_car(tmp_path_factory):
  """An evaluator given only --mode and --model_dir, started one second
  before the trainer of that directory (which evaluates at its end)."""
  tmp = tmp_path_factory.mktemp("sidecar")
  model_dir = tmp / "run"
  evaluator = _popen(trainer_cmd("--mode=continuous_eval",
                                 f"--model_dir={model_dir}",
                                 "--eval_timeout_s=60"), tmp / "eval.log")
  time.sleep(1)
  trainer = _popen(trainer_cmd(*RUN, "--mode=train_and_eval",
                               f"--model_dir={model_dir}"), tmp / "train.log")
  try:
    trained_out, _ = trainer.communicate(timeout=180)
    assert trainer.returncode == 0, (tmp / "train.log").read_text()[-3000:]
    evaluated_out, _ = evaluator.communicate(timeout=120)
  finally:
    stop(trainer)
    stop(evaluator)
  return (model_dir, evaluator.returncode, evaluated_out,
          (tmp / "eval.log").read_text(), _last(trained_out))


def _last(stdout: str) -> dict:
  return last_json(subprocess.CompletedProcess([], 0, stdout, ""))


def test_evaluator_started_first_takes_the_run_flags(side_car):
  model_dir, code, out, log, trained = side_car
  assert code == 0, log[-3000:]
  assert re.search(r"waiting up to 60 s .*config\.json", log), log[-3000:]
  # Each checkpoint once, oldest first, with the run's model (its default
  # cnn would be refused by every checkpoint the mlp run wrote).
  steps = [int(s) for s in re.findall(r"evaluating \S+ckpt-\d+ \(step (\d+)\)",
                                      log)]
  assert steps == [10, 20, 30], log[-3000:]
  assert "skipping" not in log
  result = _last(out)
  assert result["global_step"] == 30
  assert result["checkpoint"] == str(model_dir / "ckpt-30")
  # The trainer's own final evaluation of the same checkpoint.
  assert result["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-6)
  assert result["eval_accuracy"] == pytest.approx(trained["eval_accuracy"],
                                                  rel=1e-9)


def _run(*args, timeout=120):
  return subprocess.run(list(args), cwd=REPO, env=env(), capture_output=True,
                        text=True, timeout=timeout)


def _one_line(proc, code=2) -> str:
  assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def test_no_config_json_is_refused_not_guessed(tmp_path):
  """--mode=eval without config.json, and a continuous_eval whose trainer
  never starts: exit 2 with one line (before TensorFlow is imported)."""
  line = _one_line(_run(*trainer_cmd("--mode=eval",
                                     f"--model_dir={tmp_path}")))
  assert f"--model_dir={tmp_path} has no config.json" in line
  began = time.monotonic()
  proc = _run(*trainer_cmd("--mode=continuous_eval", "--eval_timeout_s=1",
                           f"--model_dir={tmp_path / 'later'}"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "waiting up to 1 s" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"trainer.main: error: no {tmp_path / 'later' / 'config.json'} "
      "appeared within --eval_timeout_s=1")
  assert time.monotonic() - began < 60
  assert not (tmp_path / "later").exists()


@pytest.mark.parametrize("content", ["", "{\"model\": \"mlp\", \"data"])
def test_damaged_config_json_is_not_rewritten_on_resume(tmp_path, content):
  (tmp_path / "config.json").write_text(content)
  line = _one_line(_run(*trainer_cmd(*RUN, f"--model_dir={tmp_path}")))
  assert f"{tmp_path / 'config.json'} cannot be read" in line
  assert "remove it to let this training run write its own" in line
  assert (tmp_path / "config.json").read_text() == content
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_training_onto_a_file_is_refused(tmp_path):
  target = tmp_path / "notes.txt"
  target.write_text("mine")
  for model_dir in (target, target / "run"):
    line = _one_line(_run(*trainer_cmd(*RUN, f"--model_dir={model_dir}")))
    assert f"{target} is a file, not a directory" in line
  assert target.read_text() == "mine"


# ---- read-only storage ------------------------------------------------
def _read_only(path, *command):
  """`command` with `path` bind-mounted read-only onto itself, in a private
  mount namespace (gone when the command ends)."""
  script = ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" '
            '&& exec "$@"')
  return ["unshare", "-m", "sh", "-c", script, str(path), *command]


@pytest.fixture(scope="module")
def read_only_run(side_car, tmp_path_factory):
  model_dir = side_car[0]
  probe = tmp_path_factory.mktemp("probe")
  try:
    proc = _run(*_read_only(probe, "sh", "-c", f"! touch '{probe}/x'"),
                timeout=30)
  except FileNotFoundError:
    pytest.skip("no `unshare` here: read-only storage cannot be simulated")
  if proc.returncode != 0:
    pytest.skip("a read-only bind mount is not permitted here (needs root "
                f"or user namespaces): {proc.stderr.strip()[:200]}")
  files = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
  return model_dir, files, side_car[4]


def test_finished_run_on_read_only_storage(read_only_run, tmp_path):
  """--mode=eval (trainer.main's body, after its flags), trainer.load and
  trainer.export to a writable directory, in one process (one TensorFlow
  start-up) on the read-only run; then training there is refused."""
  model_dir, files, trained = read_only_run
  out = tmp_path / "served"
  script = f"""
import json, sys, numpy as np, tensorflow as tf, trainer
from absl import flags, logging
from trainer import export, main
logging.use_absl_handler()
flags.FLAGS(["trainer.main", "--mode=eval", "--model_dir={model_dir}"])
assert main.main() == 0
task, model = trainer.load({str(model_dir)!r})
x = np.random.default_rng(0).uniform(0, 1, (5, 8, 8, 1)).astype("float32")
info = export.export({str(model_dir)!r}, {str(out)!r})
served = tf.saved_model.load({str(out)!r}).signatures["serving_default"]
got = served(images=tf.constant(x))["probabilities"].numpy()
want = tf.nn.softmax(model(x)).numpy()
print(json.dumps({{"step": info["step"], "diff": float(np.abs(
    got - want).max())}}))
"""
  proc = _run(*_read_only(model_dir, sys.executable, "-c", script))
  assert proc.returncode == 0, proc.stderr[-3000:]
  evaluated, exported = [json.loads(l) for l in
                         proc.stdout.strip().splitlines()[-2:]]
  assert evaluated["global_step"] == 30
  assert evaluated["eval_loss"] == pytest.approx(trained["eval_loss"],
                                                 rel=1e-6)
  assert f"could not append to {model_dir / 'history.jsonl'}" in proc.stderr
  assert f"cannot write TensorBoard events in {model_dir / 'eval'}" \
      in proc.stderr
  assert exported == {"step": 30, "diff": pytest.approx(0.0, abs=1e-6)}

  # Training there: exit 2, one line (not a traceback and exit 1, which a
  # launcher would retry).
  line = _one_line(_run(*_read_only(model_dir, *trainer_cmd(
      *RUN, "--train_steps=40", f"--model_dir={model_dir}"))))
  assert f"cannot write in --model_dir={model_dir} (Read-only file " \
      "system" in line
  assert {p: p.read_bytes() for p in model_dir.rglob("*")
          if p.is_file()} == files
