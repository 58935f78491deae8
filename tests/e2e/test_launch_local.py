"""Tests for launch.local (and launch.server) with dummy child scripts instead of the trainer."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from launch import cluster
from launch import codes
from launch import local
from launch import plan

ROOT = pathlib.Path(__file__).resolve().parents[2]

# A stand-in for the trainer and the servers. argv: OUTDIR PLAN_JSON, where PLAN maps a task
# name ('worker 1', 'chief', '*') to an action. Every start writes OUTDIR/<name>.<pid>.json
# (TF_CONFIG, pid, env, affinity) once its signal handlers are in place.
CHILD = r'''
import json, os, pathlib, signal, socket, sys, time
out, rules = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
cfg = json.loads(os.environ["TF_CONFIG"])
kind, index = cfg["task"]["type"], cfg["task"]["index"]
name = "chief" if kind == "chief" else f"{kind} {index}"
tag = name.replace(" ", "")
action = rules.get(name, rules.get("*", "exit:0"))

def record_signal(signum, frame):
  (out / f"{tag}.{os.getpid()}.sig").write_text(signal.Signals(signum).name)
  sys.exit(0)

if action == "trap":
  signal.signal(signal.SIGTERM, record_signal)
  signal.signal(signal.SIGINT, record_signal)
if action == "ignore":
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
if action.startswith("listen"):
  port = int(cfg["cluster"][kind][index].rsplit(":", 1)[1])
  server = socket.socket()
  server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  server.bind(("127.0.0.1", port))
  server.listen()
record = {"tf_config": cfg, "pid": os.getpid(), "argv": sys.argv[3:],
          "unbuffered": os.environ.get("PYTHONUNBUFFERED"),
          "extra": os.environ.get("LAUNCH_TEST_EXTRA"),
          "affinity": sorted(os.sched_getaffinity(0))}
tmp = out / f"{tag}.{os.getpid()}.tmp"
tmp.write_text(json.dumps(record))
tmp.replace(out / f"{tag}.{os.getpid()}.json")  # atomic: the test polls for these files
print(f"hello from {tag}")
if kind != "ps" and not (kind == "worker" and "ps" in cfg["cluster"]):  # trainers: a summary
  print(json.dumps({"global_step": 7, "who": tag}))
print(f"complaint from {tag}", file=sys.stderr)

def starts(t):
  return len(list(out.glob(f"{t}.*.json")))

if action.startswith("exit:"):
  sys.exit(int(action.split(":")[1]))
if action == "kill9_once" or action == "listen_kill9_once":
  if action == "listen_kill9_once":
    # Die only once the chief runs, so the launcher restarts this server in place.
    deadline = time.time() + 30
    while starts("chief") < 1 and time.time() < deadline:
      time.sleep(0.05)
  marker = out / f"{tag}.killed"
  if not marker.exists():
    marker.write_text("x")
    os.kill(os.getpid(), signal.SIGKILL)
  if action == "kill9_once":
    sys.exit(0)
if action == "exit4_when_ps_lost":  # a coordinator: exit 4 once ps 0 died; 0 when restarted
  if starts("chief") > 1:
    sys.exit(0)
  deadline = time.time() + 30
  while not (out / "ps0.killed").exists() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.5)
  sys.exit(4)
if action.startswith("wait_starts:"):  # wait_starts:TAG:N[:CODE]: exit CODE once TAG started N times
  _, t, n, *code = action.split(":")
  deadline = time.time() + 30
  while starts(t) < int(n) and time.time() < deadline:
    time.sleep(0.05)
  sys.exit(int(code[0]) if code else 0 if starts(t) >= int(n) else 1)
while True:
  time.sleep(1)
'''


@pytest.fixture
def child(tmp_path):
  """Returns (command, outdir): the dummy child's command line and its record directory."""
  script = tmp_path / "dummy_child.py"
  script.write_text(CHILD)
  out = tmp_path / "out"
  out.mkdir()
  return [sys.executable, str(script)], out


def records(out, tag=None):
  files = sorted(out.glob(f"{tag or '*'}.*.json"), key=lambda p: p.stat().st_mtime_ns)
  return [json.loads(p.read_text()) for p in files]


def by_task(recs):
  return {(r["tf_config"]["task"]["type"], r["tf_config"]["task"]["index"]): r for r in recs}


def alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def assert_all_dead(recs):
  pids = [r["pid"] for r in recs]
  deadline = time.monotonic() + 5
  while any(alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.05)
  survivors = [p for p in pids if alive(p)]
  for p in survivors:  # a failing test must not leave orphans behind
    os.kill(p, signal.SIGKILL)
  assert survivors == []


def launcher_env(tmp_path):
  # The CLI runs `-m dummy_child`: put the script's directory on the children's path.
  path = [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]
  return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


# ---- pure parts -------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_free_ports_are_distinct_and_bindable():
  ports = cluster.free_ports(8)
  assert len(ports) == 8 and len(set(ports)) == 8
  for port in ports:
    with socket.socket() as s:
      s.bind((cluster.HOST, port))
  assert cluster.free_ports(0) == []


@pytest.mark.timeout(120)
def test_make_cluster_multiworker_and_parameter_server():
  assert cluster.make_cluster(2, 0, [1001, 1002]) == {
      "worker": ["127.0.0.1:1001", "127.0.0.1:1002"]}
  assert cluster.make_cluster(2, 1, [1, 2, 3, 4]) == {
      "chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2", "127.0.0.1:3"],
      "ps": ["127.0.0.1:4"]}
  c = cluster.make_cluster(1, 0, [5])
  assert cluster.tf_config(c, "worker", 0) == {"cluster": c,
                                               "task": {"type": "worker", "index": 0}}
  with pytest.raises(ValueError, match="need 4"):
    cluster.make_cluster(2, 1, [1, 2, 3])
  with pytest.raises(ValueError):
    cluster.tf_config(c, "worker", 1)
  assert cluster.consecutive_ports(3, 7000) == [7000, 7001, 7002]


@pytest.mark.timeout(120)
def test_plan_gives_trainer_args_to_trainers_only():
  tasks = plan.make_tasks(2, 1, [1, 2, 3, 4], ["T"], ["S"], ["--x=1"], {"PYTHONPATH": "/a"})
  argv = {t.name: t.argv for t in tasks}
  assert argv == {"ps 0": ("S",), "worker 0": ("S",), "worker 1": ("S",),
                  "chief": ("T", "--x=1")}
  assert [t.name for t in tasks if t.trainer] == ["chief"]
  env = tasks[0].env
  assert env["PYTHONPATH"].split(os.pathsep) == [plan.PROJECT_ROOT, "/a"]
  assert json.loads(env["TF_CONFIG"])["task"] == {"type": "ps", "index": 0}


@pytest.mark.timeout(120)
def test_exit_status_maps_signals_to_shell_convention():
  assert [codes.exit_status(c) for c in (0, 3, 75, -9, -15)] == [0, 3, 75, 137, 143]


# ---- run() with dummy children ----------------------------------------------------------------

@pytest.mark.timeout(120)
def test_each_worker_gets_its_tf_config(child):
  cmd, out = child
  rc = local.run(3, 0, [str(out), json.dumps({"*": "exit:0"}), "--flag=1"], command=cmd,
                 env={"LAUNCH_TEST_EXTRA": "yes"}, timeout_s=60)
  assert rc == 0
  recs = by_task(records(out))
  assert sorted(recs) == [("worker", 0), ("worker", 1), ("worker", 2)]
  workers = recs[("worker", 0)]["tf_config"]["cluster"]["worker"]
  assert len(set(workers)) == 3 and all(w.startswith("127.0.0.1:") for w in workers)
  for (_, i), r in recs.items():
    assert r["tf_config"] == {"cluster": {"worker": workers},
                              "task": {"type": "worker", "index": i}}
    assert r["argv"] == ["--flag=1"]
    assert r["unbuffered"] == "1" and r["extra"] == "yes"


@pytest.mark.timeout(120)
def test_chief_summary_is_the_last_unprefixed_line(child, capsys):
  cmd, out = child
  servers = [*cmd, str(out), json.dumps({"*": "listen"})]
  rc = local.run(2, 1, [str(out), json.dumps({"chief": "exit:0"})], command=cmd,
                 server_command=servers, timeout_s=60)
  assert rc == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[-1] == '{"global_step": 7, "who": "chief"}', lines
  assert lines.count('[chief] {"global_step": 7, "who": "chief"}') == 1
  assert sum('"global_step"' in line for line in lines) == 2  # servers print none


@pytest.mark.timeout(120)
def test_parameter_server_mode_starts_servers_then_chief(child):
  cmd, out = child
  servers = [*cmd, str(out), json.dumps({"*": "listen"})]
  chief_rules = json.dumps({"chief": "exit:0"})
  rc = local.run(2, 1, [str(out), chief_rules], command=cmd, server_command=servers,
                 timeout_s=60, grace_s=5)
  assert rc == 0
  recs = by_task(records(out))
  assert sorted(recs) == [("chief", 0), ("ps", 0), ("worker", 0), ("worker", 1)]
  c = recs[("chief", 0)]["tf_config"]["cluster"]
  assert sorted(c) == ["chief", "ps", "worker"]
  assert (len(c["chief"]), len(c["worker"]), len(c["ps"])) == (1, 2, 1)
  assert all(r["tf_config"]["cluster"] == c for r in recs.values())
  assert_all_dead(recs.values())  # the servers never exit by themselves: the launcher stopped them


@pytest.mark.timeout(120)
def test_failing_worker_stops_the_others(child, capsys):
  cmd, out = child
  start = time.monotonic()
  rules = {"worker 1": "wait_starts:worker0:1:3", "*": "sleep"}  # worker 0 is up, then fail
  rc = local.run(2, 0, [str(out), json.dumps(rules)], command=cmd, timeout_s=60)
  assert rc == 3
  assert time.monotonic() - start < 20
  recs = records(out)
  assert len(recs) == 2
  assert_all_dead(recs)
  assert "restart" not in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_restart_after_sigkill_then_success(child, capsys):
  cmd, out = child
  rules = json.dumps({"worker 1": "kill9_once", "*": "exit:0"})
  rc = local.run(2, 0, [str(out), rules], command=cmd, max_restarts=1, timeout_s=60)
  assert rc == 0
  assert "launch.local: restart 1/1 after worker 1 exited with -9" in capsys.readouterr().err
  first, second = records(out, "worker1")
  assert len(records(out, "worker0")) == 2  # the whole group was started again
  # New free ports for the second attempt.
  assert first["tf_config"]["cluster"] != second["tf_config"]["cluster"]


@pytest.mark.timeout(120)
def test_sigkill_without_restarts_fails_with_137(child):
  cmd, out = child
  rules = json.dumps({"worker 1": "kill9_once", "*": "sleep"})
  assert local.run(2, 0, [str(out), rules], command=cmd, timeout_s=60) == 137
  assert len(records(out, "worker1")) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("code", [codes.PREEMPTED, codes.DISK_FULL])
def test_preempted_and_disk_full_codes_are_propagated_without_restart(child, capsys, code):
  """75 (preempted: resubmit) and 74 (disk full: a restart meets the same full disk)."""
  cmd, out = child
  rules = json.dumps({"worker 1": f"exit:{code}", "*": "sleep"})
  rc = local.run(2, 0, [str(out), rules], command=cmd, max_restarts=2, timeout_s=60)
  assert rc == code
  assert len(records(out, "worker1")) == 1  # no second attempt
  assert "restart" not in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_dead_server_restarts_in_place(child, capsys):
  cmd, out = child
  servers = [*cmd, str(out), json.dumps({"worker 0": "listen_kill9_once", "*": "listen"})]
  chief_rules = json.dumps({"chief": "wait_starts:worker0:2"})
  rc = local.run(1, 1, [str(out), chief_rules], command=cmd, server_command=servers,
                 max_restarts=1, timeout_s=60, grace_s=5)
  assert rc == 0
  assert "restart 1/1 after worker 0 exited with -9" in capsys.readouterr().err
  first, second = records(out, "worker0")
  assert first["tf_config"] == second["tf_config"]  # same address, same port
  assert len(records(out, "chief")) == 1  # the chief was not restarted


@pytest.mark.timeout(120)
def test_lost_ps_restarts_the_group_once(child, capsys):
  """A ps server's variables die with it: the group restarts from the last checkpoint, and
  that costs one restart, not one for the ps and another for the chief that then fails."""
  cmd, out = child
  servers = [*cmd, str(out), json.dumps({"ps 0": "listen_kill9_once", "*": "listen"})]
  chief_rules = json.dumps({"chief": "exit4_when_ps_lost"})
  rc = local.run(1, 1, [str(out), chief_rules], command=cmd, server_command=servers,
                 max_restarts=1, timeout_s=60, grace_s=5)
  err = capsys.readouterr().err
  assert rc == 0, err
  assert "ps 0 exited with -9; the variables it held are lost" in err, err
  assert "restart 1/1 after chief exited with 4" in err, err
  assert len(records(out, "chief")) == 2 and len(records(out, "worker0")) == 2
  first, second = records(out, "ps0")
  assert first["tf_config"]["cluster"] != second["tf_config"]["cluster"]  # a new group


@pytest.mark.timeout(120)
def test_lost_ps_without_restarts_ends_with_the_chiefs_code(child, capsys):
  cmd, out = child
  servers = [*cmd, str(out), json.dumps({"ps 0": "listen_kill9_once", "*": "listen"})]
  rc = local.run(1, 1, [str(out), json.dumps({"chief": "exit4_when_ps_lost"})], command=cmd,
                 server_command=servers, timeout_s=60, grace_s=5)
  assert rc == 4, capsys.readouterr().err
  assert len(records(out, "chief")) == 1 and len(records(out, "ps0")) == 1


@pytest.mark.timeout(120)
def test_time_limit_stops_the_group(child):
  cmd, out = child
  start = time.monotonic()
  rc = local.run(2, 0, [str(out), json.dumps({"*": "sleep"})], command=cmd, timeout_s=1.5)
  assert rc == codes.TIMEOUT
  assert time.monotonic() - start < 15
  assert_all_dead(records(out))


@pytest.mark.timeout(120)
def test_pin_cores_pins_worker_i_to_core_i_mod_n(child):
  cmd, out = child
  cpus = sorted(os.sched_getaffinity(0))
  rc = local.run(3, 0, [str(out), "{}"], command=cmd, pin_cores=True, timeout_s=60)
  assert rc == 0
  for (_, i), r in by_task(records(out)).items():
    assert r["affinity"] == [cpus[i % len(cpus)]]


# ---- the command line -------------------------------------------------------------------------

def write_module(tmp_path):
  (tmp_path / "dummy_child.py").write_text(CHILD)
  out = tmp_path / "out"
  out.mkdir()
  return out


@pytest.mark.timeout(120)
def test_cli_prefixes_every_output_line(tmp_path):
  out = write_module(tmp_path)
  proc = subprocess.run(
      [sys.executable, "-m", "launch.local", "--workers=2", "--trainer_module=dummy_child",
       "--", str(out), "{}", "--strategy=multiworker"],
      cwd=ROOT, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  for i in (0, 1):
    assert f"[worker {i}] hello from worker{i}" in lines
    assert f"[worker {i}] complaint from worker{i}" in lines  # stderr merged, prefixed too
  # The chief's JSON summary once more, unprefixed, as the last line (like trainer.main's).
  assert lines[-1] == '{"global_step": 7, "who": "worker0"}'
  assert '[worker 1] {"global_step": 7, "who": "worker1"}' in lines
  assert all(line.startswith(("[worker 0] ", "[worker 1] ")) for line in lines[:-1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_reaches_all_children_and_none_survive(tmp_path, sig):
  out = write_module(tmp_path)
  rules = json.dumps({"worker 0": "trap", "worker 1": "trap", "worker 2": "ignore"})
  launcher = subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--workers=3", "--grace_s=1",
       "--trainer_module=dummy_child", "--", str(out), rules, "--strategy=multiworker"],
      cwd=ROOT, env=launcher_env(tmp_path), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 30
    while len(records(out)) < 3 and time.monotonic() < deadline:
      time.sleep(0.05)
    recs = by_task(records(out))
    assert len(recs) == 3
    launcher.send_signal(sig)
    _, err = launcher.communicate(timeout=30)
  finally:
    launcher.kill()
    launcher.wait(timeout=10)
  assert launcher.returncode == 128 + sig, err
  for i in (0, 1):
    pid = recs[("worker", i)]["pid"]
    assert (out / f"worker{i}.{pid}.sig").read_text() == sig.name  # forwarded as it came
  assert_all_dead(recs.values())  # worker 2 ignored it: SIGKILLed after the grace


@pytest.mark.timeout(120)
def test_children_die_with_a_sigkilled_launcher(tmp_path):
  out = write_module(tmp_path)
  launcher = subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--workers=2", "--trainer_module=dummy_child",
       "--", str(out), json.dumps({"*": "sleep"}), "--strategy=multiworker"],
      cwd=ROOT, env=launcher_env(tmp_path), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 30
    while len(records(out)) < 2 and time.monotonic() < deadline:
      time.sleep(0.05)
    assert len(records(out)) == 2
  finally:
    launcher.kill()  # no chance to clean up: the children's parent-death signal must do it
    launcher.wait(timeout=10)
  assert_all_dead(records(out))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, flag", [
    (["--workers=0", "--", "--x"], "--workers=0"),
    (["--workers=2", "--ps=-1", "--", "--x"], "--ps=-1"),
    (["--workers=2", "--max_restarts=-1", "--", "--x"], "--max_restarts=-1"),
    (["--workers=2"], "'--'"),
    (["--", "--x"], "--workers"),
    (["--workers=two", "--", "--x"], "--workers=two"),
    (["--workers=2", "--model=cnn"], "model"),
])
def test_cli_bad_flags_exit_2_with_one_line(args, flag):
  proc = subprocess.run([sys.executable, "-m", "launch.local", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and flag in lines[0] and lines[0].startswith("launch.local: ")
  assert proc.stdout == ""


# ---- launch.server ----------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_server_starts_a_tf_server_and_exits_0_on_sigterm():
  port = cluster.free_ports(1)[0]
  tf_config = {"cluster": {"worker": [f"127.0.0.1:{port}"]},
               "task": {"type": "worker", "index": 0}}
  env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2"}
  server = subprocess.Popen([sys.executable, "-m", "launch.server"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 90
    listening = False
    while not listening and server.poll() is None and time.monotonic() < deadline:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        listening = True
      except OSError:
        time.sleep(0.2)
    assert listening, "launch.server never listened"
    server.send_signal(signal.SIGTERM)
    start = time.monotonic()
    output, _ = server.communicate(timeout=10)
    assert time.monotonic() - start < 5
  finally:
    server.kill()
    server.wait(timeout=10)
  assert server.returncode == 0, output
  assert f"worker 0 serving at 127.0.0.1:{port}" in output


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tf_config", [
    None, "not json", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "chief"}}',
    '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}',
])
def test_server_rejects_bad_tf_config_with_exit_2(tf_config):
  env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
  if tf_config is not None:
    env["TF_CONFIG"] = tf_config
  proc = subprocess.run([sys.executable, "-m", "launch.server"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("launch.server: bad TF_CONFIG")
