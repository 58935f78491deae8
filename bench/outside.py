"""`python -m bench.outside`: the trainer's CLI against a hand-written loop
and Keras `fit`, each a WHOLE process timed from outside.

  python -m bench.outside --rounds=5
  python -m bench.outside --contenders=cli,probe_off,raw,keras --rounds=5
  python -m bench.outside --contenders=cli,probe_off,steps_per_loop_100,no_summaries,raw --rounds=3

What a user waits for is a whole process, not a chunk: imports, building,
tracing, the input pipeline, the loop and its host work, the last
checkpoint. Start-up is seconds and noisy, so each contender runs twice per
round, --long and --short updates (references: --ref_long and --short),
and its figure is the difference: (T_long - T_short) / (long - short)
seconds per update. Everything both runs do once (start-up, tracing, the
warm-up of the first updates, the final checkpoint) cancels; what is left
is the steady cost of one update, as the process runs it. References
differenced over fewer than ~2,000 updates are noise (a second of start-up
jitter is then several per cent).

Contenders (cnn, batch --batch, Adam 1e-3, the same examples):
  cli        python -m trainer.main with the CLI's defaults for the loop
             (--steps_per_loop=50, --summary_every=100,
             --input_wait_steps=10, --progress=auto: a log line per summary
             here), --mode=train --eval_every=0 --checkpoint_every=N: one
             checkpoint at the end, no evaluation (what the hand-written
             loop does not do either)
  probe_off  cli with --input_wait_steps=0 (as under --deterministic)
  deterministic  cli with --deterministic (TF op determinism, probe off)
  steps_per_loop_100  cli with --steps_per_loop=100: half the chunks, half
             the per-chunk host syncs
  no_summaries  cli with --summary_every=1000000: no train summaries or
             progress lines but the last (the probe then times the last
             updates of the run only)
  bare       cli with --steps_per_loop=1000 --summary_every=1000000
             --input_wait_steps=0: the loop with the least host work
  all_defaults  cli with every default (checkpoint and evaluation of the
             whole split every 500 updates, a final evaluation)
  raw        a hand-written loop in its own process: the examples in
             memory as float32 once, tf.data shuffle(1024) / repeat / batch
             / prefetch, one tf.function of 50 updates (tf.range loop,
             GradientTape, Keras Adam) called repeatedly, the loss read
             after each call (bench.workers' step and loop)
  keras      Keras Model.fit(steps_per_execution=50) on the same tf.data
             pipeline, accuracy as metric, verbose=0
  NAME:FLAGS (--contenders=...) any other cli variant, e.g.
             "spl25:--steps_per_loop=25 --summary_every=50"

Rounds interleave the contenders (the order rotates each round; short and
long alternate) so machine drift hits them alike. The table gives each
contender's differenced ms/update per round, best and median, and its
process CPU per update (user + system, differenced the same way: on a
loaded machine the CPU moves less than the wall clock). Then, for each
reference, the per-round ratio reference time / contender time (> 1:
the contender is faster) as min / median / max, and best / best. The first
line names the machine (CPU model, flags, load), the last the load after.

Data: MNIST (its test split, 10,000 digits; --data_dir, default
../shared/data/mnist next to the repository or one level up) or, without
it, the 1,797 8x8 digits (a note says so).
"""

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # before any TF import

from bench import common, end_to_end, machine  # noqa: E402

REFERENCES = ("raw", "keras")
LOOP_UPDATES = 50    # the raw loop's updates per call; Keras' steps_per_execution
# Built-in cli variants: flags added to the cli contender's.
VARIANTS = {
    "cli": [],
    "probe_off": ["--input_wait_steps=0"],
    "deterministic": ["--deterministic"],
    "steps_per_loop_100": ["--steps_per_loop=100"],
    "no_summaries": ["--summary_every=1000000"],
    "bare": ["--steps_per_loop=1000", "--summary_every=1000000",
             "--input_wait_steps=0"],
    "all_defaults": [],   # by name: none of the loop-only flags (cli_flags)
}


# ---- pure arithmetic and parsing (tests/unit/test_bench_outside.py) --------
def per_update(long_s: float, short_s: float, long_n: int,
               short_n: int) -> float:
  """Seconds per update from two whole runs of `long_n` and `short_n`
  updates: the difference cancels what both runs do once.

  >>> round(per_update(30.0, 9.5, 4100, 100), 6)
  0.005125
  """
  if long_n <= short_n:
    raise ValueError(f"long run ({long_n}) must be longer than the short "
                     f"run ({short_n})")
  return (long_s - short_s) / (long_n - short_n)


def ratios(reference: list[float], contender: list[float]) -> dict:
  """Per-round reference / contender (> 1: the contender is faster) as
  min, median and max, and best / best (each side's smallest time).
  A round where either differenced time is not positive (start-up jitter
  larger than the difference: a loaded machine) counts as `dropped`."""
  pairs = list(zip(reference, contender))
  kept = [(r, c) for r, c in pairs if r > 0 and c > 0]
  out = {"dropped": len(pairs) - len(kept)}
  if not kept:
    return out
  per_round = [r / c for r, c in kept]
  return {**out, "min": min(per_round), "median": statistics.median(per_round),
          "max": max(per_round), "rounds": per_round,
          "best": min(r for r, _ in kept) / min(c for _, c in kept)}


def parse_contenders(text: str) -> dict:
  """"cli,raw,x:--a=1 --b" -> {name: flags}: None for a reference (raw,
  keras), the extra trainer flags of a cli variant otherwise (a built-in
  name or NAME:FLAGS)."""
  out = {}
  for item in (part.strip() for part in text.split(",")):
    if not item:
      continue
    name, sep, flags = item.partition(":")
    name = name.strip()
    if not name or name in out:
      raise ValueError(f"contender {item!r}: empty or repeated name")
    if sep:
      words = shlex.split(flags)
      bad = [w for w in words if not w.startswith("--")]
      if bad:
        raise ValueError(f"contender {name!r}: {bad} are not --flags")
      out[name] = words
    elif name in REFERENCES:
      out[name] = None
    elif name in VARIANTS:
      out[name] = VARIANTS[name]
    else:
      raise ValueError(f"unknown contender {name!r}: one of "
                       f"{sorted([*VARIANTS, *REFERENCES])} or NAME:FLAGS")
  if not any(flags is not None for flags in out.values()):
    raise ValueError("no cli contender to compare")
  return out


def schedule(names: list[str], round_index: int) -> list[tuple[str, str]]:
  """One round's runs, (contender, "short" | "long") in order: the
  contenders' order rotates each round, and which of its two runs comes
  first alternates.

  >>> schedule(["a", "b"], 1)
  [('b', 'long'), ('b', 'short'), ('a', 'long'), ('a', 'short')]
  """
  k = round_index % len(names)
  order = names[k:] + names[:k]
  pair = ("short", "long") if round_index % 2 == 0 else ("long", "short")
  return [(name, which) for name in order for which in pair]


# ---- the processes ---------------------------------------------------------
def default_data_dir() -> str:
  return end_to_end.find_mnist()


def data_fields(data_dir: str) -> dict:
  """The trainer flags of the examples every contender reads."""
  fields = end_to_end.data_settings("auto", data_dir)["fields"]
  out = {k: v for k, v in fields.items() if k in ("dataset", "data_dir",
                                                  "train_split")}
  if out["dataset"] == "synthetic":   # no MNIST: real digits, small
    out = {"dataset": "digits", "train_split": "train"}
  return out


def cli_flags(extra, steps: int, model_dir: str, args) -> list[str]:
  data = data_fields(args.data_dir)
  flags = [f"--{k}={v}" for k, v in data.items()]
  flags += [f"--model={args.model}", f"--global_batch_size={args.batch}",
            "--optimizer=adam", f"--train_steps={steps}",
            f"--model_dir={model_dir}"]
  if extra is None:    # all_defaults: evaluation and checkpoints as they come
    return flags + ([f"--eval_split={data['train_split']}"]
                    if data["dataset"] == "mnist" else [])
  return flags + ["--mode=train", "--eval_every=0",
                  f"--checkpoint_every={steps}", *extra]


def argv_of(name: str, extra, steps: int, model_dir: str, args) -> list[str]:
  python = sys.executable
  if name in REFERENCES and extra is None:
    return [python, "-m", "bench.outside", f"--worker={name}",
            f"--steps={steps}", f"--model={args.model}",
            f"--batch={args.batch}", f"--data_dir={args.data_dir}"]
  return [python, "-m", "trainer.main",
          *cli_flags(None if name == "all_defaults" else extra, steps,
                     model_dir, args)]


def run_once(argv: list[str], timeout_s: float, log_path: str) -> dict:
  """One whole process: wall and CPU seconds (bench.run.Measured)."""
  from bench.run import Measured
  m = Measured(argv, timeout_s, common.quiet_env()).run()
  with open(log_path, "w") as f:
    f.write(" ".join(argv) + "\n" + m["stdout"] + m["stderr"])
  if m["returncode"] != 0:
    tail = " | ".join(m["stderr"].strip().splitlines()[-4:])[-600:]
    raise SystemExit(f"bench.outside: {' '.join(argv[1:4])} ... exited "
                     f"{m['returncode']}: {tail} (log: {log_path})")
  return m


# ---- the reference workers (one process each) ------------------------------
def _examples(args):
  """The examples the cli reads, in memory as its preprocessing gives
  them: float32 in [0, 1], int32 labels (read by the trainer's reader, at
  start-up: it cancels)."""
  from trainer import build
  from trainer.config import Config
  fields = data_fields(args.data_dir)
  task = build.task_of(Config(model=args.model, **fields))
  source = task.source(fields["train_split"])
  return (*end_to_end.in_memory(source), source.num_classes)


def worker(args) -> int:
  import keras
  import tensorflow as tf
  import layers
  from bench import workers
  images, labels, num_classes = _examples(args)
  keras.utils.set_random_seed(0)
  model = layers.get(args.model)(images.shape[1:], num_classes)
  ds = tf.data.Dataset.from_tensor_slices((images, labels))
  ds = ds.shuffle(1024, seed=0).repeat().batch(args.batch,
                                               drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  if args.worker == "keras":
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], steps_per_execution=LOOP_UPDATES)
    history = model.fit(ds, epochs=1, steps_per_epoch=args.steps, verbose=0)
    done = int(model.optimizer.iterations.numpy())
    if done != args.steps:
      raise SystemExit(f"keras fit ran {done} updates, not {args.steps}")
    print(f"keras fit: {done} updates, loss "
          f"{history.history['loss'][-1]:.4f}")
    return 0
  optimizer = keras.optimizers.Adam(learning_rate=1e-3)
  optimizer.build(model.trainable_variables)
  loop = workers.make_loop(workers.make_step(model, optimizer), iter(ds))
  done, loss = 0, None
  while done < args.steps:
    n = min(LOOP_UPDATES, args.steps - done)
    loss = float(loop(tf.constant(n)))
    done += n
  print(f"raw loop: {done} updates, loss {loss:.4f}")
  return 0


# ---- the rounds ------------------------------------------------------------
def _load_text() -> str:
  now = machine.load()
  return "/".join(f"{x:.2f}" for x in now) if now else "?"


def measure(args, contenders: dict, tmp: str) -> tuple[dict, dict, list]:
  """{name: [s/update per round]} by wall clock and by process CPU, and
  the load average before each round."""
  names = list(contenders)
  wall = {n: [] for n in names}
  cpu = {n: [] for n in names}
  loads = []
  lengths = {n: ((args.ref_long if contenders[n] is None else args.long),
                 args.short) for n in names}
  for r in range(args.rounds):
    loads.append(_load_text())
    got = {}
    for name, which in schedule(names, r):
      steps = lengths[name][0 if which == "long" else 1]
      model_dir = os.path.join(tmp, f"{name}_{r}_{which}")
      argv = argv_of(name, contenders[name], steps, model_dir, args)
      timeout = args.startup_timeout_s + steps * args.max_update_s
      m = run_once(argv, timeout, os.path.join(tmp, f"{name}_{r}_{which}.log"))
      got[(name, which)] = m
      shutil.rmtree(model_dir, ignore_errors=True)
      print(f"[round {r + 1}/{args.rounds} {time.strftime('%H:%M:%S')}] "
            f"{name} {steps} updates: {m['wall_s']:.2f} s wall, "
            f"{m['cpu_s']:.2f} s CPU", file=sys.stderr, flush=True)
    for name in names:
      long_n, short_n = lengths[name]
      a, b = got[(name, "long")], got[(name, "short")]
      wall[name].append(per_update(a["wall_s"], b["wall_s"], long_n,
                                   short_n))
      cpu[name].append(per_update(a["cpu_s"], b["cpu_s"], long_n, short_n))
  return wall, cpu, loads


def report(args, contenders: dict, wall: dict, cpu: dict, loads: list,
           at_start: dict) -> None:
  print(machine.header(at_start) + f"; after: load avg {_load_text()}")
  data = data_fields(args.data_dir)
  note = ("" if data["dataset"] == "mnist" else
          " (no MNIST in --data_dir: sklearn's 8x8 digits instead)")
  print(f"{args.model} batch {args.batch} on {data['dataset']} "
        f"{data['train_split']}{note}; {args.rounds} rounds; ms/update = "
        f"(T(long) - T(short)) / (long - short) of whole processes, cli "
        f"{args.long} - {args.short}, references {args.ref_long} - "
        f"{args.short} updates; load avg before each round: "
        + ", ".join(loads))
  for name, ts in wall.items():
    rounds = " ".join(f"{1000 * t:.2f}" for t in ts)
    print(f"  {name:20s} best {1000 * min(ts):6.3f}  median "
          f"{1000 * statistics.median(ts):6.3f} ms/update  CPU median "
          f"{1000 * statistics.median(cpu[name]):6.3f} ms/update  "
          f"[rounds: {rounds}]")
  for ref in (n for n in REFERENCES if n in wall and contenders[n] is None):
    for name in (n for n in wall if contenders[n] is not None):
      parts = []
      for clock, times in (("wall", wall), ("CPU", cpu)):
        q = ratios(times[ref], times[name])
        text = (f"{clock}: per round min {q['min']:.3f} median "
                f"{q['median']:.3f} max {q['max']:.3f}, best/best "
                f"{q['best']:.3f}" if "min" in q else f"{clock}: no round")
        if q["dropped"]:
          text += f" ({q['dropped']} round(s) dropped: difference <= 0)"
        parts.append(text)
      print(f"  {name} x {ref}: " + "; ".join(parts))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="bench.outside", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--contenders", default="cli,probe_off,raw,keras",
                 help="comma-separated: cli variants (module doc), raw, "
                      "keras, or NAME:FLAGS")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--long", type=int, default=4100,
                 help="updates of a cli contender's long run")
  p.add_argument("--ref_long", type=int, default=2100,
                 help="updates of a reference's long run")
  p.add_argument("--short", type=int, default=100,
                 help="updates of every contender's short run")
  p.add_argument("--model", default="cnn")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--data_dir", default=None,
                 help="MNIST's directory (default: ../shared/data/mnist "
                      "next to the repository or one level up)")
  p.add_argument("--startup_timeout_s", type=float, default=180.0)
  p.add_argument("--max_update_s", type=float, default=0.1,
                 help="timeout allowance per update of a run")
  p.add_argument("--worker", choices=REFERENCES, default=None,
                 help=argparse.SUPPRESS)
  p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.data_dir is None:
    args.data_dir = default_data_dir()
  if args.worker:
    return worker(args)
  try:
    contenders = parse_contenders(args.contenders)
  except ValueError as e:
    raise SystemExit(f"bench.outside: --contenders: {e}") from None
  if min(args.long, args.ref_long) <= args.short or args.rounds < 1:
    raise SystemExit("bench.outside: --long and --ref_long must exceed "
                     "--short, and --rounds must be >= 1.")
  at_start = machine.info()
  with tempfile.TemporaryDirectory(prefix="bench_outside_") as tmp:
    wall, cpu, loads = measure(args, contenders, tmp)
  report(args, contenders, wall, cpu, loads, at_start)
  return 0


if __name__ == "__main__":
  sys.exit(main())
