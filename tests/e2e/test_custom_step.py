"""User-written steps end to end (issue 14): the GAN and the contrastive
example give the same weights on every topology and --grad_accum_steps,
resume exactly after SIGKILL, drop a half-NaN update as a whole, reduce
once per optimizer per update, and are refused where they cannot run."""

import json
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (REPO, assert_weights_close, checkpoint_weights, env,
                      last_json, max_rel_diff, run_trainer, start_trainer,
                      stop)

pytestmark = pytest.mark.timeout(600)

TESTS = str(REPO / "tests")
PLUGINS = {"PYTHONPATH": TESTS}
COMMON = ["--global_batch_size=32", "--train_steps=20", "--steps_per_loop=10",
          "--summary_every=20", "--checkpoint_every=20", "--eval_every=0",
          "--mode=train", "--seed=5"]
# The example's GAN step (plugin_tasks.ExactDCGAN: Adam epsilon 1e-2, see
# there why) and the contrastive example with momentum SGD (no 1/epsilon)
# at temperature 0.5. Measured, default vs 2 replicas after 20 updates:
# temperature 0.2 and learning rate 0.1 amplify the rounding of the
# gathered gradients' sums (contrastive gradients cancel heavily) to 5e-6
# in the weights; 0.5 and 0.05 keep them at 2e-8 (and equal losses).
TASKS = {
    "gan": ["--task=plugin_tasks:ExactDCGAN"],
    "simclr": ["--task=examples.simclr:SimCLR", "--task_args=temperature=0.5",
               "--optimizer=momentum", "--learning_rate=0.05"],
}


def _run(tmp_path, name, *flags):
  model_dir = tmp_path / name
  proc = run_trainer(*COMMON, *flags, f"--model_dir={model_dir}",
                     extra_env=PLUGINS)
  return last_json(proc), checkpoint_weights(model_dir / "ckpt-20")


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
  """--strategy=default, 20 updates, per task: (JSON line, weights)."""
  root = tmp_path_factory.mktemp("default")
  return {task: _run(root, task, *flags) for task, flags in TASKS.items()}


def _moved(weights, other):
  assert max_rel_diff(weights, other) > 1e-3


@pytest.mark.parametrize("task", sorted(TASKS))
def test_two_replicas_equal_default(tmp_path, default_runs, task):
  result, weights = _run(tmp_path, "mirrored", *TASKS[task],
                         "--strategy=mirrored", "--cpu_replicas=2")
  base_result, base = default_runs[task]
  assert_weights_close(weights, base, rtol=1e-5)
  # The reported losses do not depend on the split either: for SimCLR
  # each replica's loss uses the negatives gathered from both replicas.
  for key in ("train_loss", "train_d_loss", "train_g_loss"):
    if base_result.get(key) is not None:
      assert result[key] == pytest.approx(base_result[key], rel=1e-5), key


def test_contrastive_loss_needs_the_gathered_negatives(tmp_path,
                                                       default_runs):
  """Against a wrong step whose negatives are only the replica's own rows:
  its 2-replica loss differs from the default run's (so the equality above
  is a real check of the gather)."""
  result, _ = _run(tmp_path, "local", "--task=plugin_tasks:LocalSimCLR",
                   *TASKS["simclr"][1:], "--strategy=mirrored",
                   "--cpu_replicas=2")
  assert result["train_loss"] != pytest.approx(
      default_runs["simclr"][0]["train_loss"], rel=1e-3)


def test_gan_accumulation_equals_one_micro_batch(tmp_path, default_runs):
  _, weights = _run(tmp_path, "k4", *TASKS["gan"], "--grad_accum_steps=4")
  assert_weights_close(weights, default_runs["gan"][1], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_two_workers_equal_default(tmp_path, default_runs, task):
  model_dir = tmp_path / "mw"
  tmpdir = tmp_path / "tmp"
  tmpdir.mkdir()
  cmd = [sys.executable, "-m", "launch.local", "--workers=2", "--grace_s=5",
         "--timeout_s=280", "--", "--strategy=multiworker",
         "--peer_timeout_s=60", *COMMON, *TASKS[task],
         f"--model_dir={model_dir}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env(TMPDIR=tmpdir, **PLUGINS),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-5000:]
  weights = checkpoint_weights(model_dir / "ckpt-20")
  assert_weights_close(weights, default_runs[task][1], rtol=1e-5)


# ---- exact resume of two models, two optimizers and the EMA ------------
RESUME = ["--task=plugin_tasks:ExactDCGAN", "--global_batch_size=32",
          "--train_steps=60", "--steps_per_loop=1", "--checkpoint_every=5",
          "--summary_every=30", "--eval_every=0", "--mode=train", "--seed=9",
          "--ema_decay=0.9"]


@pytest.mark.slow
def test_gan_sigkill_then_resume_equals_uninterrupted(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  run_trainer(*RESUME, f"--model_dir={straight}", extra_env=PLUGINS)
  proc = start_trainer(*RESUME, f"--model_dir={killed}", extra_env=PLUGINS)
  try:
    deadline = time.monotonic() + 240
    while not (killed / "ckpt-5.index").exists():
      assert proc.poll() is None, f"trainer exited {proc.returncode} early"
      assert time.monotonic() < deadline, "no first checkpoint"
      time.sleep(0.02)
    time.sleep(random.uniform(0.0, 1.0))
    assert stop(proc, signal.SIGKILL) == -signal.SIGKILL
  finally:
    stop(proc)
  resumed = run_trainer(*RESUME, f"--model_dir={killed}", extra_env=PLUGINS)
  match = re.search(r"restored \S+ at step (\d+)", resumed.stderr)
  assert match and 5 <= int(match.group(1)) < 60, resumed.stderr[-2000:]
  a = checkpoint_weights(straight / "ckpt-60")
  b = checkpoint_weights(killed / "ckpt-60")
  # Every model, both optimizers' slots, the averages and the counters.
  # (The object graph names each model weight by its first path: under
  # ema/_sources when there is an EMA, else under the optimizer.)
  for part in ("ema/_sources/", "ema/averages/",
               "optimizer/generator/_variables/",
               "optimizer/discriminator/_variables/", "state/position"):
    assert any(k.startswith(part) for k in a), (part, sorted(a)[:20])
  assert_weights_close(b, a, rtol=1e-6)


# ---- a NaN in one optimizer's gradients drops the whole update ---------
# (tests/test_custom_step_unit.py checks the variables around the bad
# update on both paths; here the whole run.)
def test_nan_dropped_by_the_guarded_loop_in_a_chunk(tmp_path):
  """A chunk of 6 updates with the bad 4th inside: the unguarded chunk
  stops, the chunk's start is restored and all 6 replayed under the guard.
  The result equals chunks of one update (where the guard dropped the 4th
  alone, as test_custom_step_unit checks): nothing of updates 1-3 is applied
  twice or lost, nothing of the 4th is applied."""
  flags = ["--task=plugin_tasks:NanDCGAN", "--global_batch_size=32",
           "--train_steps=6", "--summary_every=6", "--eval_every=0",
           "--mode=train", "--nonfinite=skip"]
  one = tmp_path / "one"
  run_trainer(*flags, "--steps_per_loop=1", f"--model_dir={one}",
              extra_env=PLUGINS)
  chunk = tmp_path / "chunk"
  proc = run_trainer(*flags, "--steps_per_loop=6", f"--model_dir={chunk}",
                     extra_env=PLUGINS)
  assert last_json(proc)["nonfinite_steps"] == 1
  assert_weights_close(checkpoint_weights(chunk / "ckpt-6"),
                       checkpoint_weights(one / "ckpt-6"), rtol=1e-6)


# ---- one cross-replica reduction per optimizer per update --------------
@pytest.mark.parametrize("accum", [1, 4])
def test_gan_one_reduction_per_optimizer_per_update(tmp_path, accum):
  updates = 4
  proc = subprocess.run(
      [sys.executable, str(REPO / "tests" / "scripts" / "count_reductions.py"),
       str(tmp_path / "run"), "2", str(accum), str(updates),
       "--task=examples.dcgan:DCGAN"],
      cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  counts = json.loads(proc.stdout.strip().splitlines()[-1])
  assert counts["replicas"] == 2 and counts["optimizers"] == 2
  # Each replica takes part in each reduction once: R per reduction.
  assert counts["reductions"] == updates * 2 * 2, counts


# ---- parameter servers refuse all_gather at start ----------------------
def test_all_gather_refused_under_parameter_servers(tmp_path):
  log = tmp_path / "launch.log"
  with open(log, "w") as out:
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.local", "--workers=1", "--ps=1",
         "--timeout_s=200", "--grace_s=5", "--",
         "--strategy=parameter_server", "--task=examples.simclr:SimCLR",
         "--global_batch_size=32", "--train_steps=10", "--eval_every=0",
         f"--model_dir={tmp_path / 'run'}"],
        cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
      code = proc.wait(timeout=240)
    finally:
      stop(proc)
  text = log.read_text(errors="replace")
  assert code == 2, text[-4000:]
  lines = [l for l in text.splitlines()
           if "ctx.all_gather is not available under "
              "--strategy=parameter_server" in l]
  assert lines, text[-4000:]
  assert not list((tmp_path / "run").glob("ckpt-*"))
