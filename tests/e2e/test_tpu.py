"""--strategy=tpu on a host without a TPU: exit 2 within seconds, one line
that says no TPU was found and what --tpu expects; no traceback."""

import subprocess
import time

import pytest

from conftest import FAST, REPO, env, trainer_cmd

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("tpu, says", [
    ("local", "no TPU found: --tpu=local"),
    ("some-name", "no TPU found: --tpu=some-name"),
    ("", "--strategy=tpu needs --tpu"),
])
def test_no_tpu_fails_fast_with_one_line(tmp_path, tpu, says):
  model_dir = tmp_path / "run"
  began = time.monotonic()
  proc = subprocess.run(
      trainer_cmd("--strategy=tpu", f"--tpu={tpu}", *FAST,
                  f"--model_dir={model_dir}", "--train_steps=5"),
      cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
  took = time.monotonic() - began
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert took < 60   # TensorFlow's import is most of it; no network wait
  errors = [l for l in proc.stderr.splitlines()
            if l.startswith("trainer.main: error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert says in errors[0]
  assert "--tpu expects 'local'" in errors[0]
  assert "Traceback" not in proc.stderr
  assert proc.stdout.strip() == ""
  assert not model_dir.exists()


def test_reachability_checks(monkeypatch):
  from trainer.distribute import tpu
  from trainer.errors import UserError

  monkeypatch.setattr(tpu, "_device_files", lambda: [])
  with pytest.raises(UserError, match="no TPU device"):
    tpu.check_reachable("local")
  monkeypatch.setattr(tpu, "_device_files", lambda: ["/dev/accel0"])
  tpu.check_reachable("local")   # a TPU VM: on to the resolver

  probed = []

  def reachable(host, port, timeout_s=2.0):
    probed.append((host, port))
    return host == "10.0.0.2"

  monkeypatch.setattr(tpu, "_reachable", reachable)
  tpu.check_reachable("grpc://10.0.0.2:8470")
  with pytest.raises(UserError, match="nothing answers"):
    tpu.check_reachable("grpc://10.0.0.3:8470")
  with pytest.raises(UserError, match="not grpc://HOST:PORT"):
    tpu.check_reachable("grpc://10.0.0.3")
  monkeypatch.delenv("GCE_METADATA_HOST", raising=False)
  monkeypatch.delenv("GCE_METADATA_IP", raising=False)
  with pytest.raises(UserError, match="metadata server"):
    tpu.check_reachable("my-tpu")
  assert probed[-1] == ("metadata.google.internal", 80)
  monkeypatch.setenv("GCE_METADATA_HOST", "10.0.0.2:8080")
  tpu.check_reachable("my-tpu")
  assert probed[-1] == ("10.0.0.2", 8080)


def test_unreachable_probe_times_out_fast():
  from trainer.distribute import tpu
  began = time.monotonic()
  # A closed local port: refused at once; never longer than the timeout.
  assert not tpu._reachable("127.0.0.1", 1, timeout_s=2.0)  # noqa: SLF001
  assert time.monotonic() - began < 5
