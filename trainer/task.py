"""The Task API: what to train. The framework decides how.

Subclass `Task` (or `ClassificationTask`) and override what differs. Each
hook says where it runs; the framework owns distribution, loss scaling,
accumulation, the single cross-replica reduction, checkpoints and resume.
The built-in supervised step is itself `Task.train_step`, written with the
same public StepContext (trainer.step.context) a user's step gets.
"""

import dataclasses
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from trainer import compat, data
from trainer.config import Config, narrow
from trainer.data.source import Source
from trainer.errors import UserError

MetricFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


class Task:
  """Base class. Required: `source`, `build_model`, `loss`."""

  # The damaged examples this task's reading found (a
  # trainer.data.damage.DamageLog), or None: it reports none. The loop
  # stops on them after the chunk unless --skip_corrupt.
  damage_log = None

  def __init__(self, config: Config):
    # The user contract: a task is made from the run's Config (`--task`'s
    # factory(config), or trainer.train(config, task)) and may read any of
    # its fields. The framework's own parts get narrow settings instead.
    self.config = config

  # ---- data (host, inside tf.data) -------------------------------------
  def source(self, split: str) -> Source:
    """Random-access examples of `split` (see trainer.data.source). The
    framework orders them by a pure function of (seed, epoch), which is what
    makes mid-epoch resume exact."""
    raise NotImplementedError

  def preprocess(self, features, labels, meta: dict, training: bool):
    """Maps consecutive rows of a GLOBAL micro-batch: all of it on one
    machine (before the split across its replicas), a replica's share of
    it on each worker under multi-worker (each worker builds only its own
    rows). Keep it per-example so the result does not depend on the
    topology. `meta["pos"]` (int64 [b]) is each example's stream position
    and `meta["start"]` the global batch's first one: derive augmentation
    seeds from them (stateless ops) to keep resume exact, e.g. draw for the
    whole global batch from (seed, start) and keep rows pos - start, as
    trainer.data.augment.crop_and_flip does. To drop an example while
    shapes stay static, set meta["weight"] to 0 for its row (meta is the
    pipeline's dict; meta["skipped"] = 1 also counts it in the train scalar
    skipped_examples). Returns (features, labels)."""
    del meta, training
    return features, labels

  def train_dataset(self, batch_size: int, seed: int, start_position: int):
    """Optional, instead of `source` for TRAINING data: an endless
    tf.data.Dataset of global micro-batches (features, labels) of
    `batch_size` rows, whose first row is example number `start_position`
    of a stream that is a pure function of `seed` (its contract for exact
    resume: the framework adds the meta and never skips ahead). Evaluation
    still reads `source`. Not overridden (this default): the framework's
    pipeline over `source(split)`."""
    del batch_size, seed, start_position
    return None

  def own_train_dataset(self):
    """`train_dataset` if this task overrides it, else None."""
    method = self.train_dataset
    if getattr(method, "__func__", None) is Task.train_dataset:
      return None
    return method

  # ---- model (built once, inside strategy.scope()) ---------------------
  def build_model(self, input_spec):
    """`input_spec`: tf.TensorSpec (or nest) of one example's features after
    preprocess. Return a Keras model, or a dict of named Keras models (each
    is checkpointed under model/NAME; the one named "model" is the main
    one, which evaluation and export use by default). Use layers.Dropout
    for dropout that is exact across replica counts and restarts. A model
    with trainable=False (e.g. a frozen teacher) is never updated."""
    raise NotImplementedError

  def optimizers(self):
    """None (default): the optimizer the --optimizer flags describe. Or a
    Keras 3 optimizer instance (any class, a user subclass included), or a
    dict name -> optimizer, applied in that order. Built inside
    strategy.scope(); see optimizer_variables for what each updates."""
    return None

  def update_every(self, name: str) -> int:
    """N (default 1): optimizer `name` applies on the N-th, 2N-th, ...
    update only (1-based count of applied updates, resumed with the
    checkpoint), with that update's own gradients; its iterations, slots
    and --ema_decay averages stay put on the others. E.g. a WGAN's
    generator with n_critic=5: 5. `ctx.updates(name)` says, inside the
    step, whether this update is one (to skip the work on the others).
    Not available under parameter servers (no shared update count)."""
    del name
    return 1

  def optimizer_variables(self, name: str, models: dict) -> list | None:
    """The variables optimizer `name` updates, or None (default) for: with
    one optimizer, every trainable variable of every model; with several,
    the trainable variables of the model of the same name."""
    del name, models
    return None

  # ---- the step (replica context, inside tf.function) ------------------
  def train_step(self, batch, ctx) -> dict:
    """One micro-batch: `batch` = (features, labels) after preprocess,
    this replica's rows; `ctx` a trainer.step.context.StepContext. Hand
    gradients to ctx (ctx.minimize / ctx.apply_gradients) and return
    per-example metrics by name. The default is supervised learning with
    loss() and metrics() on the main model."""
    features, labels = batch
    model = ctx.model
    with tf.GradientTape() as tape:
      outputs = model(features, training=True)
      per_example = tf.cast(self.loss(labels, outputs), tf.float32)
      loss = ctx.scale_loss(per_example, model)
    ctx.minimize(tape, loss)
    return {"loss": per_example, **self.metric_values(labels, outputs)}

  def eval_step(self, batch, ctx) -> dict:
    """Per-example eval metrics of one batch (replica context). Default:
    loss() and metrics() of the main model."""
    features, labels = batch
    outputs = ctx.model(features, training=False)
    return {"loss": self.loss(labels, outputs),
            **self.metric_values(labels, outputs)}

  def metric_values(self, labels, outputs) -> dict:
    return {name: fn(labels, outputs) for name, fn in self.metrics().items()}

  # ---- objective (replica context, inside tf.function) -----------------
  def loss(self, labels, outputs) -> tf.Tensor:
    """Per-example losses, shape [local_batch]. Do NOT average: the
    framework divides by the global batch size (tf.nn.compute_average_loss)
    so that summing gradients across replicas gives the true mean."""
    raise NotImplementedError

  def metrics(self) -> dict[str, MetricFn]:
    """name -> fn(labels, outputs) giving per-example values; the framework
    reports their mean over all examples (replica-local sums, reduced once
    per summary). `loss` is always reported."""
    return {}

  def transform_gradients(self, gradients: list, variables: list) -> list:
    """Runs in replica context on the ALL-REDUCED gradients (identical on
    every replica), after the finite check, before the optimizer. E.g.
    clipping by global norm. Must be pure TF; no cross-replica calls."""
    del variables
    return gradients

  # ---- export (host, traced once into the SavedModel) -----------------
  def serving_signature(self, model, input_spec):
    """What trainer.export serves: a trainer.serving.Signature, i.e. the
    named inputs (spec of one example each, as the model sees them after
    preprocess) and a function {name: batch} -> {output name: batch}.
    Default: every input under its name (`features` for a single tensor,
    the keys of a dict), the model's outputs under their names."""
    from trainer import serving
    return serving.default_signature(model, input_spec)

  def serving_signatures(self, model, input_spec) -> dict:
    """Every signature trainer.export may write, by name (letters, digits,
    '_'): {name: trainer.serving.Signature}; `--signatures=a,b` picks some.
    Default: {"serving_default": serving_signature(...)}. Override to add
    others beside it (e.g. the top-k items of a user beside the score of a
    pair); keep "serving_default", the one TF Serving calls by default."""
    return {"serving_default": self.serving_signature(model, input_spec)}


@dataclasses.dataclass(frozen=True)
class ClassificationSettings(data.Settings):
  """What the built-in classification task reads beside its data (field
  names are the Config's)."""
  train_split: str = "train"
  eval_split: str = "test"
  micro_batch_size: int = 64
  global_batch_size: int = 64
  topology: bool = False
  image_hw: tuple[int, int] | None = None
  augment: bool = False


class ClassificationTask(Task):
  """Image classification with a built-in dataset and model (the CLI path).

  Made like any Task from the run's Config (user subclasses pass it on:
  `super().__init__(config, model_fn=...)`, and may read `self.config`);
  what this class itself reads is `self.settings`, its
  ClassificationSettings cut from that Config."""

  def __init__(self, config: Config, model_fn=None):
    super().__init__(config)
    self.settings = narrow(ClassificationSettings, config)
    self._model_fn = model_fn
    self._sources: dict[str, Source] = {}

  def source(self, split: str) -> Source:
    if split not in self._sources:
      self._sources[split] = data.readers_for(self.settings, split)
    return self._sources[split]

  # Text-like sets whose meaning a mirror image changes: never flipped.
  _NO_FLIP = ("digits", "mnist")

  @compat.plain
  def preprocess(self, features, labels, meta, training):
    from trainer.data import augment, resize
    settings = self.settings
    if training or settings.image_hw:
      # Draws for the whole global batch from (seed, its first position),
      # this batch's rows kept: the same for each example on any topology.
      start, rows = meta["start"][0], settings.micro_batch_size
      if settings.topology:
        # Keyed by the update (positions advance by whole updates): the
        # same draws for any grouping of shards into micro-batches.
        rows = settings.global_batch_size
        start = start - start % rows
      seed = tf.stack([tf.constant(settings.seed, tf.int64), start])
      first_row = meta["pos"][0] - start
    if settings.image_hw:
      source = self.source(settings.train_split)
      channels = source.decode_channels or source.feature_spec.shape[-1]
      images, ok = resize.resize_batch(
          features, settings.image_hw, channels, training, seed,
          first_row=first_row, global_batch=rows,
          flip=settings.augment and settings.dataset not in self._NO_FLIP)
      if source.decode_channels:
        self._drop_damaged(meta, ok, training)
      return images, labels
    images = tf.cast(features, tf.float32) * (1.0 / 255.0)
    if training and settings.augment:
      images = augment.crop_and_flip(
          images, seed, flip=settings.dataset == "cifar10",
          first_row=first_row, global_batch=rows)
    return images, labels

  def _drop_damaged(self, meta, ok, training):
    """A row whose image did not decode: weight 0, counted in meta
    "skipped", and named on the host (trainer.data.damage). meta is the
    pipeline's dict: setting its entries here is how preprocess drops an
    example while shapes stay static."""
    from trainer.data import damage, pipeline
    settings = self.settings
    if self.damage_log is None:
      self.damage_log = damage.DamageLog(settings.dataset,
                                         settings.skip_corrupt)
    log = self.damage_log
    split = settings.train_split if training else settings.eval_split
    source = self.source(split)
    meta["weight"] = meta["weight"] * ok
    meta["skipped"] = 1.0 - ok
    index = (pipeline.example_indices(meta["pos"], source.num_examples,
                                      settings.seed) if training else
             tf.minimum(meta["pos"], source.num_examples - 1))

    def note(indices, oks):
      where = [source.describe(int(i)) if source.describe else source.name
               for i, good in zip(indices, oks) if good < 1]
      log.note(where)
      return np.int64(0)

    def report():
      with tf.control_dependencies([tf.numpy_function(
          note, [index, ok], tf.int64, stateful=True)]):
        return tf.constant(0, tf.int64)

    done = tf.cond(tf.reduce_min(ok) < 1.0, report,
                   lambda: tf.constant(0, tf.int64))
    with tf.control_dependencies([done]):
      meta["weight"] = tf.identity(meta["weight"])

  def build_model(self, input_spec) -> keras.Model:
    num_classes = self.source(self.settings.train_split).num_classes
    return self._model_fn(tuple(input_spec.shape), num_classes)

  @compat.plain
  def loss(self, labels, outputs):
    return keras.losses.sparse_categorical_crossentropy(
        labels, outputs, from_logits=True)

  @compat.plain
  def metrics(self):
    return {"accuracy": accuracy}

  def serving_signature(self, model, input_spec):
    """`images` (float32 [N, H, W, C] as after preprocess) ->
    `probabilities` (softmax of the logits)."""
    from trainer import serving
    return serving.classification_signature(model, input_spec)


@compat.plain
def accuracy(labels, logits):
  """Per-example 0/1: is the arg-max class the label."""
  predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
  return tf.cast(tf.equal(predicted, tf.cast(labels, tf.int32)), tf.float32)


# A Task's single model (build_model returned one model) has this name.
MAIN = "model"


def models_of(task: Task, spec) -> dict:
  """Task.build_model's model, or dict of named models, as a dict."""
  built = task.build_model(spec)
  if isinstance(built, keras.Model):
    return {MAIN: built}
  if isinstance(built, dict) and built and all(
      isinstance(k, str) and k.isidentifier() and isinstance(m, keras.Model)
      for k, m in built.items()):
    return dict(built)
  raise UserError(
      f"{type(task).__name__}.build_model returned {type(built).__name__}: "
      "return a keras.Model or a dict of them keyed by identifier names.")
