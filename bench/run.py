"""`python -m bench.run` (`make bench`): framework vs raw loop vs Keras fit.

  python -m bench.run                  all rows, --repeats=2 (~20 min)
  python -m bench.run --quick          a ~3 minute subset, one repeat
  python -m bench.run --rows=cnn_b32/raw,cnn_b32/fw_default --repeats=3
  python -m bench.run --rows=cnn_b32   every row of a group (prefix match)
  python -m bench.run --list           the rows and what they run

For the framework's own cost, `python -m bench.paired` (one process,
contenders interleaved chunk by chunk) is far less noisy than these rows.

Every row runs in a fresh subprocess (raw loop and Keras fit included) with
the same environment and thread settings (TF defaults); repeats of the rows
are interleaved (ABBA order) to spread machine drift over all of them. A
run's figure is the median of its timed intervals after WARMUP_INTERVALS
(tracing, warm-up); a row's figure is the median over its runs. Results go
to the terminal and bench/results/latest.{md,json}.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # before any TF import

from bench import common, data_scaling, end_to_end, machine, report  # noqa: E402
from bench.rows import Row, catalog  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
# On-disk JPEG rows: enough examples that an epoch outlasts a timed run.
JPEG_EXAMPLES = 50000
MNIST_DIR = end_to_end.find_mnist()
STARTUP_S = 20.0          # subprocess timeout allowance for imports, tracing


def log(message: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
        flush=True)


# ---- machine load ----------------------------------------------------------
def _cpu_busy_s() -> float:
  """Busy CPU seconds of the whole machine since boot (all cores)."""
  with open("/proc/stat") as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25) -> float:
  """Waits (at most max_wait_s) until other processes use < threshold of
  the machine's cores over one second; returns the last busy share."""
  ncpu = os.cpu_count() or 1
  deadline = time.monotonic() + max_wait_s
  while True:
    b0, t0 = _cpu_busy_s(), time.monotonic()
    time.sleep(1.0)
    share = (_cpu_busy_s() - b0) / ((time.monotonic() - t0) * ncpu)
    if share < threshold or time.monotonic() >= deadline:
      return share
    time.sleep(1.0)


class Measured:
  """Runs a subprocess; records wall time and the CPU share that processes
  other than it (and its children) used meanwhile: `foreign_load`."""

  def __init__(self, argv, timeout_s, env=None, cwd=REPO):
    self.argv, self.timeout_s, self.env, self.cwd = argv, timeout_s, env, cwd

  def run(self) -> dict:
    ncpu = os.cpu_count() or 1
    busy0, ours0, t0 = _cpu_busy_s(), _children_cpu_s(), time.monotonic()
    try:
      proc = subprocess.run(self.argv, cwd=self.cwd, env=self.env,
                            capture_output=True, text=True,
                            timeout=self.timeout_s)
      code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
      code = "timeout"
      out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    wall = time.monotonic() - t0
    foreign = (_cpu_busy_s() - busy0) - (_children_cpu_s() - ours0)
    return {"returncode": code, "stdout": out, "stderr": err,
            "wall_s": wall, "cpu_s": _children_cpu_s() - ours0,
            "foreign_load": max(0.0, foreign / (wall * ncpu)) if wall else None}


def _tail(text: str, n: int = 6) -> str:
  lines = [l for l in (text or "").splitlines() if l.strip()]
  return " | ".join(lines[-n:])[-800:]


# ---- one run of one row ----------------------------------------------------
class Bench:

  def __init__(self, args):
    self.args = args
    self.tmp = tempfile.mkdtemp(prefix="bench_")
    self.python = sys.executable
    self.rate_estimates: dict[str, float] = {}
    self._tfrecord_dir = None
    self.setup_notes: list[str] = []
    self.quiet_budget = args.quiet_budget

  def close(self):
    if not self.args.keep_tmp:
      shutil.rmtree(self.tmp, ignore_errors=True)

  # -- helpers
  def _estimate(self, row: Row) -> float:
    return self.rate_estimates.get(row.name, row.prior)

  def _worker_argv(self, row: Row) -> list[str]:
    a = self.args
    argv = [self.python, "-m", "bench.workers", row.kind,
            f"--model={row.model}", f"--batch={row.batch}",
            f"--interval={row.interval}", f"--min_seconds={a.min_seconds}",
            f"--min_intervals={a.min_intervals}", *row.args]
    return argv

  def _train_steps(self, row: Row) -> int:
    rate = self._estimate(row)
    steady = max(self.args.min_intervals,
                 math.ceil(self.args.min_seconds * 1.15 * rate / row.interval))
    return row.interval * (common.WARMUP_INTERVALS + steady)

  def _data_flags(self, row: Row) -> list[str] | None:
    shape = ",".join(str(x) for x in common.SHAPES[row.model])
    if row.dataset == "synthetic":
      return ["--dataset=synthetic", f"--synthetic_shape={shape}"]
    if row.dataset.startswith("jpeg_"):
      kind = {"jpeg_folder": "image_folder",
              "jpeg_array_record": "array_record"}[row.dataset]
      return [f"--dataset={kind}", f"--data_dir={self._jpegs(kind)}",
              "--train_split=train", "--eval_split=train[:1024]"]
    if not os.path.isdir(MNIST_DIR):
      return None
    if row.dataset == "mnist":
      split = "test[:8000]" if row.kind == "accuracy" else "test"
      return ["--dataset=mnist", f"--data_dir={MNIST_DIR}",
              f"--train_split={split}"]
    if row.dataset == "tfrecord":
      out = self._tfrecords()
      return None if out is None else ["--dataset=tfrecord",
                                       f"--data_dir={out}",
                                       "--train_split=test"]
    raise ValueError(row.dataset)

  def _jpegs(self, kind: str) -> str:
    """JPEG_EXAMPLES small grayscale JPEGs as an image folder or ArrayRecord
    shards (bench.data_scaling.write), made once per kind."""
    out = os.path.join(self.tmp, f"jpeg_{kind}")
    if not os.path.isdir(out):
      began = time.perf_counter()
      data_scaling.write(kind, JPEG_EXAMPLES, out, shape=(28, 28, 1))
      self.setup_notes.append(
          f"{kind}: {JPEG_EXAMPLES} JPEGs of 28x28x1 by bench.data_scaling "
          f"({time.perf_counter() - began:.0f} s)")
    return out

  def _tfrecords(self) -> str | None:
    """MNIST test set as PNG TFRecords (trainer.convert), made once."""
    if self._tfrecord_dir is None:
      out = os.path.join(self.tmp, "mnist_tfrecord")
      argv = [self.python, "-m", "trainer.convert", "--dataset=mnist",
              f"--data_dir={MNIST_DIR}", "--split=test", f"--out={out}",
              "--shards=4"]
      r = Measured(argv, 300, common.quiet_env()).run()
      if r["returncode"] != 0:
        self.setup_notes.append("trainer.convert failed: " + _tail(r["stderr"]))
        self._tfrecord_dir = ""
      else:
        self.setup_notes.append(f"TFRecords by: {' '.join(argv[1:])} "
                                f"({r['wall_s']:.0f} s)")
        self._tfrecord_dir = out
    return self._tfrecord_dir or None

  def _trainer_flags(self, row: Row, model_dir: str, data: list[str]):
    steps = self._train_steps(row)
    return steps, [
        f"--model={row.model}", *data, f"--global_batch_size={row.batch}",
        "--optimizer=adam", f"--train_steps={steps}",
        f"--steps_per_loop={row.interval}", f"--summary_every={row.interval}",
        f"--checkpoint_every={steps}", "--eval_every=0", "--mode=train",
        f"--model_dir={model_dir}", *row.args]

  # -- kinds
  def run_row(self, row: Row, repeat: int) -> dict:
    budget = min(self.args.quiet_wait, self.quiet_budget)
    if budget > 0:
      t0 = time.monotonic()
      wait_for_quiet(budget)
      self.quiet_budget -= time.monotonic() - t0
    if row.kind in ("raw", "keras"):
      return self._run_worker(row)
    if row.kind == "raw_pinned":
      return self._run_raw_pinned(row)
    if row.kind == "framework":
      return self._run_framework(row, repeat)
    if row.kind == "launch":
      return self._run_launch(row, repeat)
    if row.kind == "accuracy":
      return self._run_accuracy(row, repeat)
    raise ValueError(row.kind)

  def _finish(self, row: Row, rates: list[float], m: dict, extra=None):
    steady = common.steady(rates)
    out = {"rates": rates, "steady": steady,
           "steps_per_sec": common.median(steady),
           "wall_s": m["wall_s"], "foreign_load": m["foreign_load"],
           **(extra or {})}
    if out["steps_per_sec"]:
      self.rate_estimates[row.name] = out["steps_per_sec"]
    if len(steady) < 1 and row.kind != "accuracy":
      out["error"] = "no steady-state intervals: " + _tail(m["stderr"], 2)
    return out

  def _run_worker(self, row: Row) -> dict:
    timeout = STARTUP_S * 3 + self.args.min_seconds * 8 + 60
    m = Measured(self._worker_argv(row), timeout, common.quiet_env()).run()
    result = common.parse_result(m["stdout"])
    if m["returncode"] != 0 or result is None:
      return {"error": f"exit {m['returncode']}: {_tail(m['stderr'])}",
              "wall_s": m["wall_s"], "foreign_load": m["foreign_load"]}
    return self._finish(row, result["rates"], m,
                        {"threads": result.get("threads")})

  def _run_raw_pinned(self, row: Row) -> dict:
    """`row.workers` independent raw loops at once, process i pinned to
    core i, no communication: the machine's own ceiling for data-parallel
    scaling over its cores (shared memory bandwidth and caches). The row's
    rate is the sum of the processes' updates/sec."""
    ncpu = len(os.sched_getaffinity(0))
    if row.workers > ncpu:
      return {"skipped": f"{row.workers} processes need {row.workers} cores; "
                         f"{ncpu} available"}
    per_process = dataclasses.replace(row, kind="raw",
                                      batch=row.batch // row.workers)
    argv = self._worker_argv(per_process)
    timeout = STARTUP_S * 3 + self.args.min_seconds * 8 + 60
    procs, t0 = [], time.monotonic()
    for core in range(row.workers):
      procs.append(subprocess.Popen(
          argv, cwd=REPO, env=common.quiet_env(), stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True,
          preexec_fn=lambda c=core: os.sched_setaffinity(0, {c})))
    outs = []
    try:
      for p in procs:
        left = max(1.0, timeout - (time.monotonic() - t0))
        outs.append(p.communicate(timeout=left))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
        p.wait()
      return {"error": "timeout", "wall_s": time.monotonic() - t0,
              "foreign_load": None}
    m = {"wall_s": time.monotonic() - t0, "foreign_load": None,
         "stderr": outs[-1][1]}
    results = [common.parse_result(out) for out, _ in outs]
    if any(p.returncode != 0 for p in procs) or None in results:
      return {"error": f"exit {[p.returncode for p in procs]}: "
                       f"{_tail(outs[-1][1])}", "wall_s": m["wall_s"],
              "foreign_load": None}
    # Interval i of every process ran at about the same time: sum them.
    n = min(len(r["rates"]) for r in results)
    rates = [sum(r["rates"][i] for r in results) / row.workers
             for i in range(n)]
    return self._finish(row, rates, m)

  def _framework_result(self, row, m, model_dir) -> dict:
    from bench import events
    if m["returncode"] != 0:
      return {"error": f"exit {m['returncode']}: {_tail(m['stderr'])}",
              "wall_s": m["wall_s"], "foreign_load": m["foreign_load"]}
    logged, wall = events.interval_rates(os.path.join(model_dir, "train"))
    out = self._finish(row, logged, m)
    out["wall_steps_per_sec"] = common.median(common.steady(wall))
    last = [l for l in m["stdout"].splitlines() if l.startswith("{")]
    if last:
      final = json.loads(last[-1])
      out["final"] = {k: final.get(k) for k in
                      ("global_step", "train_loss", "eval_accuracy",
                       "eval_loss", "nonfinite_steps")}
    if row.kind == "accuracy" and out.get("final", {}).get(
        "eval_accuracy") is None:
      out["error"] = "no eval_accuracy in the final JSON line"
    return out

  def _run_framework(self, row: Row, repeat: int) -> dict:
    data = self._data_flags(row)
    if data is None:
      return {"skipped": f"{row.dataset} data not available ({MNIST_DIR})"}
    model_dir = os.path.join(self.tmp, f"{row.name.replace('/', '_')}_{repeat}")
    steps, flags = self._trainer_flags(row, model_dir, data)
    argv = [self.python, "-m", "trainer.main", *flags]
    timeout = STARTUP_S * 3 + 3 * steps / self._estimate(row) + 60
    m = Measured(argv, timeout, common.quiet_env()).run()
    out = self._framework_result(row, m, model_dir)
    out["command"] = "python -m trainer.main " + " ".join(flags)
    shutil.rmtree(model_dir, ignore_errors=True)
    return out

  def _run_launch(self, row: Row, repeat: int) -> dict:
    import importlib.util
    if importlib.util.find_spec("launch.local") is None:
      return {"skipped": "launch.local not available"}
    model_dir = os.path.join(self.tmp, f"{row.name.replace('/', '_')}_{repeat}")
    steps, flags = self._trainer_flags(row, model_dir, self._data_flags(row))
    timeout = STARTUP_S * 4 + 3 * steps / self._estimate(row) + 90
    argv = [self.python, "-m", "launch.local", f"--workers={row.workers}",
            "--pin_cores", f"--timeout_s={timeout - 15:.0f}", "--", *flags]
    m = Measured(argv, timeout, common.quiet_env()).run()
    out = self._framework_result(row, m, model_dir)
    out["command"] = "python -m " + " ".join(argv[2:])
    shutil.rmtree(model_dir, ignore_errors=True)
    return out

  def _run_accuracy(self, row: Row, repeat: int) -> dict:
    data = self._data_flags(row)
    if data is None:   # no MNIST: the small digits set that sklearn ships
      data = ["--dataset=digits", "--train_split=train"]
      eval_split = "test"
    else:
      eval_split = "test[8000:]"
    model_dir = os.path.join(self.tmp, f"{row.name.replace('/', '_')}_{repeat}")
    steps = self.args.accuracy_steps
    flags = [f"--model={row.model}", *data, f"--eval_split={eval_split}",
             f"--global_batch_size={row.batch}", "--optimizer=adam",
             f"--train_steps={steps}", f"--steps_per_loop={row.interval}",
             f"--summary_every={row.interval}", f"--checkpoint_every={steps}",
             "--eval_every=0", "--mode=train_and_eval",
             f"--model_dir={model_dir}", *row.args]
    argv = [self.python, "-m", "trainer.main", *flags]
    m = Measured(argv, 600, common.quiet_env()).run()
    out = self._framework_result(row, m, model_dir)
    out["command"] = "python -m trainer.main " + " ".join(flags)
    shutil.rmtree(model_dir, ignore_errors=True)
    return out

  # -- one-off measurements
  def ceiling(self) -> dict:
    out = {}
    for dtype in ("float32", "bfloat16"):
      argv = [self.python, "-m", "bench.workers", "matmul", "--size=4096",
              f"--dtype={dtype}", f"--min_intervals={self.args.matmul_reps}"]
      m = Measured(argv, 300, common.quiet_env()).run()
      r = common.parse_result(m["stdout"])
      out[dtype] = ({"gflops": common.median(r["gflops"]), "runs": r["gflops"],
                     "foreign_load": m["foreign_load"], "size": r["size"]}
                    if r else {"error": _tail(m["stderr"])})
    return out

  def flops(self, models) -> dict:
    argv = [self.python, "-m", "bench.workers", "flops",
            f"--model={','.join(sorted(models))}"]
    m = Measured(argv, 300, common.quiet_env()).run()
    r = common.parse_result(m["stdout"])
    return r or {"error": _tail(m["stderr"])}


# ---- the whole run ---------------------------------------------------------
def select_rows(args) -> list[Row]:
  rows = catalog()
  if args.rows:
    # Diagnosis rows only by their full name or group.
    wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
    chosen = [r for r in rows
              if any(r.name == w or r.group == w or r.name.startswith(w + "/")
                     or (w.endswith("*") and r.name.startswith(w[:-1]))
                     for w in wanted)]
    unknown = [w for w in wanted
               if not any(r.name == w or r.group == w or
                          r.name.startswith(w.rstrip("*")) for r in rows)]
    if unknown:
      sys.exit(f"bench.run: unknown row(s) {unknown}; see --list")
    return chosen
  if args.quick:
    return [r for r in rows if r.quick]
  return [r for r in rows if not r.extra]


def machine_info() -> dict:
  """bench.machine's record (CPU, TF-relevant flags, cores, load) and the
  git revision."""
  info = machine.info()
  try:
    info["git"] = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO,
        capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return info


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="bench.run", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="~3 minute subset, one repeat, 3 s steady state")
  p.add_argument("--rows", default="",
                 help="comma-separated row names or groups (see --list)")
  p.add_argument("--repeats", type=int, default=None,
                 help="runs per row, interleaved (default 2; --quick 1)")
  p.add_argument("--min_seconds", type=float, default=None,
                 help="steady-state seconds per run (default 5; --quick 3)")
  p.add_argument("--min_intervals", type=int, default=3,
                 help="steady-state intervals per run at least")
  p.add_argument("--accuracy_steps", type=int, default=300,
                 help="updates of each accuracy run (batch 128, MNIST 8000)")
  p.add_argument("--matmul_reps", type=int, default=5)
  p.add_argument("--quiet_wait", type=float, default=15.0,
                 help="before each run, wait up to this long for other "
                      "processes to use < 25%% of the CPUs (0: do not wait)")
  p.add_argument("--quiet_budget", type=float, default=60.0,
                 help="total seconds the quiet waits may take in one run")
  p.add_argument("--no_ceiling", action="store_true",
                 help="skip the matmul ceiling")
  p.add_argument("--out", default=RESULTS, help="directory for latest.md/json")
  p.add_argument("--keep_tmp", action="store_true")
  p.add_argument("--list", action="store_true", help="list rows and exit")
  args = p.parse_args(argv)
  if args.repeats is None:
    args.repeats = 1 if args.quick else 2
  if args.min_seconds is None:
    args.min_seconds = 3.0 if args.quick else 5.0
  if args.quick:
    args.matmul_reps = min(args.matmul_reps, 3)
  if args.list:
    shown = select_rows(args) if (args.rows or args.quick) else catalog()
    print("flags: q = in --quick, c = every repeat (a goal uses it), "
          "x = diagnosis only (run when named in --rows)")
    for r in shown:
      marks = ("q" if r.quick else "-") + ("c" if r.core else "-") + \
          ("x" if r.extra else "-")
      print(f"{r.name:28s} {marks}  {r.describe()}")
    return 0
  rows = select_rows(args)

  began = time.monotonic()
  load_start = machine.load()
  started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  bench = Bench(args)
  log(f"{len(rows)} rows x {args.repeats} repeats; temp dir {bench.tmp}")
  results = {r.name: [] for r in rows}
  flops, ceiling, interrupted = {}, {}, False
  try:
    models = sorted({r.model for r in rows})
    flops = bench.flops(models)
    log(f"FLOPs counted ({', '.join(models)})")
    ceiling = {} if args.no_ceiling else bench.ceiling()
    if ceiling:
      log("matmul ceiling: " + ", ".join(
          f"{k} {v.get('gflops', 0) or 0:.0f} GFLOP/s" for k, v in ceiling.items()))
    for repeat in range(args.repeats):
      order = rows if repeat % 2 == 0 else list(reversed(rows))
      for row in order:
        if repeat > 0 and not (row.core or args.rows):
          continue   # one run of rows no goal depends on (time budget)
        r = bench.run_row(row, repeat)
        results[row.name].append(r)
        if "skipped" in r:
          log(f"{row.name}: skipped: {r['skipped']}")
        elif "error" in r:
          log(f"{row.name}: ERROR {r['error']}")
        else:
          extra = ""
          if r.get("final", {}).get("eval_accuracy") is not None:
            extra = f", eval_accuracy {r['final']['eval_accuracy']:.4f}"
          log(f"{row.name} [{repeat + 1}/{args.repeats}]: "
              f"{r['steps_per_sec']:.2f} steps/s ({len(r['steady'])} "
              f"intervals, {r['wall_s']:.0f} s, other load "
              f"{100 * (r['foreign_load'] or 0):.0f}%){extra}")
  except KeyboardInterrupt:
    interrupted = True
    log("interrupted: reporting the runs done so far")
  finally:
    bench.close()
  data = report.assemble(
      rows, results, flops, ceiling,
      {"mode": "quick" if args.quick else ("rows" if args.rows else "full"),
       "argv": sys.argv[1:] if argv is None else argv,
       "repeats": args.repeats, "min_seconds": args.min_seconds,
       "min_intervals": args.min_intervals,
       "warmup_intervals": common.WARMUP_INTERVALS,
       "started": started_at, "duration_s": round(time.monotonic() - began),
       "machine": {**machine_info(), "load_start": load_start,
                   **flops.get("versions", {}),
                   "threads": flops.get("threads")},
       "setup_notes": bench.setup_notes, "interrupted": interrupted})
  text = report.terminal(data)
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "latest.json"), "w") as f:
    json.dump(data, f, indent=1)
  with open(os.path.join(args.out, "latest.md"), "w") as f:
    f.write(report.markdown(data))
  log(f"wrote {os.path.join(args.out, 'latest.md')} and latest.json "
      f"({data['run']['duration_s']} s)")
  return 130 if interrupted else 0


if __name__ == "__main__":
  sys.exit(main())
