"""Packaging: each extra puts exactly one TensorFlow distribution in an
environment. pip's resolver says what `pip install '.[EXTRA]'` would install
(--dry-run --report: metadata only, nothing installed)."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Distributions that each provide the `tensorflow` import package.
TENSORFLOWS = {"tensorflow", "tensorflow-cpu", "tensorflow-intel",
               "tensorflow-macos", "tf-nightly", "tf-nightly-cpu"}


def _would_install(tmp_path, extra: str) -> set[str]:
  # The project's metadata only (setup.cfg), copied: building it in the
  # repository would leave an egg-info directory behind.
  project = tmp_path / f"project-{extra or 'base'}"
  project.mkdir()
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(REPO / name, project / name)
  for package in ("trainer", "layers", "launch"):
    (project / package).mkdir()
    (project / package / "__init__.py").write_text("")
  report = tmp_path / f"report-{extra or 'base'}.json"
  target = f".[{extra}]" if extra else "."
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
       "--ignore-installed", "--report", str(report), target],
      cwd=project, capture_output=True, text=True, timeout=540)
  if proc.returncode != 0:
    if "No matching distribution" in proc.stderr or \
        "connection" in proc.stderr.lower():
      pytest.skip(f"pip cannot resolve {target} here (no package index?): "
                  f"{proc.stderr.strip().splitlines()[-1][:200]}")
    raise AssertionError(proc.stderr[-3000:])
  items = json.loads(report.read_text())["install"]
  return {item["metadata"]["name"].lower().replace("_", "-") for item in items}


@pytest.mark.parametrize("extra,expected", [("cpu", "tensorflow-cpu"),
                                            ("gpu", "tensorflow")])
def test_one_tensorflow_per_extra(tmp_path, extra, expected):
  names = _would_install(tmp_path, extra)
  assert names & TENSORFLOWS == {expected}, sorted(names & TENSORFLOWS)
  if extra == "gpu":
    assert any(n.startswith("nvidia-cudnn") for n in names)


def test_test_and_plot_extras_add_no_tensorflow(tmp_path):
  names = _would_install(tmp_path, "test,plot")
  assert not names & TENSORFLOWS
  assert {"keras", "tensorboard", "pytest", "ai-edge-litert"} <= names
