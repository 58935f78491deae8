"""The composition root: Config -> every part of one run (strategy, task,
models, optimizers, state, moving average, steps, checkpointer, executor),
each handed the narrow settings it needs. It builds, it never loops
(trainer.controller does, through the executor).

The strategy kind is decided here and nowhere below: BACKENDS maps each
--strategy to how its strategy is made, its Steps and executor classes and
what it can do.
"""

import dataclasses
import os
from typing import Callable

from absl import logging
import keras
import tensorflow as tf

import layers
from trainer import actions, bases
from trainer import checkpoint as ckpt_lib
from trainer import epochs, executors, optim, plugins, precision, rundir
from trainer import watch
from trainer.distribute import ps_strategy, tpu
from trainer.distribute import strategy as strategy_lib
from trainer.distribute.role import Role
from trainer.config import Config, check_batch_fits, check_divisible
from trainer.config import narrow  # noqa: F401  (build.narrow, as ever)
from trainer.data import pipeline
from trainer.errors import UserError
from trainer.executors import ps as ps_executor
from trainer.executors import sync as sync_executor
from trainer.state import TrainState
from trainer.step.steps import StepSettings, Steps, make_ema
from trainer.task import MAIN, ClassificationTask, Task, models_of  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Backend:
  """How one strategy kind is run, and what it can do."""
  make_strategy: Callable   # strategy_lib.Settings -> (strategy, Role)
  steps_class: type
  executor_class: type
  # ctx.all_gather: "collective" (ReplicaContext.all_gather), "by_sum" (an
  # all-reduce: multi-worker's all_gather fails at trace time), "" (none).
  all_gather: str
  gradient_histograms: bool   # False: weights only (no synchronous step)
  profiler: bool              # the work runs in this process
  synchronous: bool = True    # one shared update count (update_every)


def _tpu(settings):
  return tpu.build_strategy(settings), Role(True, 0, 1)


_SYNC = dict(steps_class=Steps, executor_class=sync_executor.SyncExecutor,
             gradient_histograms=True, profiler=True)
BACKENDS = {
    "default": Backend(strategy_lib.default, all_gather="collective",
                       **_SYNC),
    "mirrored": Backend(strategy_lib.mirrored, all_gather="collective",
                        **_SYNC),
    "multiworker": Backend(strategy_lib.multiworker, all_gather="by_sum",
                           **_SYNC),
    "tpu": Backend(_tpu, all_gather="collective", **_SYNC),
    "parameter_server": Backend(
        ps_strategy.build, steps_class=ps_executor.PSSteps,
        executor_class=ps_executor.PSExecutor, all_gather="",
        gradient_histograms=False, profiler=False, synchronous=False),
}


def task_of(config: Config) -> Task:
  """Config -> Task: a plug-in task (--task), made by its factory from the
  run's Config (the Task contract), or the built-in classification task on
  --model and --dataset."""
  if config.task:
    factory = plugins.load(config.task, "task")
    if not callable(factory):
      raise UserError(f"--task={config.task!r} is a {type(factory).__name__}, "
                      "not a Task class or a function config -> Task.")
    task = factory(config)
    if not isinstance(task, Task):
      raise UserError(f"--task={config.task!r} made a {type(task).__name__}, "
                      "not a trainer.Task; subclass trainer.Task.")
    return task
  if ":" in config.model:
    model_fn = plugins.load(config.model, "model")
  else:
    model_fn = layers.get(config.model)
  return ClassificationTask(config, model_fn)


def backend_of(config: Config) -> Backend:
  try:
    return BACKENDS[config.strategy]
  except KeyError:
    raise UserError(f"--strategy={config.strategy!r} is not supported; "
                    f"choose one of {', '.join(BACKENDS)}.") from None


@dataclasses.dataclass
class Parts:
  """Everything a run is made of. `model` is the main model (the only one,
  or the one named "model"); `optimizer` the only optimizer, if one.
  `config` is the effective Config (resolved precision and epochs), for
  the caller of build; no part below is handed it."""
  config: Config
  strategy: tf.distribute.Strategy
  role: strategy_lib.Role
  task: Task
  models: dict
  optimizers: dict
  state: TrainState
  steps: Steps
  checkpointer: ckpt_lib.Checkpointer
  ema: object = None
  flag_optimizer: bool = True   # the --optimizer flags made the optimizer

  @property
  def model(self):
    return self.steps.main_model()

  @property
  def optimizer(self):
    return next(iter(self.optimizers.values())) if len(
        self.optimizers) == 1 else None

  backend: Backend = None
  # The runs the task loaded while building its models (trainer.bases).
  loaded: dict = dataclasses.field(default_factory=dict)


def optimizers_of(task: Task, config: Config, state: TrainState,
                  models: dict) -> tuple[dict, dict, bool]:
  """({name: prepared optimizer}, {name: its variables}, whether the
  --optimizer flags made it). Inside strategy.scope()."""
  given = task.optimizers()
  from_flags = given is None
  if from_flags:
    given = {"optimizer": optim.from_flags(narrow(optim.Settings, config),
                                           state.global_step)}
  elif not isinstance(given, dict):
    given = {"optimizer": given}
  if not given:
    raise UserError(f"{type(task).__name__}.optimizers() returned no "
                    "optimizer.")
  variables = {}
  for name in given:
    chosen = task.optimizer_variables(name, models)
    if chosen is None:
      if len(given) == 1:
        chosen = [v for m in models.values() for v in m.trainable_variables]
      elif name in models:
        chosen = list(models[name].trainable_variables)
      else:
        raise UserError(
            f"optimizer {name!r} has no model of the same name (models: "
            f"{sorted(models)}); name them alike or override "
            "Task.optimizer_variables to say what it updates.")
    if not chosen:
      raise UserError(f"optimizer {name!r} has no trainable variables.")
    variables[name] = list(chosen)
  seen = {}
  for name, chosen in variables.items():
    for v in chosen:
      other = seen.setdefault(id(v), name)
      if other != name:
        raise UserError(f"variable {v.path} is updated by both optimizer "
                        f"{other!r} and {name!r}; give each variable to one.")
  prepared = {}
  for name, optimizer in given.items():
    if name.count("/") or not name:
      raise UserError(f"optimizer name {name!r} must be a non-empty name "
                      "without '/'.")
    prepared[name] = optim.prepare(optimizer, variables[name])
  return prepared, variables, from_flags


def trackable(named: dict, name: str):
  """One object for the checkpoint: the only one as itself (the layout
  every earlier checkpoint has), several under their names."""
  if list(named) == [name]:
    return named[name]
  module = tf.Module(name=name)
  for key, value in named.items():
    setattr(module, key, value)
  return module


def _resolved_precision(config: Config) -> Config:
  """--mixed_precision=auto -> the policy this machine gets; every part
  (and config.json) sees the resolved name."""
  chosen = precision.for_this_machine(config.mixed_precision, config.strategy)
  if chosen == config.mixed_precision:
    return config
  logging.info("--mixed_precision=auto: %s on this machine (trainer/"
               "precision.py says when).", chosen)
  return dataclasses.replace(config, mixed_precision=chosen)


def parts(config: Config, task: Task | None = None) -> Parts:
  """Builds a run's parts for the configured strategy kind."""
  backend = backend_of(config)
  strategy_settings = narrow(strategy_lib.Settings, config)
  strategy_lib.configure_devices(strategy_settings)
  strategy, role = backend.make_strategy(strategy_settings)
  check_divisible(config, strategy.num_replicas_in_sync)
  _topology_line(config)
  keras.utils.set_random_seed(config.seed)
  config = _resolved_precision(config)
  keras.mixed_precision.set_global_policy(config.mixed_precision)
  task = task if task is not None else task_of(config)
  # Epoch flags become steps once the split sizes are known.
  config = config.replace(**epochs.resolve(narrow(epochs.Settings, config),
                                           task))
  check_batch_fits(config, task)
  # Data first: a missing file is reported before model_dir is touched.
  spec = pipeline.input_spec(task, config.train_split)
  with strategy.scope(), bases.building(
      config.model_dir, _restores(config), _task_cwd(config)) as loaded:
    models = models_of(task, spec)
    state = TrainState()
    optimizers, variables, flag_optimizer = optimizers_of(task, config,
                                                          state, models)
  ema = make_ema(strategy, models, config.ema_decay)
  replicas = strategy.num_replicas_in_sync
  steps = backend.steps_class(
      strategy, task, models, optimizers, variables, state,
      narrow(StepSettings, config, all_gather=backend.all_gather,
             synchronous=backend.synchronous,
             grad_accum_steps=effective_accum_steps(config, replicas),
             virtual_shards=config.virtual_shards if config.topology else 0),
      ema)
  objects = {"model": trackable(models, MAIN),
             "optimizer": trackable(optimizers, "optimizer"),
             "global_step": state.global_step, "state": state,
             "config": tf.Variable(config.to_json(), trainable=False)}
  if ema is not None:
    objects["ema"] = ema
  checkpointer = ckpt_lib.Checkpointer(
      config.model_dir, objects, keep=config.keep_checkpoints,
      is_chief=role.is_chief, worker_index=role.worker_index,
      asynchronous=config.async_checkpoint)
  if len(models) > 1 or len(optimizers) > 1:
    logging.info("models: %s; optimizers: %s", ", ".join(models),
                 ", ".join(f"{n} ({type(o).__bases__[-1].__name__})"
                           for n, o in optimizers.items()))
  return Parts(config, strategy, role, task, models, optimizers, state, steps,
               checkpointer, ema, flag_optimizer, backend, loaded)


def effective_accum_steps(config: Config, replicas: int) -> int:
  """Micro-batches per update: --grad_accum_steps, or under
  --deterministic=topology one virtual shard per replica per micro-batch
  (--virtual_shards / replicas: the step sees the same shard, the same
  kernels, on every topology; --grad_accum_steps then only has to divide
  it).

  >>> effective_accum_steps(Config(grad_accum_steps=2), replicas=4)
  2
  >>> effective_accum_steps(Config(deterministic="topology",
  ...                              virtual_shards=8), replicas=2)
  4
  """
  if config.topology:
    return config.virtual_shards // replicas
  return config.grad_accum_steps


TOPOLOGY_SCOPE = (
    "--deterministic=topology: checkpoints are bit-identical across replica "
    "and worker counts, --grad_accum_steps and resumes with the same "
    "--virtual_shards={v}, on CPUs of the same instruction set "
    "(oneDNN {onednn}) and TensorFlow {tf}; another CPU family, "
    "TensorFlow version or oneDNN setting may differ (docs/reliability.md).")


def _topology_line(config: Config) -> None:
  if config.topology:
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
    logging.warning(TOPOLOGY_SCOPE.format(v=config.virtual_shards,
                                          onednn=onednn, tf=tf.__version__))


def _restores(config: Config) -> bool:
  """Whether the run's own checkpoint will overwrite the models' weights
  after the build, so what its task loads from elsewhere need not be read:
  always when evaluating, when resuming in training."""
  if config.mode not in rundir.TRAINING_MODES:
    return True
  pattern = os.path.join(config.model_dir, f"{ckpt_lib.PREFIX}-*.index")
  return bool(tf.io.gfile.glob(pattern))


def _task_cwd(config: Config) -> str:
  """What a relative path in the task's arguments is relative to: this
  process's directory when training, the training run's when evaluating."""
  if config.mode in rundir.TRAINING_MODES:
    return os.getcwd()
  return rundir.training_cwd(config.model_dir) or os.getcwd()


def assemble(config: Config, task: Task | None = None) -> dict:
  """Every argument of trainer.controller.Controller: the parts, the
  executor, the loop's settings, the run's record, the histograms."""
  built = parts(config, task)
  config = built.config
  backend = built.backend

  def make_eval_steps(strategy, models):
    # Evaluation only: no optimizer, one micro-batch.
    return Steps(strategy, built.task, models, {}, {}, built.state,
                 narrow(StepSettings, config, grad_accum_steps=1,
                        virtual_shards=0, all_gather="collective",
                        synchronous=True))

  accum = effective_accum_steps(config,
                                built.strategy.num_replicas_in_sync)
  micro_batch = config.global_batch_size // accum
  executor = backend.executor_class(
      built, narrow(executors.Settings, config,
                    eval_batch_size=config.effective_eval_batch_size,
                    micro_batch_size=micro_batch),
      make_eval_steps)
  histograms = None
  if config.histograms_every > 0:
    histograms = watch.Histograms(
        built, config.train_split, micro_batch, config.seed,
        accum, gradients=backend.gradient_histograms)
  settings = narrow(actions.LoopSettings, config,
                    profile_range=config.profile_range,
                    tracks_best=config.tracks_best)
  record = rundir.RunRecord(config.model_dir, config.mode, config.to_json(),
                            config.command_line(), bases=built.loaded)
  return dict(parts=built, executor=executor, settings=settings,
              record=record, histograms=histograms)
