"""Every use of a Keras 3 / TensorFlow private, in one place, behind one
version check.

The framework needs a few things Keras' public API does not give:
  * optimizers that do NOT sum gradients across replicas themselves (the
    step reduces once per update, so clipping and the finite check see the
    global gradient): `_all_reduce_sum_gradients`;
  * TF's fused optimizer kernels (one op per variable instead of Keras 3's
    ~15-20): `_distributed_tf_update_step`, `_get_variable_index`, the
    slot lists `_momentums`, `_velocities`, `momentums`;
  * Keras variables held as ShardedVariables (the parameter-server
    partitioner): differentiated shard by shard, updated shard by shard,
    and checkpointed shard by shard as TF's ShardedVariable is
    (`DelegatingTrackableMixin`);
  * layer names that do not depend on what the process built before
    (trainer.load): Keras' naming counters, `object_name_uids`;
  * the error a failed eager read leaves in its thread's executor
    (`read_int`);
  * the saver's per-task read, `functional_saver._single_shard_restore`,
    to leave out the large variables restored one at a time (`skipping`);
  * AutoGraph's mark for code it must call as written
    (`autograph_artifact`): see `plain`;
  * TensorFlow ops and names used around a wrapper that misbehaves:
    `RandomIndexShuffle` (batched seeds), `ResourceScatterAdd` on a
    parameter-server variable, the coordinator's `PSUnavailableError`,
    Slurm's resolver on hosts without GPUs, multi-worker all_gather.
These names are private and change between releases. They were verified
on the versions in TESTED; any other version fails at start with one line
(set TRAINER_UNTESTED_VERSIONS=1 to try anyway, at your own risk).
"""

import collections
import contextlib
import os

import keras
import tensorflow as tf

from trainer.errors import UserError

TESTED = {"tensorflow": ("2.21",), "keras": ("3.15",)}


def check_versions() -> None:
  """Refuses a TensorFlow or Keras release the overrides were not tested on."""
  found = {"tensorflow": tf.__version__, "keras": keras.__version__}
  for name, version in found.items():
    if ".".join(version.split(".")[:2]) in TESTED[name]:
      continue
    if os.environ.get("TRAINER_UNTESTED_VERSIONS") == "1":
      continue
    raise UserError(
        f"{name} {version} is not a version this trainer was tested on "
        f"({', '.join(TESTED[name])}.x): it overrides private Keras/TF "
        "internals (trainer/compat.py). Install the versions in setup.cfg, "
        "or set TRAINER_UNTESTED_VERSIONS=1 to try anyway.")


check_versions()

# ---- AutoGraph ----------------------------------------------------------
# AutoGraph rewrites every function a traced function calls, from its
# source, once per process: ~3.5 s of CPU at each start of a small run,
# most of it on framework code whose control flow is plain Python (loops
# over models and optimizers, checks of flags). `plain` marks such code so
# AutoGraph calls it as written; a rewrite would not change it. A tensor
# used as a Python bool in plain code fails loudly at the trace, never
# silently. Unlike tf.autograph.experimental.do_not_convert, `plain` leaves
# AutoGraph's on/off state as it was, so the user's own functions that
# plain code calls through `user_code` are still rewritten (their `if` on a
# tensor keeps working). Private: autograph.impl.api.autograph_artifact,
# the mark tf_convert and converted_call already honour.
from tensorflow.python.autograph.impl import api as _autograph_api  # noqa: E402


def plain(fn):
  """Decorator: AutoGraph calls `fn` (and what it calls directly) as
  written, without rewriting it."""
  _autograph_api.autograph_artifact(fn)
  return fn


def plain_methods(cls):
  """Class decorator: `plain` on every function defined in the class."""
  for value in vars(cls).values():
    if callable(value) and hasattr(value, "__code__"):
      plain(value)
  return cls


def user_code(fn):
  """`fn` (a user's hook, called from plain code) as AutoGraph would have
  called it from rewritten code: rewritten while AutoGraph is on, as
  written under tf.function(autograph=False)."""
  return tf.__internal__.autograph.tf_convert(
      fn, tf.__internal__.autograph.control_status_ctx())


_SHARDED = tf.__internal__.distribute.ShardedVariable


@plain
def is_sharded(variable) -> bool:
  """A tf ShardedVariable, or a Keras variable whose value is one."""
  return isinstance(variable, _SHARDED) or isinstance(
      getattr(variable, "value", None), _SHARDED)


# ---- gradients ----------------------------------------------------------
@plain
def gradients(tape, target, variables, output_gradients=None):
  """tape.gradient; a Keras variable held as a ShardedVariable is
  differentiated shard by shard and its gradient concatenated: Keras 3
  variables hand the tape `.handle` of their value, which a ShardedVariable
  lacks. Missing gradients come back as None."""
  if not any(is_sharded(v) for v in variables):
    return tape.gradient(target, variables, output_gradients=output_gradients)
  groups = [v.value.variables if is_sharded(v) else None for v in variables]
  flat = tape.gradient(target, [s for v, g in zip(variables, groups)
                                for s in (g if g is not None else [v])],
                       output_gradients=output_gradients)
  grads = []
  for group in groups:
    if group is None:
      grads.append(flat.pop(0))
      continue
    grads.append(_joined([flat.pop(0) for _ in group], group))
  return grads


def _joined(parts, shards):
  """The gradient of a sharded variable from its shards' (None: zero).
  Slices stay slices, each shard's row numbers offset by the rows before
  it ("div" sharding), so only the touched rows travel to the ps tasks;
  anything else is concatenated dense."""
  if all(p is None for p in parts):
    return None
  if all(p is None or isinstance(p, tf.IndexedSlices) for p in parts):
    offsets = [0]
    for shard in shards:
      offsets.append(offsets[-1] + int(shard.shape[0]))
    kept = [(p, o) for p, o in zip(parts, offsets) if p is not None]
    return tf.IndexedSlices(
        tf.concat([p.values for p, _ in kept], 0),
        tf.concat([tf.cast(p.indices, tf.int64) + o for p, o in kept], 0),
        tf.constant([offsets[-1], *shards[0].shape[1:]], tf.int64))
  return tf.concat(
      [tf.zeros(s.shape, s.dtype) if p is None else tf.convert_to_tensor(p)
       for p, s in zip(parts, shards)], axis=0)


# ---- optimizers ---------------------------------------------------------
class _PreReduced:
  """The step all-reduces gradients itself, exactly once per update, so that
  clipping and the finite check see the global gradient (Keras' own clipnorm
  runs before its reduction, on per-replica gradients). Keras must not SUM
  them across replicas a second time."""

  def _all_reduce_sum_gradients(self, grads_and_vars):
    return list(grads_and_vars)


@plain
def _handle(variable):
  """The resource handle of a Keras or tf variable (in an update() call:
  the current device's copy of a mirrored one)."""
  if isinstance(variable, keras.Variable):
    variable = variable.value
  return variable.handle


class _Fused:
  """Updates each variable with TF's fused training kernel (one op per
  variable: ResourceApplyAdam, ResourceApplyKerasMomentum,
  ResourceApplyGradientDescent) instead of Keras 3's ~15-20 element-wise
  ops per variable. Same formulas as Keras' update_step (Keras 2 used
  these kernels); on a small model's CPU step the per-op overhead of the
  unfused update is a measurable share of the step (bench/, README Speed).
  Parameter-server shards (ShardedVariable) keep Keras' own update."""

  def _distributed_tf_update_step(self, distribution, grads_and_vars,
                                  learning_rate):
    pairs = list(grads_and_vars)
    if any(is_sharded(v) for _, v in pairs) or not self._fusable():
      return super()._distributed_tf_update_step(distribution, pairs,
                                                  learning_rate)
    shared = self._shared_scalars()

    @plain
    def apply(variable, gradient, lr):
      cast = lambda x: tf.cast(x, variable.dtype)  # noqa: E731
      scalars = {k: cast(v) for k, v in shared.items()}
      scalars["lr"] = cast(lr)
      return self._fused_update(variable, cast(gradient), scalars)

    # The learning rate goes through `args` as Keras passes it: under a
    # merge_call it is a per-replica value that update() unwraps per device.
    for gradient, variable in pairs:
      distribution.extended.update(variable, apply,
                                   args=(gradient, learning_rate), group=False)
    return None

  def _fusable(self) -> bool:
    return True

  @plain
  def _slot(self, slots, variable):
    return _handle(slots[self._get_variable_index(variable)])


class _FusedAdam(_Fused):

  def _fusable(self):
    return not self.amsgrad

  def _shared_scalars(self):
    # Keras' update_step computes these per variable; once per update here.
    step = tf.cast(self.iterations + 1, tf.float32)
    return {"beta1_power": tf.pow(tf.cast(self.beta_1, tf.float32), step),
            "beta2_power": tf.pow(tf.cast(self.beta_2, tf.float32), step),
            "beta1": self.beta_1, "beta2": self.beta_2,
            "epsilon": self.epsilon}

  @plain
  def _fused_update(self, variable, gradient, s):
    return tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=self._slot(self._momentums, variable),
        v=self._slot(self._velocities, variable),
        beta1_power=s["beta1_power"], beta2_power=s["beta2_power"],
        lr=s["lr"], beta1=s["beta1"], beta2=s["beta2"],
        epsilon=s["epsilon"], grad=gradient)


class _FusedSGD(_Fused):

  def _shared_scalars(self):
    return {"momentum": self.momentum}

  @plain
  def _fused_update(self, variable, gradient, s):
    if self.momentum == 0:
      return tf.raw_ops.ResourceApplyGradientDescent(
          var=variable.handle, alpha=s["lr"], delta=gradient)
    # accum = accum * momentum - lr * grad; var += accum (Nesterov:
    # var += accum * momentum - lr * grad): Keras' SGD exactly.
    return tf.raw_ops.ResourceApplyKerasMomentum(
        var=variable.handle, accum=self._slot(self.momentums, variable),
        lr=s["lr"], grad=gradient, momentum=s["momentum"],
        use_nesterov=self.nesterov)


# Exact classes only: a user's subclass may change update_step, which the
# fused kernel would silently bypass. (AdamW is Adam plus Keras' own
# decoupled weight decay, applied before update_step: fusable too.)
_FUSED = {keras.optimizers.SGD: _FusedSGD, keras.optimizers.Adam: _FusedAdam,
          keras.optimizers.AdamW: _FusedAdam}


def is_fused(optimizer) -> bool:
  return isinstance(optimizer, _Fused)


def slot(optimizer, slots: str, variable):
  """`variable`'s slot variable in one of a Keras optimizer's private slot
  lists (`slots`: "_momentums", "_velocities", "_accumulators",
  "momentums"); `variable` may be a mirrored variable's per-device copy."""
  return getattr(optimizer, slots)[optimizer._get_variable_index(variable)]


def prereduced(optimizer, fused: bool = True):
  """Makes `optimizer` (any Keras 3 optimizer instance, a user subclass
  included) take gradients that are already all-reduced; the built-in
  Keras classes also get TF's fused kernels. Changes the instance's class
  in place (same state, same checkpoint names) and returns it."""
  cls = type(optimizer)
  if isinstance(optimizer, _PreReduced):
    return optimizer
  if not isinstance(optimizer, keras.optimizers.Optimizer):
    raise UserError(f"{cls.__module__}.{cls.__name__} is not a Keras 3 "
                    "optimizer (keras.optimizers.Optimizer); return Keras "
                    "optimizers from Task.optimizers().")
  bases = (_PreReduced,)
  if fused and cls in _FUSED:
    bases += (_FUSED[cls],)
  optimizer.__class__ = type(f"PreReduced{cls.__name__}", (*bases, cls), {})
  return optimizer


class _ShardedUpdates:
  """Optimizer mixin for parameter servers: Keras 3 updates each variable
  through strategy.extended.update(var), which cannot colocate with a
  ShardedVariable; those (and only those) are updated directly: their
  assign ops go to each shard's ps task."""

  def _distributed_tf_update_step(self, distribution, grads_and_vars,
                                  learning_rate):
    pairs = list(grads_and_vars)
    super()._distributed_tf_update_step(
        distribution, [(g, v) for g, v in pairs if not is_sharded(v)],
        learning_rate)
    for grad, var in pairs:
      if is_sharded(var):
        self.update_step(grad, var, learning_rate)

  def _apply_weight_decay(self, variables):
    super()._apply_weight_decay([v for v in variables if not is_sharded(v)])
    if self.weight_decay is None:
      return
    for variable in variables:
      if is_sharded(variable) and self._use_weight_decay(variable):
        value = variable.value
        lr = tf.cast(self.learning_rate, value.dtype)
        wd = tf.cast(self.weight_decay, value.dtype)
        value.assign_sub(tf.convert_to_tensor(value) * wd * lr)


def with_sharded_updates(optimizer):
  """Gives `optimizer` the _ShardedUpdates behaviour (same state)."""
  cls = type(optimizer)
  optimizer.__class__ = type(f"Sharded{cls.__name__}", (_ShardedUpdates, cls),
                             {})
  return optimizer


_DELEGATING = {}


def _by_shard_class(cls):
  """`cls` (a Keras variable class) whose checkpointing is that of the
  ShardedVariable it holds: TF's DelegatingTrackableMixin hands the saver
  the inner trackable's saveables (Keras' own `_serialize_to_tensors` would
  hand it the ShardedVariable as one value)."""
  if cls not in _DELEGATING:
    from tensorflow.python.trackable import base_delegate
    _DELEGATING[cls] = type(f"ByShard{cls.__name__}",
                            (base_delegate.DelegatingTrackableMixin, cls), {})
  return _DELEGATING[cls]


def save_sharded_by_shard(variables) -> list:
  """Keras 3 variables held as ShardedVariables cannot be saved as Keras
  hands them over (one value, which the saver wants on one device). Each
  such variable is checkpointed as TF's ShardedVariable is: every shard is
  one slice of the variable's one key, saved and restored by the ps task
  that holds it (no other process holds its rows), and a restore reads the
  rows each shard asks for, whatever the split the checkpoint was written
  with. So the checkpoint restores under any number of ps tasks, under any
  other strategy as one ordinary variable, and a checkpoint that holds the
  whole value restores into shards. Returns the sharded variables."""
  sharded = []
  for variable in variables:
    if not isinstance(getattr(variable, "value", None), _SHARDED):
      continue
    sharded.append(variable)
    if not isinstance(variable, tuple(_DELEGATING.values())):
      variable._trackable = variable.value
      variable.__class__ = _by_shard_class(type(variable))
  return sharded


# ---- where a sharded table's values are made ------------------------------
# Keras initializers whose value at a row does not depend on the row: a
# shard's part is the initializer at the shard's shape.
_ROW_FREE = (keras.initializers.Zeros, keras.initializers.Ones)
# Outputs of one Philox call per dtype (TF's stateless kernels: element i of
# a draw comes from counter + i // group), and counter steps per group of a
# truncated normal draw (TF reserves 256 samples per output).
_GROUP = {tf.float32: 4, tf.float64: 2}
_TRUNCATED_SKIP = 256 // 4


def _part_of(initializer, shape, dtype):
  """Keras' `initializer(shape)` as a tf.Variable initial value that also
  takes TF's partition_shape / partition_offset (ParameterServerStrategy
  calls it once per shard, on the ps device that will hold the shard).
  A row-independent initializer makes only the shard; Keras' stateless
  random ones (uniform, normal, truncated normal, the variance-scaling
  family) draw only the shard's rows, the very values `initializer(shape)`
  has there; any other one makes the whole value there and keeps the
  shard's rows (transiently the whole value on that ps)."""

  def initial_value(partition_shape=None, partition_offset=None):
    if partition_shape is None or tuple(partition_shape) == tuple(shape):
      return initializer(shape, dtype=dtype)
    part = tuple(partition_shape)
    if type(initializer) in _ROW_FREE:   # one op (Fill): one buffer
      return initializer(part, dtype=dtype)
    if (type(initializer) is keras.initializers.Constant
        and not getattr(initializer.value, "shape", ())):
      return _in_one_graph(initializer, part, dtype)
    rows = stateless_rows(initializer, shape, dtype, partition_offset[0],
                          part[0])
    if rows is not None:
      return rows
    start = partition_offset[0]
    return initializer(shape, dtype=dtype)[start:start + partition_shape[0]]

  return initial_value


def _in_one_graph(initializer, shape, dtype):
  """initializer(shape) computed in one graph: its intermediate tensors are
  updated in place, not each a new buffer as eager ops make them (Keras'
  Constant is ones times the value)."""
  return tf.function(lambda: initializer(shape, dtype=dtype),
                     autograph=False)()


def _stateless_draw(initializer, shape):
  """(kind, a, b): the stateless draw Keras' `initializer(shape)` makes
  (uniform in [a, b), or normal / truncated normal of mean a and stddev b),
  with its seed; None for any other initializer, a subclass that changes
  __call__, or a SeedGenerator seed (each call draws anew)."""
  from keras.src.initializers import random_initializers as ri
  seed = getattr(initializer, "seed", None)
  if not isinstance(seed, int) or isinstance(seed, bool):
    return None
  call = type(initializer).__call__
  if call is ri.RandomUniform.__call__:
    return "uniform", initializer.minval, initializer.maxval
  if call is ri.RandomNormal.__call__:
    return "normal", initializer.mean, initializer.stddev
  if call is ri.TruncatedNormal.__call__:
    return "truncated_normal", initializer.mean, initializer.stddev
  if call is not ri.VarianceScaling.__call__:
    return None
  # VarianceScaling.__call__'s own arithmetic (tests compare the values).
  import math
  scale = initializer.scale
  fan_in, fan_out = ri.compute_fans(shape, input_axes=initializer.input_axes,
                                    output_axes=initializer.output_axes)
  if initializer.mode == "fan_in":
    scale /= max(1.0, fan_in)
  elif initializer.mode == "fan_out":
    scale /= max(1.0, fan_out)
  else:
    scale /= max(1.0, (fan_in + fan_out) / 2.0)
  if initializer.distribution == "truncated_normal":
    return "truncated_normal", 0.0, math.sqrt(scale) / 0.87962566103423978
  if initializer.distribution == "untruncated_normal":
    return "normal", 0.0, math.sqrt(scale)
  limit = math.sqrt(3.0 * scale)
  return "uniform", -limit, limit


def stateless_rows(initializer, shape, dtype, start: int, rows: int):
  """Rows [start, start + rows) of Keras' `initializer(shape, dtype)`,
  bit for bit, drawn alone: TF's stateless Philox kernels make element i
  of a draw from the counter advanced by i // group, so the draw starts
  at the first row's counter. None where that does not hold (see
  _stateless_draw; dtypes other than float32 and float64)."""
  draw = _stateless_draw(initializer, shape)
  dtype = tf.as_dtype(dtype or keras.config.floatx())
  if draw is None or dtype not in _GROUP:
    return None
  from keras.src.backend.tensorflow.random import _cast_seed
  from keras.src.random.seed_generator import draw_seed
  kind, a, b = draw
  width = 1
  for size in shape[1:]:
    width *= int(size)
  group = _GROUP[dtype]
  groups, drop = divmod(start * width, group)
  step = group * _TRUNCATED_SKIP if kind == "truncated_normal" else 1
  return _draw_rows(_cast_seed(draw_seed(initializer.seed)), kind=kind,
                    advance=groups * step, count=rows * width + drop,
                    drop=drop, a=a, b=b, dtype=dtype,
                    part_shape=(rows, *shape[1:]))


_DRAWS = {"uniform": tf.raw_ops.StatelessRandomUniformV2,
          "normal": tf.raw_ops.StatelessRandomNormalV2,
          "truncated_normal": tf.raw_ops.StatelessTruncatedNormalV2}


@tf.function(autograph=False)
def _draw_rows(seed, kind, advance, count, drop, a, b, dtype, part_shape):
  # One graph, the seed an argument: no constant folding of the draw, and
  # its scaling updates the draw's own buffer.
  key, counter, alg = tf.raw_ops.StatelessRandomGetKeyCounterAlg(seed=seed)
  step = tf.constant(advance, tf.uint64)
  low = counter[0] + step   # the counter's low 64 bits; carry into the high
  counter = tf.stack([low, counter[1] + tf.cast(low < step, tf.uint64)])
  rnd = _DRAWS[kind](shape=[count], key=key, counter=counter, alg=alg,
                     dtype=dtype)
  rnd = tf.reshape(rnd[drop:] if drop else rnd, part_shape)
  # As tf.random.stateless_uniform / stateless_normal scale their draw.
  if kind == "uniform":
    low_value, high_value = tf.cast(a, dtype), tf.cast(b, dtype)
    return tf.add(rnd * (high_value - low_value), low_value)
  return tf.add(rnd * tf.convert_to_tensor(b, dtype),
                tf.convert_to_tensor(a, dtype))


def _initialize_where_placed(self, initializer):
  # Keras' own (backend/tensorflow/core.py) hands tf.Variable a callable
  # without a shape: ParameterServerStrategy then calls it on the
  # coordinator and ships the whole value to the ps tasks.
  self._value = tf.Variable(
      _part_of(initializer, self._shape, self._dtype), shape=self._shape,
      dtype=tf.as_dtype(self._dtype), trainable=self.trainable,
      name=self.name, aggregation=self._map_aggregation(self.aggregation),
      synchronization=self._map_synchronization(self.synchronization))


def make_variables_on_the_ps(strategy) -> None:
  """Under ParameterServerStrategy `strategy`: (1) a Keras variable's
  initial value is computed on the ps task that holds it, shard by shard,
  never on the coordinator; (2) a slot of a sharded variable (an optimizer
  slot: Keras creates it colocated with its variable, which TF never
  shards) is sharded like it, shard i next to the variable's shard i."""
  from keras.src.backend.tensorflow import core as tf_core
  tf_core.Variable._initialize_with_initializer = _initialize_where_placed
  extended = strategy.extended
  colocate = extended.colocate_vars_with

  def colocate_vars_with(variable):
    if isinstance(variable, _SHARDED):
      return tf.variable_creator_scope(_sharded_like(variable))
    return colocate(variable)

  extended.colocate_vars_with = colocate_vars_with


def _sharded_like(reference):
  """A variable creator: a variable of `reference`'s shape becomes a
  ShardedVariable split as `reference` is, each part colocated with
  `reference`'s part (any other shape: colocated with its first part)."""
  shards = reference.variables

  def creator(next_creator, **kwargs):
    shape = kwargs.get("shape")
    initial = kwargs["initial_value"]
    if shape is None or tuple(shape) != tuple(reference.shape):
      return next_creator(**{**kwargs, "colocate_with": shards[0]})
    name = kwargs.get("name")
    parts, start = [], 0
    for i, shard in enumerate(shards):
      rows = int(shard.shape[0])
      part_shape = (rows, *shape[1:])
      offset = (start, *[0] * (len(shape) - 1))

      def value(part_shape=part_shape, offset=offset, start=start, rows=rows):
        try:
          return initial(partition_shape=part_shape, partition_offset=offset)
        except TypeError:   # a callable without partition arguments
          return tf.convert_to_tensor(initial())[start:start + rows]

      parts.append(next_creator(**{
          **kwargs, "initial_value": value, "shape": part_shape,
          "colocate_with": shard,
          "name": None if name is None else f"{name}/part_{i}"}))
      start += rows
    return _SHARDED(parts)

  return creator


Released = collections.namedtuple("Released", "variable key slice_spec")


def release_for_restore(checkpoint, path: str, min_bytes: int = 1 << 20,
                        released: list | None = None) -> list:
  """Before `checkpoint` restores `path`: empties every variable of at
  least `min_bytes` whose key `path` holds (its value becomes a 0-row
  tensor), so that the restored value never coexists with the one it
  replaces: TF reads all of a task's tensors before it assigns them, so
  a process would otherwise hold both for all its variables at once.
  Plain variables (the default strategy) and the shards of a sharded one
  (each on its ps); not a mirrored variable's copies. Returns them as
  Released (variable, its key, its slice of the key), for
  restore_released, skipping and check_restored. The saver's own
  serialization (`_gather_serialized_tensors`; legacy saveables, as a
  ShardedVariable's shards, are kept in
  `SaveableCompatibilityConverter._saveables`) names each variable's key.
  `released`: the list to append to, as each is emptied (should a later
  one fail). A variable whose saved shape or dtype differs is left to the
  Checkpoint, whose error names it."""
  serialized = checkpoint._saver._gather_serialized_tensors(None)[0]
  reader = None
  released = [] if released is None else released
  for key, slice_spec, variable in _restored_variables(serialized):
    if (not variable.shape.rank or not variable.shape.is_fully_defined()
        or variable.shape.num_elements() * variable.dtype.size < min_bytes):
      continue
    if reader is None:
      reader = tf.train.load_checkpoint(path)
      shapes = reader.get_variable_to_shape_map()
      dtypes = reader.get_variable_to_dtype_map()
    # One that does not fit (another model) is left to the Checkpoint,
    # whose error names it.
    full_shape = ([int(n) for n in slice_spec.split()[:-1]] if slice_spec
                  else variable.shape.as_list())
    if shapes.get(key) != full_shape or dtypes.get(key) != variable.dtype:
      continue
    with tf.device(variable.device):
      tf.raw_ops.AssignVariableOp(
          resource=variable.handle, validate_shape=False,
          value=tf.zeros([0, *variable.shape[1:]], variable.dtype))
    released.append(Released(variable, key, slice_spec))
  return released


def _restored_variables(serialized):
  """(checkpoint key, slice spec, tf.Variable) of each plain variable and
  each shard of a sharded one in a checkpoint's serialization."""
  from tensorflow.python.ops import resource_variable_ops
  from tensorflow.python.training.saving import saveable_object_util
  # One resource each (a mirrored variable is not one: its copies).
  plain = resource_variable_ops.BaseResourceVariable
  for holder, tensors in serialized.items():
    for saveable in getattr(holder, "_saveables", None) or ():
      if (isinstance(saveable, saveable_object_util.ResourceVariableSaveable)
          and isinstance(saveable.op, plain)):
        yield saveable.name, saveable.specs[0].slice_spec, saveable.op
    variable = holder.value if isinstance(holder, keras.Variable) else holder
    if isinstance(variable, plain) and len(tensors) == 1:
      key, = tensors
      if not isinstance(tensors[key], dict):   # one value, not slices
        yield key, "", variable


def restore_released(released, path: str) -> None:
  """Reads what `path` holds for each released variable, where it lives
  (its ps, for a shard), and assigns it, one variable at a time: a damaged
  file fails here (TF checks each entry's checksum as it reads), and no
  process holds more than one such value beside the variables. Why not
  let the Checkpoint do it: `tf.train.Checkpoint.restore` reads every
  tensor of a task at once and keeps them all until its last assignment,
  and a variable a sparse op has touched (an Embedding looked up once, as
  a model built by calling it on a batch is) is in TF's copy-on-read mode,
  in which an assignment copies the value into a new buffer instead of
  taking it: one more table in memory at the restore's peak (measured:
  a 2,000,000 x 32 table resumed at 1.38x its weights + slots). Here the
  read is dropped after its assignment, and the next read reuses it.
  Then the Checkpoint restores the rest under `skipping(released)`."""
  for variable, key, slice_spec in released:
    with tf.device(variable.device):
      value, = tf.raw_ops.RestoreV2(prefix=path, tensor_names=[key],
                                    shape_and_slices=[slice_spec],
                                    dtypes=[variable.dtype])
      tf.raw_ops.AssignVariableOp(resource=variable.handle, value=value,
                                  validate_shape=False)
      del value
      # Waits for both (a ps runs remote ops asynchronously): one value
      # in flight at a time.
      int(tf.raw_ops.VariableShape(input=variable.handle)[0])


@contextlib.contextmanager
def skipping(released):
  """Inside, a `tf.train.Checkpoint.restore` reads and assigns everything
  but the released variables (restore_released did those). TF's saver
  reads each task's tensors with the private
  `functional_saver._single_shard_restore(prefix, shardable_tensors,
  options)`; the ones named by a released (key, slice) are left out of
  its list, so their restore functions never run. Process-wide while
  inside: only the thread that restores may save or restore meanwhile."""
  from tensorflow.python.checkpoint import functional_saver
  skip = {(r.key, r.slice_spec) for r in released}
  original = functional_saver._single_shard_restore
  if not skip:
    yield
    return

  def kept_only(file_prefix, shardable_tensors, options=None):
    kept = [t for t in shardable_tensors
            if (t.checkpoint_key, t.slice_spec) not in skip]
    return original(file_prefix, kept, options) if kept else {}

  functional_saver._single_shard_restore = kept_only
  try:
    yield
  finally:
    functional_saver._single_shard_restore = original


def check_restored(released) -> None:
  """Every variable release_for_restore emptied holds its rows again."""
  for variable, _, _ in released:
    with tf.device(variable.device):
      rows = int(tf.raw_ops.VariableShape(input=variable.handle)[0])
    if rows != variable.shape[0]:
      raise RuntimeError(
          f"restoring {variable.name} left it with {rows} of its "
          f"{variable.shape[0]} rows; its old value was released for the "
          "restore: start the run again")


def shard_rows(variable) -> list:
  """[(device, rows)] of a sharded variable's shards, in row order."""
  return [(shard.device, int(shard.shape[0]))
          for shard in variable.value.variables]


@contextlib.contextmanager
def fresh_layer_names():
  """Inside, Keras names new layers as a new process does ("dense",
  "dense_1", ...; its counters are the private `object_name_uids`), so a
  model built twice gets the same weight names. On exit every counter is
  the larger of the two: layers made later never repeat a name."""
  from keras.src.backend.common import global_state
  key = "object_name_uids"
  before = global_state.get_global_attribute(
      key, default=collections.defaultdict(int), set_to_default=True)
  fresh = collections.defaultdict(int)
  global_state.set_global_attribute(key, fresh)
  try:
    yield
  finally:
    for name, count in fresh.items():
      before[name] = max(before[name], count)
    global_state.set_global_attribute(key, before)


@plain
def index_shuffle(index, seeds, max_index):
  """tf.random.experimental.index_shuffle for a batch: one [3] seed per
  index. The raw op, because the Python wrapper mis-pads batched [n, 2]
  seeds in TF 2.21."""
  return tf.raw_ops.RandomIndexShuffle(index=index, seed=seeds,
                                       max_index=max_index, rounds=4)


def scatter_add(variable, indices, updates):
  """variable[indices] += updates as one op on the variable's handle: on a
  ps-hosted variable inside a scheduled function it is atomic on the ps
  (Keras' Variable has no scatter_add; tf.Variable's wrapper reads first)."""
  return tf.raw_ops.ResourceScatterAdd(resource=variable.handle,
                                       indices=indices, updates=updates)


def is_ps_unavailable(error) -> bool:
  """The ClusterCoordinator's own 'a parameter server is gone' error (a
  private class of tensorflow.python.distribute.coordinator)."""
  return type(error).__name__ == "PSUnavailableError"


class SlurmResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
  """SlurmClusterResolver that also works without GPUs.

  TF 2.21's cluster_spec() gives each task of a node one GPU slot
  (range(0, gpus_per_node, gpus_per_task)): with 0 GPUs that is range(0, 0, 0),
  a ValueError. CPU hosts are built with one fake slot per task instead (and
  auto_set_gpu=False), and report no accelerators, so that the strategy
  places its replica on the CPU.
  """

  def __init__(self, cpu_only: bool, **kwargs):
    self._cpu_only = cpu_only
    super().__init__(**kwargs)

  def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
    if self._cpu_only:
      return {}
    return super().num_accelerators(task_type, task_id, config_proto)


def all_gather_by_sum(context, value, axis: int):
  """all_gather as an all-reduce: each replica puts its rows in its own
  block of zeros, the SUM is every replica's rows in replica order. Used
  under multi-worker, where TF 2.21's ReplicaContext.all_gather fails at
  trace time ("ValueError: destinations can not be empty"). Exact (one
  non-zero term per element) and differentiable (the all-reduce's
  gradient is an all-reduce). Needs the same shape on every replica,
  which the step has (global batch divisible by the replicas)."""
  value = tf.convert_to_tensor(value)
  replicas = context.num_replicas_in_sync
  mine = tf.one_hot(context.replica_id_in_sync_group, replicas,
                    dtype=value.dtype)
  mine = tf.reshape(mine, [replicas] + [1] * value.shape.rank)
  summed = context.all_reduce(tf.distribute.ReduceOp.SUM,
                              mine * value[None])
  return tf.concat(tf.unstack(summed, num=replicas), axis=axis)


class CheckpointSnapshot:
  """The values of a tf.train.Checkpoint at one moment, writable later
  from any thread (trainer.checkpoint's background write).

  Built from the saver's own serialization (`TrackableSaver.
  _gather_serialized_tensors`: the object graph and every key, exactly as
  `Checkpoint.write` would lay them out), with every value READ NOW into
  the memory of the host holding it (`SaveSpec.tensor` runs the variable's
  read closure; an accelerator's value is copied to its task's CPU, a
  parameter server's stays there); written by `functional_saver.MultiDeviceSaver`. A read tensor
  is a snapshot: TF's variable updates copy a buffer that a live tensor
  still refers to (copy-on-write), so the next update cannot change it.
  """

  def __init__(self, checkpoint):
    from tensorflow.python.training.saving import saveable_object
    # This thread's default device (a cluster task's CPU under a
    # coordinator): a new thread would start from localhost instead.
    self._device = tf.constant(0).device
    serialized, _, registered, _ = (
        checkpoint._saver._gather_serialized_tensors(None))
    if registered:
      # A registered saver reads its objects when it writes, not now.
      raise NotImplementedError(
          "objects with their own registered checkpoint savers: "
          + ", ".join(sorted(registered)))
    self.nbytes = 0
    for obj, by_key in serialized.items():   # an identity dict: kept
      serialized[obj] = {
          key: self._read(value, saveable_object) if not isinstance(
              value, dict) else {
                  spec: self._read(v, saveable_object)
                  for spec, v in value.items()}
          for key, value in by_key.items()}
    self._tensors = serialized

  def _read(self, value, saveable_object):
    if isinstance(value, saveable_object.SaveSpec):
      tensor = value.tensor
      if tensor is None:    # an uninitialized variable: not saved
        return value
      tensor = self._host(tensor)
      return saveable_object.SaveSpec(tensor, value.slice_spec, value.name,
                                      dtype=value.dtype, device=value.device)
    return self._host(value)

  def _host(self, tensor):
    """The value in the memory of the host holding it: a device's copied to
    its own task's CPU (a parameter server's stays on that server)."""
    if isinstance(tensor, tf.Variable):
      tensor = tensor.read_value()
    spec = tf.DeviceSpec.from_string(tensor.device or "")
    if spec.device_type not in (None, "CPU"):
      with tf.device(spec.replace(device_type="CPU",
                                  device_index=0).to_string()):
        tensor = tf.identity(tensor)
    self.nbytes += tensor.dtype.size * max(tensor.shape.num_elements() or 0,
                                           1)
    return tensor

  def write(self, prefix: str) -> None:
    """Writes the checkpoint files `prefix`.index and `prefix`.data-*,
    readable by `tf.train.Checkpoint.restore(prefix)`."""
    from tensorflow.python.checkpoint import functional_saver
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with tf.device(self._device):
      functional_saver.MultiDeviceSaver(self._tensors).save(prefix)


def read_int(variable) -> int:
  """int(variable) from any thread; on failure (its ps is gone) the error
  is also cleared from the thread's eager executor, else the executor
  raises it again when Python deletes its wrapper ("Exception ignored in
  Executor.__del__", a traceback in the log of a run that stops cleanly).
  Private: tensorflow.python.eager.context's executor and clear_error."""
  try:
    return int(variable.numpy())
  except tf.errors.OpError:
    from tensorflow.python.eager import context
    context.context().executor.clear_error()
    raise


def set_op_determinism(on: bool) -> None:
  """TF op determinism exactly as this run asks: on, or off again when an
  earlier run in this process turned it on (it is process-wide, and with it
  on the input-wait probe's Timestamp op fails). TF has no public switch
  off: tensorflow.python.framework.config.disable_op_determinism."""
  from tensorflow.python.framework import config as tf_config
  if on:
    tf.config.experimental.enable_op_determinism()
  elif tf_config.is_op_determinism_enabled():
    tf_config.disable_op_determinism()
