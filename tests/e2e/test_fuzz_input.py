"""Property-based fuzz of TF_CONFIG and flag values (hypothesis).

Every case either passes every check (it would run) or ends with exit 2 and
ONE stderr line, within seconds, with nothing written and no other
exception. In-process through trainer.main's own path (flag parsing,
checked_config, the model_dir lock) so that hundreds of cases take seconds;
then the cases the issue found by hand, end to end in subprocesses.
"""

import contextlib
import io
import json
import os
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import REPO, env, trainer_cmd
from trainer import cli, dirlock
from trainer import main as trainer_main
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(600)

FLAGS = trainer_main.FLAGS
# Every case must be decided within this many seconds (no hang, no slow
# resolver wait beyond --peer_timeout_s=1).
CASE_S = 5.0

_INT_FLAGS = ("global_batch_size", "grad_accum_steps", "train_steps",
              "steps_per_loop", "eval_batch_size", "checkpoint_every",
              "keep_checkpoints", "summary_every", "eval_every", "seed",
              "warmup_steps", "cpu_replicas", "max_rollbacks",
              "histograms_every", "input_wait_steps", "synthetic_classes",
              "synthetic_examples", "early_stopping_patience",
              "ps_shard_min_bytes")
_FLOAT_FLAGS = ("learning_rate", "momentum", "weight_decay", "clip_norm",
                "early_stopping_min_delta", "eval_timeout_s")
_STRING_FLAGS = ("strategy", "optimizer", "mode", "mixed_precision",
                 "profile_steps", "synthetic_shape", "train_split",
                 "nonfinite", "progress", "model")

_weird = st.sampled_from(["", "abc", "1e3", "0x10", "nan", "inf", "-0", " 5",
                          "2**70", "1_000", "9" * 30, "\n", "--"])
_int_value = st.one_of(st.integers(-2**70, 2**70).map(str),
                       st.integers(-3, 100).map(str), _weird)
_float_value = st.one_of(st.floats(allow_nan=True, allow_infinity=True)
                         .map(repr), _weird)
# (argv and the environment cannot hold NUL bytes: not a case.)
_flag = st.one_of(
    st.tuples(st.sampled_from(_INT_FLAGS), _int_value),
    st.tuples(st.sampled_from(_FLOAT_FLAGS), _float_value),
    st.tuples(st.sampled_from(_STRING_FLAGS),
              st.one_of(_weird, st.text(max_size=12))),
).map(lambda kv: f"--{kv[0]}={kv[1]}").filter(lambda f: "\x00" not in f)

_host = st.sampled_from(["127.0.0.1", "127.0.0.1", "localhost", "[::1]",
                         "nosuchhost.invalid", "", " ", "a b", "x" * 300,
                         "h/1"])
_port = st.one_of(st.integers(-10, 70000).map(str),
                  st.sampled_from(["abc", "", "-5", "99999", "0", "1e3"]))
_address = st.one_of(st.builds(lambda h, p: f"{h}:{p}", _host, _port),
                     st.sampled_from([":", "nohostport", ""]),
                     st.integers(), st.none())
_jobs = st.sampled_from(["worker", "chief", "ps", "evaluator", "boss"])


@st.composite
def _near_valid(draw):
  """A well-formed cluster (distinct local ports) with 0-2 mutations: most
  cases get past the JSON and shape checks to the address, role and host
  checks, where the issue found the tracebacks and the hang."""
  sizes = {"worker": draw(st.integers(1, 3)), "chief": draw(st.integers(0, 2)),
           "ps": draw(st.integers(0, 2))}
  ports = iter(draw(st.lists(st.integers(1, 65535), min_size=9, max_size=9,
                             unique=True)))
  cluster = {job: [f"127.0.0.1:{next(ports)}" for _ in range(n)]
             for job, n in sizes.items() if n}
  for _ in range(draw(st.integers(0, 2))):
    job = draw(st.sampled_from(sorted(cluster)))
    i = draw(st.integers(0, len(cluster[job]) - 1))
    cluster[job][i] = draw(_address)
  if draw(st.booleans()):      # a duplicate address
    job = draw(st.sampled_from(sorted(cluster)))
    cluster[job].append(cluster[job][0])
  task = {"type": draw(st.one_of(st.sampled_from(sorted(cluster)), _jobs,
                                 st.integers())),
          "index": draw(st.one_of(st.integers(-1, 3), st.booleans(),
                                  st.sampled_from(["0", 0.0, None])))}
  return json.dumps({"cluster": cluster, "task": task})


_cluster = st.dictionaries(_jobs, st.one_of(
    st.lists(_address, max_size=3), _address), max_size=3)
_task = st.one_of(st.fixed_dictionaries(
    {"type": st.one_of(_jobs, st.integers(), st.none()),
     "index": st.one_of(st.integers(-2, 3), st.text(max_size=3),
                        st.floats(allow_nan=True), st.booleans())}),
    st.none(), st.text(max_size=5))
_tf_config = st.one_of(
    st.none(),
    _near_valid(), _near_valid(), _near_valid(),
    st.builds(lambda c, t: json.dumps({"cluster": c, "task": t}),
              _cluster, _task),
    st.text(max_size=30)).filter(lambda t: t is None or "\x00" not in t)

STATS = {"cases": 0, "accepted": 0, "refused": 0, "slowest_s": 0.0}


def _decide(argv, tf_config, model_dir):
  """trainer.main's path up to TensorFlow: 'ok' or the one error line."""
  FLAGS.unparse_flags()
  stderr = io.StringIO()
  old = os.environ.pop("TF_CONFIG", None)
  if tf_config is not None:
    os.environ["TF_CONFIG"] = tf_config
  try:
    with contextlib.redirect_stderr(stderr):
      cli.parse("trainer.main", ["trainer.main", *argv])
      config = trainer_main.checked_config(FLAGS)
      lock = dirlock.for_run(config.model_dir, config.mode, True)
      lock.acquire()
      lock.release()
    return "ok"
  except SystemExit as e:          # absl's flag errors, through _fail
    assert e.code == 2, (argv, e.code, stderr.getvalue())
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainer.main: error:"), \
        (argv, lines)
    return lines[0]
  except UserError as e:
    assert "\n" not in str(e) and len(str(e)) < 700, (argv, str(e))
    return str(e)
  finally:
    os.environ.pop("TF_CONFIG", None)
    if old is not None:
      os.environ["TF_CONFIG"] = old
    assert not model_dir.exists(), (argv, tf_config)


@settings(max_examples=1500, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(flags=st.lists(_flag, max_size=4),
       strategy=st.sampled_from(["default", "multiworker",
                                 "parameter_server"]),
       tf_config=_tf_config)
def _fuzz(tmp, flags, strategy, tf_config):
  model_dir = tmp / "never_written"
  argv = [f"--strategy={strategy}", *flags, "--peer_timeout_s=1",
          f"--model_dir={model_dir}"]
  began = time.monotonic()
  outcome = _decide(argv, tf_config, model_dir)   # any other exception fails
  took = time.monotonic() - began
  assert took < CASE_S, (argv, tf_config, took)
  STATS["cases"] += 1
  STATS["accepted" if outcome == "ok" else "refused"] += 1
  STATS["slowest_s"] = max(STATS["slowest_s"], took)


def test_fuzz_tf_config_and_flags_in_process(tmp_path):
  try:
    _fuzz(tmp_path)
  finally:
    FLAGS.unparse_flags()   # other tests in this process see the defaults
  print(f"fuzz: {STATS}")
  assert STATS["cases"] >= 1500 and STATS["refused"] > 0 and \
      STATS["accepted"] > 0, STATS


# The malformed values found by hand (issue 17), end to end: each exits 2
# with one line in seconds, no traceback, nothing written.
_WORKER = {"type": "worker", "index": 0}
_BY_HAND = [
    ("two_chiefs", {"cluster": {"chief": ["127.0.0.1:1", "127.0.0.1:2"],
                                "worker": ["127.0.0.1:3"]},
                    "task": {"type": "chief", "index": 0}}, [],
     "at most one chief"),
    ("port_abc", {"cluster": {"worker": ["127.0.0.1:abc"]}, "task": _WORKER},
     [], "port 'abc'"),
    ("colon_only", {"cluster": {"worker": [":"]}, "task": _WORKER}, [],
     "is not 'host:port'"),
    ("port_minus_5", {"cluster": {"worker": ["127.0.0.1:-5"]},
                      "task": _WORKER}, [], "port '-5'"),
    ("port_99999", {"cluster": {"worker": ["127.0.0.1:99999"]},
                    "task": _WORKER}, [], "port '99999'"),
    ("unresolvable", {"cluster": {"worker": ["nosuchhost.invalid:45678"]},
                      "task": _WORKER}, [], "does not resolve"),
    ("huge_host", {"cluster": {"worker": ["h" * 100000 + ":45678"]},
                   "task": _WORKER}, [], "characters long"),
    ("duplicate", {"cluster": {"worker": ["127.0.0.1:5", "127.0.0.1:5"]},
                   "task": _WORKER}, [], "twice"),
    ("train_steps_2_70", None, ["--train_steps=" + str(2**70)],
     "--train_steps="),
    ("batch_1e8", None, ["--global_batch_size=100000000"], "too large"),
    ("eval_batch_1e8", None, ["--eval_batch_size=100000000"], "too large"),
    ("eval_batch_over_split", None, ["--eval_batch_size=1000"],
     "larger than --eval_split"),
    ("batch_over_split", None, ["--global_batch_size=2048"],
     "larger than --train_split"),
]


@pytest.mark.slow
def test_cases_found_by_hand_end_to_end(tmp_path):
  procs = []
  for name, tf_config, flags, _ in _BY_HAND:
    extra = {"TF_CONFIG": json.dumps(tf_config)} if tf_config else {}
    strategy = ["--strategy=multiworker"] if tf_config else []
    procs.append(subprocess.Popen(
        trainer_cmd(*strategy, *flags, "--train_steps=5"
                    if not any(f.startswith("--train_steps") for f in flags)
                    else "--mode=train", f"--model_dir={tmp_path / name}"),
        cwd=REPO, env=env(**extra), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True))
  began = time.monotonic()
  try:
    results = [p.communicate(timeout=150) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, 9)
        p.wait(timeout=30)
  for (name, _, _, message), p, (out, err) in zip(_BY_HAND, procs, results):
    assert p.returncode == 2, (name, p.returncode, err[-2000:])
    errors = [l for l in err.splitlines() if "error:" in l]
    assert len(errors) == 1 and message in errors[0], (name, errors)
    assert "Traceback" not in err, name
    assert not (tmp_path / name).exists(), name
  # 13 processes at once on 2 shared cores, 4 of them importing TF.
  assert time.monotonic() - began < 120
