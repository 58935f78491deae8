"""Exact resume and topology independence on on-disk data of any size:
photos read lazily with --image_size and --augment (random-resized crops
and flips drawn from the example positions)."""

import subprocess
import sys

import pytest

from conftest import (REPO, assert_weights_close, checkpoint_weights, env,
                      kill_and_resume, last_json, max_rel_diff, run_trainer)
from conftest import write_photo_folder

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  write_photo_folder(root / "train", 20, "train", 0)
  write_photo_folder(root / "test", 6, "test", 1)
  return root


def _flags(photos):
  return ["--dataset=image_folder", f"--data_dir={photos}", "--image_size=20",
          "--augment", "--model=cnn", "--optimizer=adam",
          "--global_batch_size=16", "--train_steps=40", "--steps_per_loop=1",
          "--checkpoint_every=5", "--summary_every=20", "--eval_every=0",
          "--mode=train", "--seed=5"]


def test_sigkill_then_resume_equals_uninterrupted(photos, tmp_path):
  flags = _flags(photos)
  run_trainer(*flags, f"--model_dir={tmp_path / 'a'}")
  model_dir = tmp_path / "b"
  resumed = kill_and_resume(flags, model_dir, first_step=5, last_step=40,
                            jitter_s=0.5)
  assert last_json(resumed)["global_step"] == 40
  a = checkpoint_weights(tmp_path / "a" / "ckpt-40")
  assert max_rel_diff(checkpoint_weights(model_dir / "ckpt-40"), a) <= 1e-6


@pytest.mark.slow
def test_two_workers_equal_mirrored_two_replicas(photos, tmp_path):
  flags = [f for f in _flags(photos) if not f.startswith("--checkpoint_every")]
  flags += ["--checkpoint_every=40", "--train_steps=20"]
  flags = [f for f in flags if f != "--train_steps=40"]
  proc = subprocess.run(
      [sys.executable, "-m", "launch.local", "--workers=2", "--grace_s=5",
       "--timeout_s=280", "--", "--strategy=multiworker",
       "--peer_timeout_s=60", *flags, f"--model_dir={tmp_path / 'mw'}"],
      cwd=REPO, env=env(TMPDIR=tmp_path), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  run_trainer(*flags, "--strategy=mirrored", "--cpu_replicas=2",
              f"--model_dir={tmp_path / 'mirrored'}")
  two_workers = checkpoint_weights(tmp_path / "mw" / "ckpt-20")
  assert_weights_close(two_workers,
                       checkpoint_weights(tmp_path / "mirrored" / "ckpt-20"),
                       rtol=1e-5)
