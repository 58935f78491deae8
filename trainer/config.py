"""The run configuration: flag definitions, the frozen Config, and its checks.

Only the command-line tools read FLAGS; only they and trainer.build (the
composition root) take the whole Config. Every part below build gets a
narrow frozen settings dataclass cut from it by `narrow`.
"""

import dataclasses
import json
import math

from absl import flags
from absl.flags import BooleanParser as _BooleanParser
from absl.flags import Flag as _AbslFlag

from trainer.errors import UserError

STRATEGIES = ("default", "mirrored", "multiworker", "parameter_server", "tpu")
RESOLVERS = ("tf_config", "slurm")
COLLECTIVES = ("auto", "ring", "nccl")
MODELS = ("mlp", "cnn", "resnet20")
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "tfrecord",
            "array_record", "image_folder", "synthetic")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "lazy_adam", "adagrad",
              "lazy_momentum")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16", "auto")
MODES = ("train", "eval", "train_and_eval", "continuous_eval")
NONFINITE = ("skip", "rollback", "fail")
PROGRESS = ("auto", "line", "log")
PERF_FLOPS = ("auto", "trace", "off")
BEST_MODES = ("auto", "min", "max")
TOPOLOGY = "topology"


@dataclasses.dataclass(frozen=True)
class Config:
  """One run's settings. Field names equal the command-line flag names."""
  # Distribution.
  strategy: str = "default"
  cpu_replicas: int = 0
  cluster_resolver: str = "tf_config"
  collective: str = "auto"
  peer_timeout_s: float = 120.0
  hang_timeout_s: float = 120.0
  tpu: str = ""
  ps_shard_min_bytes: int = 256 << 10
  # What to train.
  task: str = ""
  task_args: str = ""
  model: str = "cnn"
  dataset: str = "digits"
  data_dir: str = ""
  train_split: str = "train"
  eval_split: str = "test"
  file_patterns: str = ""
  skip_corrupt: bool = False
  augment: bool = False
  image_size: str = ""
  data_cache_dir: str = ""
  synthetic_shape: str = "28,28,1"
  synthetic_classes: int = 10
  synthetic_examples: int = 4096
  # Batching and length.
  global_batch_size: int = 64
  grad_accum_steps: int = 1
  train_steps: int = 1000
  epochs: float = 0.0
  steps_per_loop: int = 50
  eval_batch_size: int = 0
  # Optimization.
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  momentum: float = 0.9
  weight_decay: float = 1e-4
  clip_norm: float = 0.0
  ema_decay: float = 0.0
  # Reproducibility.
  seed: int = 0
  # False, True (TF op determinism) or "topology" (also the same weights on
  # every topology: trainer/step/exact.py); the flag parses all three.
  deterministic: bool | str = False
  virtual_shards: int = 8
  # Outputs.
  model_dir: str = "runs/default"
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpoint: bool = False
  summary_every: int = 100
  eval_every: int = 500
  eval_every_epochs: float = 0.0
  summary_every_epochs: float = 0.0
  # Watching a run.
  progress: str = "auto"
  histograms_every: int = 0
  profile_steps: str = ""
  input_wait_steps: int = 10
  perf_flops: str = "auto"
  # Best checkpoint and early stopping.
  keep_best: bool = False
  early_stopping_patience: int = 0
  early_stopping_metric: str = "loss"
  early_stopping_mode: str = "auto"
  early_stopping_min_delta: float = 0.0
  # Speed.
  mixed_precision: str = "float32"
  jit_compile: bool = False
  # What to do.
  mode: str = "train_and_eval"
  checkpoint: str = ""
  nonfinite: str = "rollback"
  max_rollbacks: int = 3
  eval_timeout_s: float = 3600.0

  @property
  def micro_batch_size(self) -> int:
    """Examples in one micro-batch, all replicas together."""
    return self.global_batch_size // self.grad_accum_steps

  @property
  def topology(self) -> bool:
    """--deterministic=topology."""
    return self.deterministic == TOPOLOGY

  @property
  def image_hw(self) -> tuple[int, int] | None:
    """--image_size as (height, width), or None (images keep their shape)."""
    if not self.image_size:
      return None
    sides = [int(x) for x in self.image_size.split(",")]
    return (sides[0], sides[-1])

  @property
  def effective_eval_batch_size(self) -> int:
    return self.eval_batch_size or self.global_batch_size

  @property
  def profile_range(self) -> tuple[int, int] | None:
    """--profile_steps as (first, last) update, or None."""
    if not self.profile_steps:
      return None
    first, last = (int(x) for x in self.profile_steps.split(","))
    return first, last

  @property
  def task_kwargs(self) -> dict:
    """--task_args as a dict of strings."""
    pairs = [p for p in self.task_args.split(",") if p.strip()]
    return dict(p.split("=", 1) for p in pairs)

  @property
  def tracks_best(self) -> bool:
    return self.keep_best or self.early_stopping_patience > 0

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  def command_line(self) -> str:
    """`python -m trainer.main` with every flag that differs from its
    default: the command that reproduces this configuration.

    >>> Config(model="mlp", jit_compile=True).command_line()
    'python -m trainer.main --model=mlp --jit_compile'
    """
    defaults = Config()
    parts = ["python -m trainer.main"]
    for field in dataclasses.fields(Config):
      value = getattr(self, field.name)
      if value == getattr(defaults, field.name):
        continue
      if isinstance(value, bool):
        parts.append(f"--{field.name}" if value else f"--no{field.name}")
      else:
        parts.append(f"--{field.name}={value}")
    return " ".join(parts)

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)


_HELP = {
    "strategy": "tf.distribute strategy: default (one device), mirrored (all "
                "local devices), multiworker (MultiWorkerMirroredStrategy, "
                "TF_CONFIG or Slurm), parameter_server (the coordinator; "
                "start workers/ps with launch.local or launch.kubernetes), "
                "tpu (TPUStrategy; needs --tpu).",
    "cpu_replicas": "Split the host CPU into N logical devices so that "
                    "--strategy=mirrored runs N replicas without GPUs "
                    "(0: do not split). Refused with multiworker, whose "
                    "workers use one CPU device each (GPU hosts: every "
                    "local GPU).",
    "cluster_resolver": "Where --strategy=multiworker finds the cluster: "
                        "TF_CONFIG, or Slurm's environment.",
    "collective": "MultiWorkerMirroredStrategy collective implementation.",
    "peer_timeout_s": "Bound on any wait for a peer: collectives, forming "
                      "the cluster, resolving peers' host names, and "
                      "(parameter_server) a coordinator without any worker, "
                      "or calls to a stopped or hung worker (dropped, its "
                      "work re-run elsewhere), or a stopped or hung ps "
                      "(exit 4); a dead peer makes the others exit non-zero "
                      "within it.",
    "hang_timeout_s": "A training update (its input fetch, step and "
                      "collectives) that makes no progress for max(this, 10 "
                      "x the median update time) is a hang: the process "
                      "logs every thread's stack and exits 142, which "
                      "launch.local --max_restarts restarts from the last "
                      "checkpoint. Tracing is not watched, saves and "
                      "evaluation neither; until the first update after "
                      "start-up, a trace, a save or an evaluation the "
                      "bound is 5 x longer. 0: off.",
    "tpu": "TPU name or 'local' for --strategy=tpu.",
    "ps_shard_min_bytes": "parameter_server: variables larger than this are "
                          "sharded across the ps tasks.",
    "task": "A user task 'package.module:Name' (a trainer.Task subclass or a "
            "function config -> Task); replaces --model/--dataset.",
    "task_args": "Settings for the --task, 'key=value,key=value' (e.g. "
                 "teacher_dir=runs/teacher); the task reads them from "
                 "config.task_kwargs.",
    "model": f"Built-in model, one of {', '.join(MODELS)}, or "
             "'package.module:fn' with fn(input_shape, num_classes) -> "
             "keras.Model (input_shape: the tuple (H, W, C)).",
    "dataset": f"Built-in dataset, one of {', '.join(DATASETS)}. "
               "array_record and image_folder with --image_size read "
               "lazily (memory and start-up flat in the number of "
               "examples); tfrecord and image_folder without it load or "
               "check every example at start-up.",
    "data_dir": "Directory holding the dataset's files.",
    "train_split": "TFDS-style split to train on: 'train', 'test[:8000]', "
                   "'train[10%:]', 'a+b'.",
    "eval_split": "TFDS-style split to evaluate on.",
    "file_patterns": "--dataset=tfrecord or array_record: "
                     "'split=glob,split=glob' file patterns (default "
                     "DATA_DIR/SPLIT-*.tfrecord or SPLIT-*.array_record).",
    "skip_corrupt": "Skip (and count) corrupt records/images instead of "
                    "stopping with an error. Lazy readers (--image_size) "
                    "find them when read: weight 0 in the batch, counted "
                    "in the train scalar skipped_examples; without the "
                    "flag the run saves a checkpoint and exits 2.",
    "augment": "Seeded, resumable augmentation for image sets (random crop "
               "with 4-pixel padding; horizontal flip for cifar10).",
    "image_size": "N or H,W: decode images of any size and channel count "
                  "and resize them for the model (grayscale/RGBA -> the "
                  "model's channels). Training draws a random-resized crop "
                  "(area 8-100%, aspect 3/4-4/3) seeded from the example "
                  "positions, plus a horizontal flip with --augment (not "
                  "for digits/mnist); evaluation resizes the shorter side "
                  "and centre-crops. image_folder then keeps only paths and "
                  "decodes lazily. Empty: images must share one shape.",
    "data_cache_dir": "Where --dataset=image_folder keeps the listing of "
                      "a folder between runs; a start reads it back (one "
                      "stat per directory, not per file) while no "
                      "directory in the folder has changed. Empty: "
                      "$XDG_CACHE_HOME/trainer or ~/.cache/trainer; "
                      "'none': list the folder at every start.",
    "synthetic_shape": "--dataset=synthetic: H,W,C of the random images.",
    "synthetic_classes": "--dataset=synthetic: number of classes.",
    "synthetic_examples": "--dataset=synthetic: examples per split.",
    "global_batch_size": "Examples per optimizer update, all replicas and "
                         "micro-batches together.",
    "grad_accum_steps": "Micro-batches per update: the global batch is split "
                        "K ways; one cross-replica reduction per update.",
    "train_steps": "Optimizer updates in total (a resumed run stops here too).",
    "epochs": "Train for N passes over --train_split instead of "
              "--train_steps: train_steps = ceil(N x examples / "
              "--global_batch_size) (N may be fractional; 0: use "
              "--train_steps). Without --eval_every(_epochs), evaluates "
              "once per epoch.",
    "steps_per_loop": "Updates inside one tf.function call.",
    "eval_batch_size": "Examples per evaluation batch (0: --global_batch_size).",
    "optimizer": f"One of {', '.join(OPTIMIZERS)}. lazy_adam, adagrad and "
                 "lazy_momentum update only the rows a sparse (embedding) "
                 "gradient touches, slots included; dense variables get "
                 "the ordinary rule. adam and momentum stay dense.",
    "learning_rate": "Peak learning rate.",
    "lr_schedule": "constant or cosine (decay to 0 at --train_steps), after "
                   "--warmup_steps of linear warm-up.",
    "warmup_steps": "Linear warm-up steps from 0 to --learning_rate.",
    "momentum": "Momentum of --optimizer=momentum and lazy_momentum.",
    "weight_decay": "Decoupled weight decay of --optimizer=adamw.",
    "clip_norm": "Clip the all-reduced gradient to this global norm (0: off).",
    "ema_decay": "Keep an exponential moving average of the trainable "
                 "weights with this decay (e.g. 0.999), updated after every "
                 "update, checkpointed under `ema`; evaluation, best/ and "
                 "trainer.export use it, and eval/raw/* in TensorBoard "
                 "shows the raw weights (0: off).",
    "seed": "Seed of initialization, data order, dropout and augmentation.",
    "deterministic": "TF op determinism: two fresh runs give bit-identical "
                     "checkpoints (slower). =topology: also the same "
                     "checkpoints, bit for bit, on any number of replicas "
                     "or workers, any --grad_accum_steps and across resumes "
                     "onto another topology (--virtual_shards; same CPU "
                     "instruction set and TensorFlow version; "
                     "docs/reliability.md).",
    "virtual_shards": "--deterministic=topology: the global batch is cut "
                      "into this many fixed shards, each computed alike on "
                      "any topology and summed exactly; replicas x "
                      "--grad_accum_steps must divide it (and it must "
                      "divide --global_batch_size). More shards: more "
                      "topologies, smaller kernels (slower).",
    "model_dir": "Checkpoints, train/ and eval/ TensorBoard events, "
                 "config.json (written by training), history.jsonl (one "
                 "line per run). Re-running with the same dir resumes.",
    "checkpoint_every": "Save a checkpoint every N updates (and at the end).",
    "keep_checkpoints": "Checkpoints kept in --model_dir.",
    "async_checkpoint": "Write checkpoints in a background thread: the "
                        "loop is blocked only while the state is copied to "
                        "host memory (one more copy of it while a write is "
                        "in flight); at most one save in flight, and the "
                        "`checkpoint` index names a checkpoint only once "
                        "its files are synced. See docs/reliability.md.",
    "summary_every": "Write train summaries and a progress line every N updates.",
    "eval_every": "Evaluate every N updates (and at the end); 0: only at the end.",
    "eval_every_epochs": "Evaluate every F epochs of --train_split (replaces "
                         "--eval_every; 0: use --eval_every).",
    "summary_every_epochs": "Write train summaries every F epochs (replaces "
                            "--summary_every; 0: use --summary_every).",
    "progress": "Progress display on the chief: line (one line on stderr "
                "rewritten in place), log (a fixed-format 'train | step: N/T "
                "| loss: ...' log line every --summary_every updates), or "
                "auto (line on a terminal, log otherwise).",
    "histograms_every": "Write weight and gradient histograms to train/ every "
                        "N updates (0: off). The gradient is that of the next "
                        "update's first micro-batch, all-reduced, computed "
                        "by a separate function only at those steps.",
    "profile_steps": "'A,B': write a TensorBoard profiler trace to "
                     "MODEL_DIR/train covering updates A to B (1-based, "
                     "inclusive; chief only). Empty: off.",
    "input_wait_steps": "Time the input wait (train scalar input_wait_share) "
                        "over the last N updates before each summary "
                        "(0: off; other updates carry no timing ops; off "
                        "under --deterministic, which forbids timestamps).",
    "perf_flops": "How perf/ counts the step's training FLOPs (model "
                  "FLOP/s and its share of this machine's matmul peak): "
                  "auto (3 x the main model's forward pass for the "
                  "built-in step; a task's own train_step is not counted), "
                  "trace (any step: one micro-step traced once more, 1-3 s "
                  "at start-up), off.",
    "keep_best": "Keep the best checkpoint by --early_stopping_metric in "
                 "MODEL_DIR/best/ (with best.json) without stopping early. "
                 "On by itself when --early_stopping_patience > 0.",
    "early_stopping_patience": "Stop after N evaluations (every --eval_every "
                               "updates) without improvement of "
                               "--early_stopping_metric; saves a final "
                               "checkpoint and exits 0 (0: off).",
    "early_stopping_metric": "Eval metric for early stopping and best/: "
                             "loss, accuracy or another task metric (an "
                             "'eval_' prefix is accepted).",
    "early_stopping_mode": "min or max of --early_stopping_metric; auto: max "
                           "for accuracy-like names (acc, auc, precision, "
                           "recall, f1, iou), min otherwise.",
    "early_stopping_min_delta": "An evaluation improves only if it beats the "
                                "best by more than this.",
    "mixed_precision": "Keras dtype policy: float32, mixed_bfloat16 (fast on "
                       "CPUs with AVX512_BF16 or AMX), mixed_float16 (dynamic "
                       "loss scaling), or auto: mixed_bfloat16 on such a CPU "
                       "without GPU/TPU, else float32 (one process per run "
                       "only: a cluster names its policy).",
    "jit_compile": "XLA-compile the replica step.",
    "mode": "train, eval (latest checkpoint), train_and_eval, "
            "continuous_eval (evaluate each new checkpoint in --model_dir). "
            "eval and continuous_eval take the run's flags from "
            "MODEL_DIR/config.json (flags given here override only what they "
            "name) and never rewrite it.",
    "checkpoint": "--mode=eval: the checkpoint to evaluate (default: the "
                  "latest in --model_dir).",
    "nonfinite": "On a NaN/Inf loss or gradient: skip the update, roll back "
                 "to the last checkpoint and move past the batch, or fail.",
    "max_rollbacks": "--nonfinite=rollback: give up after N rollbacks.",
    "eval_timeout_s": "--mode=continuous_eval: stop when no new checkpoint "
                      "appears for this long.",
}

_ENUMS = {
    "strategy": STRATEGIES, "cluster_resolver": RESOLVERS,
    "collective": COLLECTIVES, "optimizer": OPTIMIZERS,
    "lr_schedule": SCHEDULES, "mixed_precision": PRECISIONS, "mode": MODES,
    "nonfinite": NONFINITE, "dataset": DATASETS, "progress": PROGRESS,
    "perf_flops": PERF_FLOPS,
    "early_stopping_mode": BEST_MODES,
}


def narrow(cls, config: Config, **overrides):
  """The settings dataclass `cls` filled from the Config's fields (and
  properties) of the same names, or from `overrides`: how every part below
  trainer.build gets only what it reads. A field that neither gives is an
  error, never a silent default.

  >>> @dataclasses.dataclass(frozen=True)
  ... class Reads:
  ...   cpu_replicas: int
  ...   micro_batch_size: int
  >>> narrow(Reads, Config(cpu_replicas=2, global_batch_size=8,
  ...                      grad_accum_steps=2))
  Reads(cpu_replicas=2, micro_batch_size=4)
  """
  names = {f.name for f in dataclasses.fields(cls)}
  values = {n: getattr(config, n) for n in names if n not in overrides}
  return cls(**values, **overrides)


def define_flags() -> None:
  """Defines one absl flag per Config field (same name, default, help)."""
  for field in dataclasses.fields(Config):
    name, default = field.name, field.default
    help_text = _HELP[name]
    # Enums are checked in validate() so that the message can name the rule
    # in our format; absl's enum flags would exit with a multi-line usage.
    if name == "deterministic":
      # A boolean flag (bare and --no forms) whose parser also takes
      # "topology".
      flags.DEFINE_flag(_AbslFlag(_DeterministicParser(), None, name,
                                  default, help_text, boolean=True))
    elif isinstance(default, bool):
      flags.DEFINE_bool(name, default, help_text)
    elif isinstance(default, int):
      flags.DEFINE_integer(name, default, help_text)
    elif isinstance(default, float):
      flags.DEFINE_float(name, default, help_text)
    else:
      choices = _ENUMS.get(name)
      if choices:
        help_text += f" One of: {', '.join(choices)}."
      flags.DEFINE_string(name, default, help_text)


class _DeterministicParser(_BooleanParser):
  """--deterministic, --nodeterministic, --deterministic=true/false (as a
  boolean flag) and --deterministic=topology."""

  def parse(self, argument):
    if isinstance(argument, str) and argument.strip().lower() == TOPOLOGY:
      return TOPOLOGY
    try:
      return super().parse(argument)
    except ValueError:
      raise ValueError(f"{argument!r}: use --deterministic, "
                       "--deterministic=topology or --nodeterministic"
                       ) from None

  def flag_type(self):
    return "bool or 'topology'"


def from_flags(flag_values) -> Config:
  """Builds the Config from parsed flags (the only place that reads FLAGS)."""
  values = {f.name: flag_values[f.name].value for f in dataclasses.fields(Config)}
  given = lambda name: flag_values[name].present
  if given("epochs") and given("train_steps"):
    raise UserError(f"--epochs={values['epochs']} and --train_steps="
                    f"{values['train_steps']} both say how long to train; "
                    "give one of them.")
  for name in ("eval_every", "summary_every"):
    if given(name) and given(f"{name}_epochs"):
      raise UserError(f"--{name} and --{name}_epochs both given; give one.")
  # Several evaluation points per run by default: the fixed --eval_every=500
  # gives a 5-epoch MNIST run only two.
  if given("virtual_shards") and values["deterministic"] != TOPOLOGY:
    raise UserError(f"--virtual_shards={values['virtual_shards']} is read "
                    "only with --deterministic=topology; add that flag or "
                    "drop this one.")
  if (values["epochs"] > 0 and not given("eval_every")
      and not given("eval_every_epochs")):
    values["eval_every_epochs"] = 1.0
  return Config(**values)


def validate(config: Config, num_replicas: int | None = None) -> None:
  """Raises UserError naming the flag, the value and the rule it breaks."""
  for name, choices in _ENUMS.items():
    value = getattr(config, name)
    if name == "dataset" and config.task:
      continue
    if value not in choices:
      raise UserError(f"--{name}={value!r} is not one of: "
                      f"{', '.join(choices)}.")
  if config.model not in MODELS and ":" not in config.model:
    raise UserError(f"--model={config.model!r} is not one of: "
                    f"{', '.join(MODELS)} (or 'package.module:fn').")
  if config.task_args and not all(
      "=" in p and p.split("=", 1)[0].strip()
      for p in config.task_args.split(",") if p.strip()):
    raise UserError(f"--task_args={config.task_args!r} must be "
                    "'key=value,key=value'.")
  if config.task and ":" not in config.task:
    raise UserError(f"--task={config.task!r} must be 'package.module:Name'.")
  for name in ("global_batch_size", "grad_accum_steps", "train_steps",
               "steps_per_loop", "checkpoint_every", "keep_checkpoints",
               "summary_every"):
    if getattr(config, name) <= 0:
      raise UserError(f"--{name}={getattr(config, name)} must be positive.")
  for name in ("cpu_replicas", "warmup_steps", "eval_every", "eval_batch_size",
               "max_rollbacks", "synthetic_examples", "epochs",
               "eval_every_epochs", "summary_every_epochs"):
    if getattr(config, name) < 0:
      raise UserError(f"--{name}={getattr(config, name)} must be >= 0.")
  _validate_watch(config)
  _validate_bounds(config)
  for name in ("learning_rate", "peer_timeout_s"):
    if not getattr(config, name) > 0:
      raise UserError(f"--{name}={getattr(config, name)} must be > 0.")
  if not 0.0 <= config.ema_decay < 1.0:
    raise UserError(f"--ema_decay={config.ema_decay} must be in [0, 1) "
                    "(0: off; e.g. 0.999).")
  if config.clip_norm < 0:
    raise UserError(f"--clip_norm={config.clip_norm} must be >= 0 (0: off).")
  if config.global_batch_size % config.grad_accum_steps:
    raise UserError(
        f"--global_batch_size ({config.global_batch_size}) must be divisible "
        f"by --grad_accum_steps ({config.grad_accum_steps}).")
  _validate_topology(config)
  if num_replicas is not None:
    check_divisible(config, num_replicas)
  if not config.model_dir:
    raise UserError("--model_dir is empty: give a directory for checkpoints "
                    "and summaries.")
  if config.mixed_precision == "auto" and config.strategy in (
      "multiworker", "parameter_server"):
    # Each process would pick by its own CPU: a mixed cluster would train
    # in two precisions without a word.
    raise UserError(f"--mixed_precision=auto picks by this machine's CPU; "
                    f"under --strategy={config.strategy} every process must "
                    "agree: name the policy (mixed_bfloat16 where every "
                    "worker's CPU has AVX512_BF16 or AMX, else float32).")
  if config.cpu_replicas > 1 and config.strategy == "multiworker":
    # TF 2.21's MultiWorkerMirroredStrategy takes one CPU device per worker
    # whatever logical devices exist (collective_all_reduce_strategy.py,
    # _initialize_local_devices): accepting the flag would silently run one
    # replica per worker.
    raise UserError(f"--cpu_replicas={config.cpu_replicas} does not work "
                    "with --strategy=multiworker: TensorFlow's multi-worker "
                    "strategy uses one CPU device per worker (on GPU hosts "
                    "it uses every local GPU by itself); drop the flag, or "
                    "use --strategy=mirrored for N replicas on one machine.")
  if config.cpu_replicas > 1 and config.strategy != "mirrored":
    raise UserError(f"--cpu_replicas={config.cpu_replicas} needs "
                    "--strategy=mirrored (got "
                    f"--strategy={config.strategy}).")
  _validate_image_size(config.image_size)
  if config.strategy == "parameter_server" and (
      config.image_size or config.dataset == "array_record"):
    # Remote parameter-server workers run the dataset function themselves
    # and cannot call back into this process's Python (numpy_function).
    raise UserError("--strategy=parameter_server cannot read lazily "
                    "(--image_size, --dataset=array_record): its workers "
                    "cannot run the Python record look-up; use a "
                    "synchronous strategy, or an in-memory dataset.")
  try:
    shape = tuple(int(x) for x in config.synthetic_shape.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) <= 0:
    raise UserError(f"--synthetic_shape={config.synthetic_shape!r} must be "
                    "H,W,C with positive integers, e.g. 28,28,1.")


# Upper bounds of integer flags: far above any real run, low enough that no
# int64 (or int32: seeds, device counts) computation downstream overflows and
# that no buffer is sized from a typo (--global_batch_size=100000000 grew
# memory without bound). Lower bounds are checked above.
_INT_MAX = {
    "global_batch_size": 1 << 24, "eval_batch_size": 1 << 24,
    "grad_accum_steps": 1 << 16, "cpu_replicas": 256,
    "virtual_shards": 1 << 16,
    "train_steps": 1 << 40, "steps_per_loop": 1 << 40,
    "checkpoint_every": 1 << 40, "summary_every": 1 << 40,
    "eval_every": 1 << 40, "histograms_every": 1 << 40,
    "warmup_steps": 1 << 40, "input_wait_steps": 1 << 31,
    "keep_checkpoints": 1 << 20, "max_rollbacks": 1 << 20,
    "early_stopping_patience": 1 << 31, "synthetic_classes": 1 << 20,
    "synthetic_examples": 1 << 31, "ps_shard_min_bytes": 1 << 50,
    "seed": (1 << 32) - 1,
}
# Examples read in a run are int64 stream positions (parameter servers give
# each worker 2**40 of them: see trainer/ps.py).
_MAX_EXAMPLES = 1 << 40
# Float flags and their (minimum, maximum); every one must be finite.
_FLOAT_RANGE = {
    "learning_rate": (0.0, 1e6), "peer_timeout_s": (0.0, 1e6),
    "hang_timeout_s": (0.0, 1e6),
    "momentum": (0.0, 1.0), "weight_decay": (0.0, 1e6),
    "clip_norm": (0.0, 1e30), "early_stopping_min_delta": (0.0, 1e30),
    "eval_timeout_s": (0.0, 1e9),
}


def _validate_bounds(config: Config) -> None:
  """Upper bounds of integers, finite floats in range, and the number of
  examples a run reads; all before anything is built or written."""
  for name, most in _INT_MAX.items():
    value = getattr(config, name)
    if value > most:
      raise UserError(f"--{name}={value} is too large (at most {most}).")
  if config.seed < 0:
    raise UserError(f"--seed={config.seed} must be in 0..{_INT_MAX['seed']}.")
  if config.synthetic_classes < 1:
    raise UserError(f"--synthetic_classes={config.synthetic_classes} must be "
                    "positive.")
  examples = config.train_steps * config.global_batch_size
  if examples > _MAX_EXAMPLES:
    raise UserError(
        f"--train_steps x --global_batch_size ({config.train_steps} x "
        f"{config.global_batch_size} = {examples} examples) is too large (at "
        f"most 2**40 = {_MAX_EXAMPLES}); lower one of them.")
  for name, (least, most) in _FLOAT_RANGE.items():
    value = getattr(config, name)
    if not math.isfinite(value) or not least <= value <= most:
      raise UserError(f"--{name}={value} must be a finite number in "
                      f"[{least:g}, {most:g}].")


def check_batch_fits(config: Config, task) -> None:
  """A batch larger than its split is a typo, and an expensive one (the
  pipeline sizes buffers from it): refuse it once the splits' sizes are
  known, before the model is built or --model_dir touched. Tasks with their
  own train_dataset have no split size to check against."""
  if task.own_train_dataset() is None:
    n = task.source(config.train_split).num_examples
    if config.micro_batch_size > n:
      raise UserError(
          f"--global_batch_size={config.global_batch_size} (micro-batch "
          f"{config.micro_batch_size}) is larger than --train_split="
          f"{config.train_split!r} ({n} examples); use at most {n}.")
  if config.mode != "train" and config.eval_batch_size:
    n = task.source(config.eval_split).num_examples
    if config.eval_batch_size > max(n, 1):
      raise UserError(
          f"--eval_batch_size={config.eval_batch_size} is larger than "
          f"--eval_split={config.eval_split!r} ({n} examples); use at most "
          f"{n} (or 0: the global batch).")
def _validate_image_size(text: str) -> None:
  if not text:
    return
  try:
    sides = [int(x) for x in text.split(",")]
  except ValueError:
    sides = []
  if len(sides) not in (1, 2) or min(sides) <= 0:
    raise UserError(f"--image_size={text!r} must be N or H,W with positive "
                    "integers, e.g. 224 or 160,128.")


def _validate_watch(config: Config) -> None:
  """Flags of progress, TensorBoard extras, best checkpoint, early stopping."""
  for name in ("histograms_every", "input_wait_steps",
               "early_stopping_patience"):
    if getattr(config, name) < 0:
      raise UserError(f"--{name}={getattr(config, name)} must be >= 0.")
  if config.early_stopping_min_delta < 0:
    raise UserError(f"--early_stopping_min_delta="
                    f"{config.early_stopping_min_delta} must be >= 0.")
  if config.profile_steps:
    try:
      first, last = config.profile_range
    except ValueError:
      first = last = 0
    if not 1 <= first <= last:
      raise UserError(f"--profile_steps={config.profile_steps!r} must be "
                      "'A,B' with 1 <= A <= B, e.g. 100,120.")
  if config.early_stopping_patience > 0:
    if config.mode != "train_and_eval":
      raise UserError(
          f"--early_stopping_patience={config.early_stopping_patience} needs "
          f"evaluations: use --mode=train_and_eval (got --mode={config.mode}).")
    if config.eval_every <= 0:
      raise UserError(
          f"--early_stopping_patience={config.early_stopping_patience} needs "
          "evaluations during training: set --eval_every > 0.")


def _validate_topology(config: Config) -> None:
  """--deterministic=topology: what it can promise (docs/reliability.md)."""
  if config.deterministic not in (False, True, TOPOLOGY):
    raise UserError(f"--deterministic={config.deterministic!r}: use "
                    "--deterministic, --deterministic=topology or "
                    "--nodeterministic.")
  if not config.topology:
    return
  v = config.virtual_shards
  if config.strategy == "parameter_server":
    raise UserError("--deterministic=topology cannot hold under "
                    "--strategy=parameter_server: its workers apply their "
                    "updates asynchronously, in an order no flag fixes; use "
                    "--strategy=mirrored or multiworker, or plain "
                    "--deterministic.")
  if v <= 0 or v > 1 << 16:
    raise UserError(f"--virtual_shards={v} must be in 1..{1 << 16}.")
  if config.global_batch_size % v:
    raise UserError(f"--global_batch_size ({config.global_batch_size}) must "
                    f"be divisible by --virtual_shards ({v}) under "
                    "--deterministic=topology (each shard the same size).")
  if v % config.grad_accum_steps:
    raise UserError(f"--virtual_shards ({v}) must be divisible by "
                    f"--grad_accum_steps ({config.grad_accum_steps}).")
  if config.mixed_precision == "mixed_float16":
    raise UserError("--deterministic=topology does not support "
                    "--mixed_precision=mixed_float16 (its loss scale moves "
                    "with the overflows of a topology's sums); use float32 "
                    "or mixed_bfloat16.")


def check_divisible(config: Config, num_replicas: int) -> None:
  """The global batch must split evenly into replicas x micro-batches;
  under --deterministic=topology replicas x micro-batches must divide the
  virtual shards."""
  k = config.grad_accum_steps
  if config.topology and config.virtual_shards % (num_replicas * k):
    raise UserError(
        f"--virtual_shards ({config.virtual_shards}) must be divisible by "
        f"replicas x --grad_accum_steps ({num_replicas} x {k} = "
        f"{num_replicas * k}) under --deterministic=topology: pick a "
        "multiple of every topology the run may use (e.g. 16).")
  if config.global_batch_size % (num_replicas * k):
    raise UserError(
        f"--global_batch_size ({config.global_batch_size}) must be divisible "
        f"by replicas x --grad_accum_steps ({num_replicas} x {k} = "
        f"{num_replicas * k}).")
  eval_batch = config.effective_eval_batch_size
  if eval_batch % num_replicas:
    raise UserError(f"--eval_batch_size ({eval_batch}) must be divisible by "
                    f"the number of replicas ({num_replicas}).")
