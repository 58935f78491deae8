"""The suite's fork server runs `python -m` as a fresh interpreter would."""

import os
import signal
import subprocess
import sys
import time

import pytest

import forkserver
from conftest import REPO, env

pytestmark = pytest.mark.timeout(300)

# A module that reports what a run sees: argv, cwd, one variable, sys.path's
# head, and the exit code it was asked for.
_PROBE = """
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                  "var": os.environ.get("PROBE_VAR"),
                  "path0": sys.path[0],
                  "tf": "tensorflow" in sys.modules}))
print("to stderr", file=sys.stderr)
if sys.argv[1:] == ["sleep"]:
  import time
  time.sleep(600)
sys.exit(int(sys.argv[-1]) if sys.argv[-1].isdigit() else 0)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  directory = tmp_path_factory.mktemp("fork")
  (directory / "probe_mod.py").write_text(_PROBE)
  srv = forkserver.Server(str(directory), str(REPO))
  base = env(PYTHONPATH=f"{REPO}{os.pathsep}{directory}")
  srv.start(base)
  deadline = time.monotonic() + 240
  while not os.path.exists(srv._path):  # pylint: disable=protected-access
    assert time.monotonic() < deadline, "fork server never became ready"
    time.sleep(0.1)
  yield srv, directory, base
  srv.close()


def _run(srv, directory, run_env, *argv):
  out, err = (directory / "out"), (directory / "err")
  with open(out, "w") as o, open(err, "w") as e:
    proc = srv.popen("probe_mod", list(argv), run_env, str(directory),
                     stdout=o, stderr=e, new_session=True)
  assert proc is not None
  code = proc.wait(timeout=120)
  return code, out.read_text(), err.read_text()


def test_fork_is_like_python_m(server):
  import json
  srv, directory, base = server
  run_env = {**base, "PROBE_VAR": "x"}
  code, out, err = _run(srv, directory, run_env, "a", "7")
  plain = subprocess.run([sys.executable, "-m", "probe_mod", "a", "7"],
                         cwd=directory, env=run_env, capture_output=True,
                         text=True, timeout=120)
  assert code == plain.returncode == 7
  forked, fresh = json.loads(out), json.loads(plain.stdout)
  assert forked["tf"] and not fresh["tf"]   # the point of the server
  for key in ("argv", "cwd", "var", "path0"):
    assert forked[key] == fresh[key], key
  assert err == plain.stderr == "to stderr\n"


def test_signals_reach_the_run_and_its_code_is_reported(server):
  srv, directory, base = server
  with open(directory / "out", "w") as o:
    proc = srv.popen("probe_mod", ["sleep"], base, str(directory), stdout=o,
                     stderr=o, new_session=True)
  assert proc.poll() is None
  with pytest.raises(subprocess.TimeoutExpired):
    proc.wait(timeout=0.5)
  os.killpg(proc.pid, signal.SIGKILL)   # its own session, as start_trainer's
  assert proc.wait(timeout=60) == -signal.SIGKILL


def test_a_run_with_other_start_up_variables_is_not_forked(server):
  srv, directory, base = server
  assert srv.popen("probe_mod", [], {**base, "TF_CPP_MIN_LOG_LEVEL": "0"},
                   str(directory)) is None
