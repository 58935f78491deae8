"""The benchmark rows: what each one runs, and how they relate.

A row's `group` is a (model, batch) pair; ratios are taken against the
group's raw loop (`<group>/raw`). `ref` names a row to compare with instead
(accumulation vs K=1, 2 workers vs 1, real pipeline vs in-memory).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Row:
  name: str                 # "<group>/<variant>"
  kind: str                 # raw | raw_pinned | keras | framework | launch
                            # | accuracy
  model: str
  batch: int                # examples per update, all replicas and workers
  args: tuple = ()          # extra worker / trainer flags
  interval: int = 50        # updates per timed interval (= steps_per_loop)
  prior: float = 50.0       # expected updates/sec, sizes the framework runs
  quick: bool = False       # part of --quick
  core: bool = False        # a goal depends on it: every repeat runs it
                            # (the others run once, to keep the time down)
  extra: bool = False       # diagnosis only: runs when named in --rows
  ref: str = ""             # compare with this row instead of <group>/raw
  workers: int = 0          # launch rows: number of worker processes
  dataset: str = "synthetic"  # framework rows: mnist, tfrecord, synthetic,
                              # jpeg_folder, jpeg_array_record
  note: str = ""

  @property
  def group(self) -> str:
    return self.name.split("/")[0]

  @property
  def variant(self) -> str:
    return self.name.split("/", 1)[1]

  def describe(self) -> str:
    """The row's configuration in one short line."""
    flags = " ".join(self.args)
    if self.kind == "raw":
      return f"raw tf.function loop, batch {self.batch} {flags}".strip()
    if self.kind == "raw_pinned":
      return (f"{self.workers} independent raw loop process(es), each pinned "
              f"to its own core, batch {self.batch // self.workers} each "
              "(no communication: the machine's scaling ceiling)")
    if self.kind == "keras":
      return f"Keras fit, batch {self.batch} {flags}".strip()
    if self.kind == "launch":
      flags = " ".join(a for a in self.args
                       if a != "--strategy=multiworker")
      return (f"launch.local --workers={self.workers} --pin_cores, "
              f"--strategy=multiworker, global batch {self.batch} "
              f"({self.batch // self.workers}/worker) {flags}").strip()
    if self.kind == "accuracy":
      return f"trainer.main short real run, batch {self.batch} {flags}".strip()
    return (f"trainer.main --dataset={self.dataset}, global batch "
            f"{self.batch} {flags}").strip()


_CORE = ("raw", "raw_fused", "keras_spe1", "keras_spe50", "fw_default",
         "fw_accum4")  # cnn


def _group(model: str, batch: int, interval: int, prior: float,
           quick_variants=(), core=_CORE, skip=()) -> list[Row]:
  g = f"{model}_b{batch}"

  def row(variant, kind, args=(), rate=prior, **kw):
    return Row(f"{g}/{variant}", kind, model, kw.pop("batch", batch),
               tuple(args), interval, rate, variant in quick_variants,
               variant in core, **kw)

  rows = [
      row("raw", "raw"),
      # The same loop with the framework's (fused) Adam: framework /
      # raw_fused is the cost of everything around the optimizer.
      row("raw_fused", "raw", ["--fused_optimizer"]),
      row("keras_spe1", "keras", ["--steps_per_execution=1"]),
      # The tuned setting: one execution per timed interval (50 for the
      # cnn; resnet20's 0.2 s steps gain nothing from more than 10).
      row(f"keras_spe{interval}", "keras",
          [f"--steps_per_execution={interval}"]),
      row("fw_default", "framework", ["--strategy=default"]),
      row("fw_mirrored2", "framework",
          ["--strategy=mirrored", "--cpu_replicas=2"]),
      # K=4 micro-batches of the same size as K=1's batch: per-example
      # throughput compared with fw_default.
      row("fw_accum4", "framework", ["--strategy=default",
                                     "--grad_accum_steps=4"],
          rate=prior / 4, batch=4 * batch, ref=f"{g}/fw_default"),
      row("fw_bf16", "framework", ["--strategy=default",
                                   "--mixed_precision=mixed_bfloat16"],
          rate=prior * 1.3),
      row("fw_xla", "framework", ["--strategy=default", "--jit_compile"],
          rate=prior / 2),
      row("raw_bf16", "raw", ["--precision=mixed_bfloat16"], rate=prior * 1.3),
      row("raw_xla", "raw", ["--jit_compile"], rate=prior / 2),
  ]
  return [r for r in rows if r.variant not in skip]


def catalog() -> list[Row]:
  rows = []
  # Raw bf16 / XLA loops once, at cnn_b128: the framework's bf16 and XLA
  # rows are compared with them there.
  rows += _group("cnn", 32, 50, 130.0,
                 quick_variants=("raw", "raw_fused", "keras_spe1",
                                 "keras_spe50", "fw_default"),
                 skip=("raw_bf16", "raw_xla"))
  rows += _group("cnn", 128, 50, 35.0,
                 quick_variants=("raw", "raw_fused", "fw_default"))
  rows += _group("resnet20", 128, 10, 4.0, core=(),
                 skip=("fw_accum4", "raw_bf16", "raw_xla"))
  # Multi-worker scaling: 64 examples per worker, one core per worker.
  per_worker = 64

  def scaling(model, variant, kind, interval, rate, args=()):
    """1 and 2 pinned processes; the 2's ratio is taken against the 1."""
    one, two = f"{model}_w1/{variant}", f"{model}_w2/{variant}"
    return [Row(one, kind, model, per_worker, args, interval, rate,
                core=True, workers=1),
            Row(two, kind, model, 2 * per_worker, args, interval, 0.9 * rate,
                core=True, workers=2, ref=one)]

  rows += scaling("cnn", "pinned", "launch", 50, 60.0,
                  ("--strategy=multiworker",))
  # The machine's own ceiling for that scaling: 1 and 2 independent raw
  # loops (64 examples each), each pinned to its core, no communication.
  # Rate = updates/sec per process, so ex/s counts all processes.
  rows += scaling("cnn", "raw_pinned", "raw_pinned", 50, 100.0)
  # The same scaling for resnet20 (CIFAR shapes): ~16x the compute of the
  # cnn per example for a gradient 0.65x its size, i.e. the compute-bound
  # case where data parallelism pays, next to the cnn's communication-bound
  # one.
  rows += scaling("resnet20", "pinned", "launch", 10, 6.0,
                  ("--strategy=multiworker",))
  # Diagnosis (--rows=cnn_w1,cnn_w2 runs them): the same scaling with fewer
  # all-reduces per example (K=4 micro-batches of 64 per update), and with
  # twice the compute per all-reduce (128 per worker).
  for tag, k, b in (("accum4", 4, per_worker), ("b128", 1, 2 * per_worker)):
    args = ("--strategy=multiworker", f"--grad_accum_steps={k}")
    rows += [
        Row(f"cnn_w1/pinned_{tag}", "launch", "cnn", k * b, args, 50,
            60.0 * per_worker / (k * b), workers=1, extra=True),
        Row(f"cnn_w2/pinned_{tag}", "launch", "cnn", 2 * k * b, args, 50,
            55.0 * per_worker / (k * b), workers=2,
            ref=f"cnn_w1/pinned_{tag}", extra=True),
    ]
  # Input pipeline: real data (IDX files in memory; PNG TFRecords decoded
  # per batch) vs the same shapes already in memory (fw_default).
  rows += [
      Row("cnn_b128/fw_mnist", "framework", "cnn", 128,
          ("--strategy=default",), 50, 35.0, core=True, dataset="mnist",
          ref="cnn_b128/fw_default"),
      Row("cnn_b128/fw_tfrecord", "framework", "cnn", 128,
          ("--strategy=default",), 50, 35.0, core=True, dataset="tfrecord",
          ref="cnn_b128/fw_default"),
      # On-disk JPEGs read lazily (--image_size: decode + random-resized
      # crop per example), as an image folder and as ArrayRecord, against
      # the same shapes in memory (fw_default).
      Row("cnn_b128/fw_jpeg_folder", "framework", "cnn", 128,
          ("--strategy=default", "--image_size=28"), 50, 35.0, core=True,
          dataset="jpeg_folder", ref="cnn_b128/fw_default"),
      Row("cnn_b128/fw_jpeg_array_record", "framework", "cnn", 128,
          ("--strategy=default", "--image_size=28"), 50, 35.0, core=True,
          dataset="jpeg_array_record", ref="cnn_b128/fw_default"),
  ]
  # Accuracy of the speed options on real digits (MNIST test set split
  # 8000 train / 2000 eval): a short run each, same seed.
  for variant, args in (("fp32", ()),
                        ("bf16", ("--mixed_precision=mixed_bfloat16",)),
                        ("xla", ("--jit_compile",))):
    rows.append(Row(f"accuracy/{variant}", "accuracy", "cnn", 128, args,
                    50, 30.0, ref="accuracy/fp32" if variant != "fp32" else "",
                    dataset="mnist"))
  return rows


def by_name() -> dict[str, Row]:
  return {r.name: r for r in catalog()}
