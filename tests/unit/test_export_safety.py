"""trainer.export never removes what it did not write: a run's directory, a
file, a folder of other things are refused (exit 2, one line, every byte
kept); a previous export is replaced only with --overwrite."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, env
from export_runs import digits_run, tree_digest


def _export_cli(model_dir, export_dir, *flags):
  return subprocess.run(
      [sys.executable, "-m", "trainer.export", f"--model_dir={model_dir}",
       f"--export_dir={export_dir}", *flags], cwd=REPO, env=env(),
      capture_output=True, text=True, timeout=120)


def _refused(proc, *words):
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, (proc.returncode,
                                                     proc.stderr[-2000:])
  assert lines[0].startswith("trainer.export: error: --export_dir=")
  for word in words:
    assert word in lines[0], lines[0]


def test_refuses_run_dir_file_and_foreign_folder(tmp_path):
  run = digits_run()
  notes = tmp_path / "notes"
  (notes / "sub").mkdir(parents=True)
  (notes / "todo.txt").write_text("keep me")
  (notes / "sub" / "data.bin").write_bytes(b"\0\1\2")
  a_file = tmp_path / "model.bin"
  a_file.write_bytes(b"weights")
  cases = [(run, "training run's directory"), (a_file, "is a file"),
           (notes, "holds no export")]
  for target, words in cases:
    before = tree_digest(target), tree_digest(run)
    _refused(_export_cli(run, target), words)
    assert (tree_digest(target), tree_digest(run)) == before, target
  # Nothing half-written left beside the targets either.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "notes"]


def test_overwrite_replaces_only_a_previous_export(tmp_path):
  from trainer import export, export_dir
  from trainer.errors import UserError
  run = digits_run()
  out = tmp_path / "served"
  out.mkdir()                                  # an empty folder is fine
  first = export.export(str(run), str(out))
  assert (out / export_dir.MARKER).exists() and first["step"] == 2
  before = tree_digest(out)
  _refused(_export_cli(run, out), "--overwrite")
  assert tree_digest(out) == before
  (out / "saved_model.pb").write_bytes(b"stale")   # a file it wrote, changed
  export.export(str(run), str(out), overwrite=True)
  assert (out / "saved_model.pb").read_bytes() != b"stale"
  import tensorflow as tf
  assert "serving_default" in tf.saved_model.load(str(out)).signatures
  # Anything it did not write keeps the previous export where it is.
  (out / "README.txt").write_text("mine")
  before = tree_digest(out)
  with pytest.raises(UserError, match="README.txt, which trainer.export did "
                     "not write"):
    export.export(str(run), str(out), overwrite=True)
  assert tree_digest(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]
  # A run's directory stays refused with --overwrite too.
  with pytest.raises(UserError, match="training run's directory"):
    export.export(str(run), str(run), overwrite=True)


def test_helpfull_documents_overwrite():
  proc = subprocess.run([sys.executable, "-m", "trainer.export", "--helpfull"],
                        cwd=REPO, env=env(), capture_output=True, text=True,
                        timeout=60)
  assert "--[no]overwrite" in proc.stdout and "previous export" in proc.stdout


def test_check_rules_without_a_model(tmp_path):
  """export_dir.check alone: what counts as a previous export."""
  import json
  from trainer import export_dir
  from trainer.errors import UserError
  check = export_dir.check
  check(str(tmp_path / "new"), False)            # absent: fine
  (tmp_path / "empty").mkdir()
  check(str(tmp_path / "empty"), False)
  (tmp_path / "link").symlink_to(tmp_path / "empty")
  with pytest.raises(UserError, match="symbolic link"):
    check(str(tmp_path / "link"), True)
  # A run's directory stays refused even with a marker in it.
  run = tmp_path / "run"
  run.mkdir()
  (run / "ckpt-5.index").write_bytes(b"")
  (run / export_dir.MARKER).write_text(json.dumps(
      {"written_by": "trainer.export", "entries": ["ckpt-5.index"]}))
  with pytest.raises(UserError, match="training run's directory"):
    check(str(run), True)
  # A marker another tool wrote is no marker.
  other = tmp_path / "other"
  other.mkdir()
  (other / export_dir.MARKER).write_text(json.dumps(
      {"written_by": "someone", "entries": []}))
  with pytest.raises(UserError, match="holds no export"):
    check(str(other), True)
