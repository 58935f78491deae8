"""`python -m bench.paired`: the framework's step against the raw loop in ONE
process, interleaved chunk by chunk.

  python -m bench.paired --model=cnn --batch=32 --rounds=60

On a noisy machine two runs of the same row in `bench.run` differ by up to
25%; the cost of the framework is a few per cent. Here every round runs one
chunk (--interval updates) of each contender back to back, so machine drift
hits all of them alike, and the figure is the median over rounds of the
per-round ratio raw time / contender time (with its quartiles).

The first line of the output names the machine (bench.machine): CPU model,
the instruction-set flags TF's kernels depend on (avx512f, avx512_bf16,
amx_*), cores, and the load average before the run and after it.

Contenders, all on the same model, batch and Adam:
  raw          bench.workers' hand-written loop, Keras' Adam
  raw_fused    the same loop with the framework's optimizer (fused kernels)
  framework    trainer Steps.unguarded_chunk: the chunk the trainer runs (per-chunk
               non-finite guard), on the framework's own input pipeline
  framework_guarded  Steps.guarded_loop: the per-update guard (tf.cond)
Summaries, checkpoints and the input-wait probe run between chunks in the
trainer and are not part of a chunk; bench.run's rows include them, and so
does the end-to-end row.

The end-to-end row (`--end_to_end`; bench/end_to_end.py has the details):
the trainer's real Controller.train with CLI defaults, one round = one
summary interval (--interval, default 100 updates) of each of
  raw_data          a hand-written loop on the same examples in memory (x raw = 1)
  framework         Steps.unguarded_chunk on the trainer's pipeline
  framework_cached  the same chunk on 32 cached batches (no pipeline work)
  end_to_end        the trainer's loop from one summary write to the next
                    (pipeline, probe, progress, checks, summary included)
on --data=auto (../shared/data/mnist's test split if present, else
synthetic), printed with the share of end_to_end spent inside the chunks.
A pause of --settle seconds (default 0.5 in this mode) comes before every
timed interval, the trainer's included: no pipeline's refill lands in
another contender's time (bench/end_to_end.py).

  python -m bench.paired --end_to_end --model=cnn --batch=32 --rounds=20

On-disk input (`--on_disk`; the goal: >= 0.9 of in-memory), the
trainer's chunk (cnn, Adam, --batch) on three sources of one shape
(--image_size, square, 1 channel):
  in_memory     --dataset=synthetic arrays of that shape (x raw = 1)
  image_folder  --examples JPEGs (bench.data_scaling.write) in a folder,
                read lazily with --image_size: read, decode, random-resized
                crop and resize per batch
  array_record  the same JPEGs in ArrayRecord shards, read the same way
Before each timed chunk the process sleeps --settle seconds: a contender's
pipeline keeps filling its prefetch buffer after its chunk, and that work
must not land in the next contender's time.

Any mode with --settle=S > 0 also prints, per contender, the process CPU
spent during the settle after its chunk: the work its input pipeline does
once the chunk has returned (a bias when no settle is given: it would run
inside the next contender's time, and its batches would come ready for
its own next chunk). For the default contenders it is ~0.1 ms after a
chunk of 150+ ms: their pipelines keep their buffers full while the step
runs, so a chunk's end leaves about one batch to refill.

Mixed precision (`--mixed_precision=mixed_bfloat16`): the contenders are
  raw, raw_mixed_bfloat16, framework, framework_mixed_bfloat16
(the same loops, the second of each pair under that Keras policy), so x raw
is the speed-up over the fp32 hand-written loop. Accuracy is not measured
here: compare eval_accuracy of two real runs (bench/README.md).

The GAN row (`--gan`; --model is then ignored), examples/dcgan.py at --batch:
  gan_raw        bench.gan's hand-written loop: tf.function, GradientTape,
                 two Keras Adams, simultaneous updates (x raw = 1)
  gan_framework  Steps.unguarded_chunk of the trainer on examples.dcgan:DCGAN
                 (its two optimizers, one reduction each, per-example noise
                 from the stream position), on the framework's input pipeline

The topology row (`--topology=V`): the cost of --deterministic=topology
  raw                 bench.workers' hand-written loop (x raw = 1)
  framework           Steps.unguarded_chunk, as above
  framework_topology  the same with --deterministic=topology
                      --virtual_shards=V: V shards of batch/V examples,
                      each its own forward and backward, summed exactly
TF op determinism is process-wide: all three run under it.

The sequence row (`--lm`; --model is then ignored), examples/lm.py at
--batch packed rows of 128 bytes (bench.lm.TASK_ARGS):
  lm_raw         bench.lm's hand-written loop: tf.function, GradientTape,
                 Keras' Adam, loss per real token of the batch, on the same
                 packed rows read by the same text source (x raw = 1)
  lm_framework   Steps.unguarded_chunk of the trainer on examples.lm:ByteLM
                 (ctx.scale_loss(mean_over="weights"): the token total
                 travels in the update's one reduction), on the framework's
                 input pipeline

`--clock=cpu` times each chunk by the process's CPU time instead of the
wall clock: on a machine other processes load, wall times swing with
scheduling (quartiles of 0.7-1.24 at load average 10-20), while the CPU a
chunk takes barely moves; it counts the input pipeline's threads too,
which is the same for both contenders when their pipelines match.

Multi-worker (each process one worker of a MultiWorkerMirroredStrategy):

  python -m launch.local --workers=2 --pin_cores --trainer_module=bench.paired \
      -- --strategy=multiworker --batch=128 --rounds=30

--batch is then the GLOBAL batch, and the contenders are
  raw          the hand-written loop under the same strategy: strategy.run of
               the step, Keras' Adam all-reducing the gradients (x raw = 1)
  framework    Steps.unguarded_chunk, as above
  raw_local    the hand-written loop on this worker's share of the batch,
               outside the strategy: no communication at all (each worker
               runs it at the same time as the others)
so raw / raw_local is what TF's collectives cost, and framework / raw what
the framework costs on top. How far 2 workers can scale on the machine at
all: raw_local at 2 workers against a 1-worker run's raw_local.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import common, end_to_end, framework, machine  # noqa: E402


def _raw(args, fused: bool, precision: str = "float32"):
  """bench.workers' raw loop, as a callable running one chunk."""
  import numpy as np
  import tensorflow as tf
  from bench import workers
  worker_args = argparse.Namespace(
      model=args.model, batch=args.batch, examples=4096, precision=precision,
      jit_compile=False, fused_optimizer=fused)
  model = workers._model(worker_args)  # noqa: SLF001
  optimizer = workers.make_optimizer(worker_args, model)
  step = workers.make_step(model, optimizer)
  return workers.make_loop(
      step, iter(workers._data(worker_args, tf, np)))  # noqa: SLF001


def _raw_distributed(args, strategy):
  """bench.workers' raw loop under `strategy`: each replica's loss is
  divided by the global batch and Keras' Adam all-reduces the gradients
  (its own _all_reduce_sum_gradients), as a hand-written tf.distribute
  loop does."""
  import keras
  import numpy as np
  import tensorflow as tf
  from bench import workers
  replicas = strategy.num_replicas_in_sync
  worker_args = argparse.Namespace(
      model=args.model, batch=args.batch // replicas, examples=4096,
      precision="float32", jit_compile=False, fused_optimizer=False)
  with strategy.scope():
    model = workers._model(worker_args)  # noqa: SLF001
    optimizer = workers.make_optimizer(worker_args, model)
  iterator = iter(strategy.distribute_datasets_from_function(
      lambda ctx: workers._data(worker_args, tf, np)))  # noqa: SLF001

  def step(x, y):
    with tf.GradientTape() as tape:
      logits = model(x, training=True)
      loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
          y, logits, from_logits=True)) / args.batch
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))

  @tf.function
  def train_loop(n):
    for _ in tf.range(n):
      strategy.run(step, args=next(iterator))
  return train_loop


def _runner(args, model_dir: str, precision: str = "float32", **flags):
  from trainer import controller
  from trainer.config import Config
  shape = ",".join(str(d) for d in common.SHAPES[args.model])
  return controller.create(Config(
      model=args.model, dataset="synthetic", synthetic_shape=shape,
      global_batch_size=args.batch, optimizer="adam", model_dir=model_dir,
      strategy=args.strategy, mixed_precision=precision, **flags))


def _on_disk(args, tmp: str) -> dict:
  from bench import data_scaling
  from trainer import controller
  from trainer.config import Config
  side = args.image_size
  common_flags = dict(model="cnn", global_batch_size=args.batch,
                      optimizer="adam")
  contenders = {"in_memory": framework.chunk(controller.create(Config(
      dataset="synthetic", synthetic_shape=f"{side},{side},1",
      model_dir=os.path.join(tmp, "in_memory"), **common_flags)))}
  for kind in ("image_folder", "array_record"):
    data = os.path.join(tmp, "data_" + kind)
    data_scaling.write(kind, args.examples, data, shape=(side, side, 1))
    contenders[kind] = framework.chunk(controller.create(Config(
        dataset=kind, data_dir=data, image_size=str(side),
        eval_split="train[:1%]", model_dir=os.path.join(tmp, kind),
        **common_flags)))
  return contenders


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="bench.paired")
  p.add_argument("--model", default="cnn", choices=sorted(common.SHAPES))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--interval", type=int, default=None,
                 help="updates per round (default 50; --end_to_end: 100, "
                      "the summary interval)")
  p.add_argument("--rounds", type=int, default=60)
  p.add_argument("--strategy", default="default",
                 choices=("default", "multiworker"),
                 help="multiworker: run under launch.local (module doc)")
  p.add_argument("--gan", action="store_true",
                 help="the GAN row: gan_raw vs gan_framework (module doc)")
  p.add_argument("--lm", action="store_true",
                 help="the sequence row: lm_raw vs lm_framework (module doc)")
  p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                 help="time chunks by wall clock or by process CPU time "
                      "(module doc)")
  p.add_argument("--on_disk", action="store_true",
                 help="in-memory arrays vs lazily read JPEGs (module doc)")
  p.add_argument("--image_size", type=int, default=64,
                 help="--on_disk: the images' side (the issue's 64)")
  p.add_argument("--examples", type=int, default=8192,
                 help="--on_disk: JPEGs written per format")
  p.add_argument("--settle", type=float, default=None,
                 help="seconds to sleep before each timed chunk (default: "
                      "1 with --on_disk, 0.5 with --end_to_end, else 0)")
  p.add_argument("--mixed_precision", default="",
                 choices=("", "mixed_bfloat16", "mixed_float16"),
                 help="race the fp32 raw loop and chunk against both under "
                      "this Keras policy (module doc)")
  p.add_argument("--topology", type=int, default=0, metavar="V",
                 help="race the chunk with and without "
                      "--deterministic=topology --virtual_shards=V "
                      "(module doc)")
  end_to_end.add_flags(p)
  args = p.parse_args(argv)
  if args.topology and (args.gan or args.lm or args.end_to_end
                        or args.on_disk or args.mixed_precision
                        or args.strategy != "default"):
    raise SystemExit("bench.paired: --topology races the built-in chunk "
                     "under --strategy=default only.")
  if args.interval is None:
    args.interval = 100 if args.end_to_end else 50
  if args.lm and (args.gan or args.end_to_end or args.on_disk
                  or args.mixed_precision or args.strategy != "default"):
    raise SystemExit("bench.paired: --lm runs alone, under "
                     "--strategy=default.")
  if args.end_to_end and args.clock != "wall":
    raise SystemExit("bench.paired: --end_to_end times by the wall clock "
                     "only.")
  if args.end_to_end and (args.gan or args.strategy != "default"):
    raise SystemExit("bench.paired: --end_to_end runs the built-in task "
                     "under --strategy=default only.")
  if args.settle is None:
    args.settle = 1.0 if args.on_disk else 0.5 if args.end_to_end else 0.0
  if args.on_disk and (args.gan or args.end_to_end or args.mixed_precision
                       or args.strategy != "default"):
    raise SystemExit("bench.paired: --on_disk runs alone, under "
                     "--strategy=default.")
  if args.mixed_precision and (args.gan or args.end_to_end
                              or args.strategy != "default"):
    raise SystemExit("bench.paired: --mixed_precision races the built-in "
                     "chunk under --strategy=default only.")
  from absl import logging
  # Quiet while the runners are built; restored after (tests call main()).
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    # Nothing is written there (no training outputs); removed even so.
    with tempfile.TemporaryDirectory(prefix="bench_paired_") as tmp:
      return _measure(args, tmp)
  finally:
    logging.set_verbosity(previous)


def _contenders(args, tmp: str) -> dict:
  if args.on_disk:
    return _on_disk(args, tmp)
  if args.lm:
    from bench import lm
    args.model = "byte_lm"
    return {"lm_raw": lm.raw_loop(args.batch),
            "lm_framework": framework.chunk(framework.lm_runner(
                args.batch, os.path.join(tmp, "lm"), lm.TASK_ARGS,
                lm.LEARNING_RATE))}
  if args.gan:
    if args.strategy != "default":
      raise SystemExit("bench.paired: --gan runs under --strategy=default "
                       "only.")
    from bench import gan
    args.model = "dcgan"
    return {"gan_raw": gan.raw_loop(args.batch),
            "gan_framework": framework.chunk(
                framework.gan_runner(args.batch, os.path.join(tmp, "gan")))}
  if args.topology:
    # --deterministic=topology turns TF op determinism on for the whole
    # process: every contender runs under it (its own cost is plain
    # --deterministic's, in both framework rows).
    return {
        "raw": _raw(args, fused=False),
        "framework": framework.chunk(_runner(args, os.path.join(tmp, "fast"))),
        "framework_topology": framework.chunk(_runner(
            args, os.path.join(tmp, "topology"), deterministic="topology",
            virtual_shards=args.topology)),
    }
  if args.strategy == "default" and args.mixed_precision:
    # The fp32 raw loop first: bench.workers sets Keras' global policy for
    # the bf16 one, and each runner sets it from its config.
    import keras
    contenders = {
        "raw": _raw(args, fused=False),
        f"raw_{args.mixed_precision}": _raw(args, fused=False,
                                            precision=args.mixed_precision),
        "framework": framework.chunk(_runner(args, os.path.join(tmp, "fast"))),
        f"framework_{args.mixed_precision}": framework.chunk(
            _runner(args, os.path.join(tmp, "mixed"),
                    precision=args.mixed_precision)),
    }
    keras.mixed_precision.set_global_policy("float32")
    return contenders
  if args.strategy == "default":
    return {
        "raw": _raw(args, fused=False),
        "raw_fused": _raw(args, fused=True),
        "framework": framework.chunk(_runner(args, os.path.join(tmp, "fast"))),
        "framework_guarded": framework.chunk(
            _runner(args, os.path.join(tmp, "guarded")), guarded=True),
    }
  # One MultiWorkerMirroredStrategy per process: the framework's Runner
  # builds it from TF_CONFIG and the raw loop shares it.
  runner = _runner(args, os.path.join(tmp, "fast"))
  strategy = runner.strategy
  args.replicas = strategy.num_replicas_in_sync
  local = argparse.Namespace(**{**vars(args),
                                "batch": args.batch // args.replicas})
  return {
      "raw": _raw_distributed(args, strategy),
      "framework": framework.chunk(runner),
      "raw_local": _raw(local, fused=False),
  }


def _load_text() -> str:
  now = machine.load()
  return "load avg " + ("/".join(f"{x:.2f}" for x in now) if now else "?")


def _print_end_to_end(args, times, details, machine_at_start) -> None:
  print(machine.header(machine_at_start) + f"; after: {_load_text()}")
  print(f"{args.model} end to end on {details['data']}, global batch "
        f"{args.batch}: {args.rounds} rounds of one summary interval "
        f"({args.interval} updates) each; x raw = median over rounds of "
        "raw_data time / contender time [quartiles]")
  _table(times, args.interval, details["after"])
  inside = [c / t for c, t in zip(details["inside_chunks"],
                                  times["end_to_end"])]
  q1, _, q3 = statistics.quantiles(inside, n=4)
  print(f"  end_to_end inside executor.run (chunks, probe): median "
        f"{statistics.median(inside):.3f} of its time [{q1:.3f}, "
        f"{q3:.3f}]; the rest is host work between chunks")


def _measure(args, tmp: str) -> int:
  machine_at_start = machine.info()   # load before this process's own work
  if args.end_to_end:
    times, details = end_to_end.measure(args, tmp)
    _print_end_to_end(args, times, details, machine_at_start)
    return 0
  import tensorflow as tf
  contenders = _contenders(args, tmp)
  n = tf.constant(args.interval)
  for run in contenders.values():   # trace and warm up
    run(n)
    run(n)
  times = {name: [] for name in contenders}
  # Process CPU during the settle after each contender's chunk: what its
  # input pipeline (prefetch, parallel map) still does once the chunk has
  # returned, which without a settle runs inside the next one's time.
  after = {name: [] for name in contenders}
  previous = None
  clock = time.process_time if args.clock == "cpu" else time.perf_counter
  for _ in range(args.rounds):
    for name, run in contenders.items():
      if args.settle:
        cpu = time.process_time()
        time.sleep(args.settle)
        if previous is not None:
          after[previous].append(time.process_time() - cpu)
      began = clock()
      run(n)   # an eager call of a tf.function returns when it has run
      times[name].append(clock() - began)
      previous = name
  after = after if args.settle else None
  replicas = getattr(args, "replicas", 1)
  print(machine.header(machine_at_start) + f"; after: {_load_text()}")
  if args.on_disk:
    print(f"cnn on {args.image_size}x{args.image_size}x1 images, batch "
          f"{args.batch}: the trainer's chunk on in-memory arrays and on "
          f"{args.examples} JPEGs read lazily; {args.rounds} rounds of "
          f"{args.interval} updates; x raw = median over rounds of "
          "in_memory time / contender time [quartiles]")
    _table(times, args.interval, after)
    return 0
  print(f"{args.model} {args.strategy} ({replicas} replica"
        f"{'s' if replicas > 1 else ''}) global batch "
        f"{args.batch}: {args.rounds} rounds of {args.interval} updates "
        "each; x raw = median over rounds of "
        "raw time / contender time [quartiles]"
        + ("; times are process CPU" if args.clock == "cpu" else ""))
  _table(times, args.interval, after)
  return 0


def _table(times: dict, interval: int, after: dict | None = None) -> None:
  """One line per contender: median ms/update, and the median and
  quartiles of the per-round ratio to the first contender (the raw loop);
  with `after` (a settle), the median process CPU in the settle after the
  contender's chunk, in ms and as a share of its chunk's median time."""
  reference = times[next(iter(times))]
  for name, ts in times.items():
    ratios = [r / t for r, t in zip(reference, ts)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    line = (f"  {name:18s} {1000 * statistics.median(ts) / interval:6.3f} "
            f"ms/update  x raw {statistics.median(ratios):.3f} "
            f"[{q1:.3f}, {q3:.3f}]")
    if after and after[name]:
      cpu = statistics.median(after[name])
      line += (f"  CPU after its chunk {1000 * cpu:.2f} ms "
               f"({cpu / statistics.median(ts):.2%})")
    print(line)


if __name__ == "__main__":
  sys.exit(main())
