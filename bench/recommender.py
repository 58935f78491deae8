"""The recommender (examples.recommender) at table sizes: peak RSS against
weights + slots, step time against the table's rows, parameter servers.

  python -m bench.recommender rss [--rows=2000000] [--shadow] [--resume]
      peak RSS (ru_maxrss of a child process running the trainer with
      default flags, 100 updates, a checkpoint and an evaluation) of the
      model with a ROWS x 32 user table under LazyAdam, and of the same
      run with a 1-row table (the fixed overhead); reports
      (peak - overhead) / (weights + slots). --shadow: force the chunk
      guard's shadow copy (what every run took before shadow_pays).
      --resume: the peak of a second process that restores the first's
      last checkpoint and runs 100 more updates (both sizes alike).
  python -m bench.recommender steps [--rows=10000,1000000] [--rounds=2]
      updates/s at each table size (same batch of 256), child processes
      in turn, the median per size and the ratio to the first.
  python -m bench.recommender ps [--rows=1000000] [--rss]
      updates/s of launch.local --workers=2 --ps=2 with the table sharded
      over the ps (default --ps_shard_min_bytes) and unsharded. --rss:
      also each process's peak RSS (launch.local's own, the chief's
      (coordinator), each worker's and each ps's, read from /proc while
      it runs) and the same run's with a 1-row table (the fixed overhead).
Every output starts with the machine line (bench/machine.py).
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile

from bench import machine
from bench.common import TreePeaks, median, quiet_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "examples.recommender:Recommender"
_FLAGS = ["--global_batch_size=256", "--learning_rate=0.01"]


def weights_and_slots_bytes(rows: int) -> int:
  """The model's float32 weights plus LazyAdam's two slots of each."""
  from examples import recommender
  floats = (rows * recommender.DIM + recommender.ITEMS * recommender.DIM
            + recommender.ITEMS)
  return 3 * 4 * floats


def _child(args) -> None:
  """One training run in this process; prints a JSON line."""
  import contextlib
  import trainer
  from trainer import guard
  if args.shadow:
    guard.shadow_pays = lambda optimizers: True
  with (contextlib.nullcontext(args.model_dir) if args.model_dir
        else tempfile.TemporaryDirectory()) as model_dir:
    config = trainer.Config(
        task=TASK, task_args=f"user_rows={args.rows}", train_steps=args.steps,
        global_batch_size=256, learning_rate=0.01, model_dir=model_dir,
        progress="log", **({"eval_every": 0, "mode": "train",
                            "checkpoint_every": 1 << 30}
                           if args.child == "steps" else {}))
    result = trainer.train(config)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({"rows": args.rows, "peak_rss": peak,
                    "steps_per_sec": result["steps_per_sec"],
                    "eval_recall_at_10": result.get("eval_recall_at_10")}),
        flush=True)


def _run_child(mode: str, rows: int, steps: int, shadow: bool = False,
               model_dir: str = "") -> dict:
  cmd = [sys.executable, "-m", "bench.recommender", f"--child={mode}",
         f"--rows={rows}", f"--steps={steps}"] + (["--shadow"] if shadow
                                                  else [])
  cmd += [f"--model_dir={model_dir}"] if model_dir else []
  proc = subprocess.run(cmd, cwd=REPO, env=quiet_env(), capture_output=True,
                        text=True, timeout=1800)
  if proc.returncode:
    raise SystemExit(f"child failed: {proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _resumed(rows: int, shadow: bool) -> dict:
  """The second of two runs in one --model_dir: it restores the first's
  last checkpoint (100 updates) and runs 100 more."""
  with tempfile.TemporaryDirectory() as model_dir:
    _run_child("rss", rows, 100, shadow, model_dir)
    return _run_child("rss", rows, 200, shadow, model_dir)


def rss(args) -> None:
  run = _resumed if args.resume else (
      lambda rows, shadow: _run_child("rss", rows, 100, shadow))
  empty = run(1, args.shadow)
  full = run(args.rows, args.shadow)
  overhead, peak = empty["peak_rss"], full["peak_rss"]
  need = weights_and_slots_bytes(args.rows)
  mb = lambda b: f"{b / 2**20:.0f} MB"  # noqa: E731
  print(f"rss rows={args.rows} shadow={args.shadow} resume={args.resume}: "
        f"peak {mb(peak)}, "
        f"1-row model {mb(overhead)}, weights+slots {mb(need)}, "
        f"(peak - overhead) / (weights+slots) = "
        f"{(peak - overhead) / need:.2f}")


def steps(args) -> None:
  sizes = [int(r) for r in args.rows_list.split(",")]
  rates = {n: [] for n in sizes}
  for _ in range(args.rounds):
    for n in sizes:
      rates[n].append(_run_child("steps", n, 600)["steps_per_sec"])
  base = median(rates[sizes[0]])
  for n in sizes:
    print(f"steps rows={n}: {median(rates[n]):.1f} updates/s "
          f"(runs {', '.join(f'{r:.1f}' for r in rates[n])}); "
          f"step time x{base / median(rates[n]):.2f} of rows={sizes[0]}")


def _launch(rows: int, extra=()) -> tuple[dict, dict]:
  """launch.local --workers=2 --ps=2 training the recommender (300
  updates): its JSON line and each process's peak RSS (MB) by role."""
  with tempfile.TemporaryDirectory() as model_dir:
    cmd = [sys.executable, "-m", "launch.local", "--workers=2", "--ps=2",
           "--", "--strategy=parameter_server", f"--task={TASK}",
           f"--task_args=user_rows={rows}", *_FLAGS,
           "--train_steps=300", "--eval_every=0", "--mode=train",
           f"--model_dir={model_dir}", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=quiet_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peaks = TreePeaks(proc.pid)
    try:
      stdout, stderr = proc.communicate(timeout=1800)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
      roles = peaks.stop()
    lines = [ln for ln in stdout.splitlines()
             if re.match(r"\s*\{.*\}\s*$", ln)]
    if proc.returncode or not lines:
      raise SystemExit(f"rows={rows} {' '.join(extra)} failed: "
                       f"{stderr[-2000:]}")
    return json.loads(lines[-1]), roles


def ps(args) -> None:
  """Updates/s sharded and unsharded; with --rss, each process's peak RSS
  against the same run with a 1-row table."""
  runs = {}
  if args.rss:
    runs["1-row"] = _launch(1)
  for label, extra in (("sharded", []),
                       ("unsharded", [f"--ps_shard_min_bytes={1 << 40}"])):
    result, roles = runs[label] = _launch(args.rows, extra)
    print(f"ps {label} rows={args.rows}: "
          f"{result['steps_per_sec']:.1f} updates/s", flush=True)
  if not args.rss:
    return
  empty = runs["1-row"][1]
  need = weights_and_slots_bytes(args.rows) / 2**20
  print(f"peak RSS (MB) by process, rows={args.rows} (weights + slots "
        f"{need:.0f} MB; a ps's share of them, sharded: {need / 2:.0f} MB)"
        " and with a 1-row table:")
  for role in sorted(set(empty) | set(runs["sharded"][1])):
    base = empty.get(role)
    cells = [f"{role:>34}", f"1-row {base or 0:7.0f}"]
    for label in ("sharded", "unsharded"):
      peak = runs[label][1].get(role)
      if peak is None:
        continue
      cells.append(f"{label} {peak:7.0f} (+{peak - (base or 0):.0f})")
    print("  ".join(cells))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("mode", nargs="?", choices=("rss", "steps", "ps"))
  parser.add_argument("--rows", type=int, default=0)
  parser.add_argument("--rows_list", default="10000,1000000")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--shadow", action="store_true")
  parser.add_argument("--resume", action="store_true")
  parser.add_argument("--rss", action="store_true",
                      help="ps: each process's peak RSS too")
  parser.add_argument("--model_dir", default="", help=argparse.SUPPRESS)
  parser.add_argument("--child", choices=("rss", "steps"))
  args = parser.parse_args()
  if args.child:
    _child(args)
    return
  print(machine.header(machine.info()), flush=True)
  if not args.rows:
    args.rows = 2_000_000 if args.mode == "rss" else 1_000_000
  {"rss": rss, "steps": steps, "ps": ps}[args.mode or "rss"](args)


if __name__ == "__main__":
  main()
