"""Sparse (row-wise, lazy) optimizer updates against a hand-written NumPy
loop over rows: a 20 x 4 table with repeated and duplicate indices beside a
dense variable, on one device, on a sharded table and under a 2-replica
MirroredStrategy."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
LR = 0.05
ROWS, DIM = 20, 4
# (table indices, dense-variable gradient seed) per update; row 3 appears
# twice in the first and three times in the third update; rows 1, 2, 4-6,
# 8-10, 12-18 are never touched.
STEPS = [[3, 7, 3, 11], [7, 0, 19], [3, 3, 3], [19, 11]]
UNTOUCHED = sorted(set(range(ROWS)) - {i for s in STEPS for i in s})
HYPER = {"adam": {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
         "adagrad": {"initial": 0.1, "epsilon": 1e-7},
         "momentum": {"momentum": 0.9, "nesterov": False},
         "nesterov": {"momentum": 0.9, "nesterov": True}}


def problem():
  rng = np.random.default_rng(0)
  # Weights away from 0: a relative tolerance of float32 maths is
  # meaningful only where the result does not cancel to near 0.
  table = rng.uniform(1.0, 2.0, size=(ROWS, DIM)).astype(np.float32)
  dense = rng.uniform(1.0, 2.0, size=(3,)).astype(np.float32)
  grads = [(np.array(s, np.int64),
            rng.normal(size=(len(s), DIM)).astype(np.float32),
            rng.normal(size=(3,)).astype(np.float32)) for s in STEPS]
  return table, dense, grads


def reference(kind, table, dense, grads):
  """Row by row in float64: each touched row (repeats summed) gets one
  update per step; the dense variable is one row touched every step."""
  h = HYPER[kind]
  params = [table.astype(np.float64), dense.astype(np.float64)[None]]
  init = h["initial"] if kind == "adagrad" else 0.0
  slots = [[np.full_like(p, init), np.zeros_like(p)] for p in params]
  for t, (indices, values, dense_grad) in enumerate(grads, start=1):
    table_rows = {}
    for i, row in zip(indices, values):
      table_rows[i] = table_rows.get(i, 0.0) + row.astype(np.float64)
    for p, s, rows in zip(params, slots, (table_rows, {0: dense_grad})):
      for i, g in rows.items():
        if kind == "adam":
          s[0][i] = h["beta_1"] * s[0][i] + (1 - h["beta_1"]) * g
          s[1][i] = h["beta_2"] * s[1][i] + (1 - h["beta_2"]) * g * g
          alpha = LR * np.sqrt(1 - h["beta_2"]**t) / (1 - h["beta_1"]**t)
          p[i] -= alpha * s[0][i] / (np.sqrt(s[1][i]) + h["epsilon"])
        elif kind == "adagrad":
          s[0][i] += g * g
          p[i] -= LR * g / np.sqrt(s[0][i] + h["epsilon"])
        else:
          s[0][i] = h["momentum"] * s[0][i] - LR * g
          p[i] += (h["momentum"] * s[0][i] - LR * g if h["nesterov"]
                   else s[0][i])
  return params[0], params[1][0], slots[0][0]


def make(kind):
  from trainer import optim
  if kind == "adam":
    return optim.LazyAdam(learning_rate=LR)
  if kind == "adagrad":
    return optim.Adagrad(learning_rate=LR)
  return optim.LazyMomentum(learning_rate=LR, momentum=0.9,
                            nesterov=kind == "nesterov")


def first_slot(optimizer, variable):
  from trainer import compat
  name = {"LazyAdam": "_momentums", "Adagrad": "_accumulators"}.get(
      type(optimizer).__name__.replace("PreReduced", ""), "momentums")
  return compat.slot(optimizer, name, variable.value).numpy()


def train(optimizer, table_var, dense_var, grads):
  import tensorflow as tf

  @tf.function
  def apply(indices, values, dense_grad):
    sparse = tf.IndexedSlices(values, indices, tf.constant([ROWS, DIM],
                                                           tf.int64))
    optimizer.apply([sparse, dense_grad], [table_var, dense_var])

  for indices, values, dense_grad in grads:
    apply(tf.constant(indices), tf.constant(values), tf.constant(dense_grad))


@pytest.mark.parametrize("kind", ["adam", "adagrad", "momentum", "nesterov"])
def test_rows_match_numpy_and_untouched_rows_keep_their_bits(kind):
  import keras
  from trainer import optim
  table, dense, grads = problem()
  table_var, dense_var = keras.Variable(table), keras.Variable(dense)
  optimizer = optim.prepare(make(kind), [table_var, dense_var])
  slot_before = first_slot(optimizer, table_var)
  train(optimizer, table_var, dense_var, grads)
  want_table, want_dense, want_slot = reference(kind, table, dense, grads)
  np.testing.assert_allclose(table_var.numpy(), want_table, rtol=1e-6)
  np.testing.assert_allclose(dense_var.numpy(), want_dense, rtol=1e-6)
  slot = first_slot(optimizer, table_var)
  np.testing.assert_allclose(slot, want_slot, rtol=1e-6, atol=1e-12)
  # Lazy: untouched rows, and their slots, are the very same bits.
  np.testing.assert_array_equal(table_var.numpy()[UNTOUCHED],
                                table[UNTOUCHED])
  np.testing.assert_array_equal(slot[UNTOUCHED], slot_before[UNTOUCHED])


@pytest.mark.parametrize("kind", ["adam", "adagrad", "momentum"])
def test_sharded_table_matches_numpy(kind):
  """The parameter-server path: the table is a ShardedVariable (three
  shards) read and written shard by shard."""
  import keras
  import tensorflow as tf
  from trainer import compat, optim
  table, dense, grads = problem()

  def creator(next_creator, **kwargs):
    value = tf.convert_to_tensor(kwargs["initial_value"])
    # "div" sharding, as the parameter-server partitioners split rows.
    parts = (value[:7], value[7:14], value[14:])
    return tf.__internal__.distribute.ShardedVariable([
        next_creator(**{**kwargs, "initial_value": p, "shape": None})
        for p in parts])

  with tf.variable_creator_scope(creator):
    table_var = keras.Variable(table)
  assert compat.is_sharded(table_var)
  dense_var = keras.Variable(dense)
  optimizer = optim.prepare(compat.with_sharded_updates(make(kind)),
                            [table_var, dense_var])
  train(optimizer, table_var, dense_var, grads)
  want_table, want_dense, _ = reference(kind, table, dense, grads)
  np.testing.assert_allclose(tf.convert_to_tensor(table_var), want_table,
                             rtol=1e-6)
  np.testing.assert_allclose(dense_var.numpy(), want_dense, rtol=1e-6)


def test_lazy_adam_on_dense_gradients_is_keras_adam():
  import keras
  from trainer import optim
  rng = np.random.default_rng(1)
  start = rng.uniform(1.0, 2.0, size=(5, 3)).astype(np.float32)
  grads = rng.normal(size=(3, 5, 3)).astype(np.float32)
  results = []
  for optimizer in (optim.LazyAdam(learning_rate=LR),
                    keras.optimizers.Adam(learning_rate=LR)):
    variable = keras.Variable(start)
    optimizer.build([variable])
    for g in grads:
      optimizer.apply([g], [variable])
    results.append(variable.numpy())
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def test_cli_names_build_the_sparse_optimizers():
  import tensorflow as tf
  from trainer import optim
  from trainer.config import Config
  step = tf.Variable(0, dtype=tf.int64)
  for name, cls in (("lazy_adam", optim.LazyAdam),
                    ("adagrad", optim.Adagrad),
                    ("lazy_momentum", optim.LazyMomentum)):
    optimizer = optim.from_flags(
        Config(optimizer=name, learning_rate=0.3, warmup_steps=0), step)
    assert type(optimizer) is cls
    assert abs(float(optimizer.learning_rate) - 0.3) < 1e-7
  assert optim.from_flags(Config(optimizer="lazy_momentum", momentum=0.5),
                          step).momentum == 0.5


def test_bad_arguments_name_the_fix():
  from trainer import optim
  with pytest.raises(ValueError, match="keras.optimizers.Adam"):
    optim.LazyAdam(amsgrad=True)
  with pytest.raises(ValueError, match="keras.optimizers.SGD"):
    optim.LazyMomentum(momentum=0.0)


_MIRRORED = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from tests.unit import test_sparse_optim as t
    from trainer import optim
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    table, dense, grads = t.problem()
    out = {}
    for kind in ("adam", "momentum"):
      with strategy.scope():
        table_var, dense_var = keras.Variable(table), keras.Variable(dense)
        optimizer = optim.prepare(t.make(kind), [table_var, dense_var])

      def replica(indices, values, dense_grad):
        # Each replica holds half of the looked-up rows (a repeated row may
        # land on both) and half of the dense gradient; the step reduces
        # once, keeping IndexedSlices, and applies in replica context.
        ctx = tf.distribute.get_replica_context()
        mine = ctx.replica_id_in_sync_group
        n = tf.shape(indices)[0]
        lo = (n * mine) // 2
        hi = (n * (mine + 1)) // 2
        sparse = tf.IndexedSlices(values[lo:hi], indices[lo:hi],
                                  tf.constant([t.ROWS, t.DIM], tf.int64))
        part = dense_grad / 2.0
        sparse, part = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                      [sparse, part])
        assert isinstance(sparse, tf.IndexedSlices), type(sparse)
        optimizer.apply_gradients([(sparse, table_var), (part, dense_var)])

      step = tf.function(lambda *a: strategy.run(replica, args=a))
      for indices, values, dense_grad in grads:
        step(tf.constant(indices), tf.constant(values),
             tf.constant(dense_grad))
      copies = [v.numpy().tolist() for v in table_var.value.values]
      out[kind] = {"table": copies, "dense": dense_var.numpy().tolist()}

    # layers.Embedding (mean combiner) + LazyAdam: the lookup's gradient is
    # IndexedSlices in each replica and after the reduction, and 2 replicas
    # with half the batch each give the one-device update.
    from layers import Embedding

    histories = tf.ragged.constant(
        [[3, 17, 3], [5], [], [2**40, -1], [17], [8, 9]], tf.int64)
    targets = tf.constant(np.linspace(-1, 1, 6 * 4).reshape(6, 4),
                          tf.float32)

    def make():
      keras.utils.set_random_seed(1)
      layer = Embedding(50, 4, combiner="mean")
      layer.build()
      return layer, optim.prepare(optim.LazyAdam(0.1),
                                  layer.trainable_variables)

    def loss_of(layer, ids, y):
      per_example = tf.reduce_sum(tf.square(layer(ids) - y), axis=1)
      return tf.nn.compute_average_loss(per_example, global_batch_size=6)

    # One device, the whole batch.
    single, opt = make()
    start = single.embeddings.numpy()
    for _ in range(3):
      with tf.GradientTape() as tape:
        loss = loss_of(single, histories, targets)
      opt.apply_gradients(zip(tape.gradient(loss, single.trainable_variables),
                              single.trainable_variables))

    with strategy.scope():
      layer, opt = make()
    np.testing.assert_array_equal(layer.embeddings.numpy(), start)

    def replica(ids, y):
      ctx = tf.distribute.get_replica_context()
      half = 3 * ctx.replica_id_in_sync_group
      with tf.GradientTape() as tape:
        loss = loss_of(layer, ids[half:half + 3], y[half:half + 3])
      grads = tape.gradient(loss, layer.trainable_variables)
      assert isinstance(grads[0], tf.IndexedSlices), type(grads[0])
      grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
      assert isinstance(grads[0], tf.IndexedSlices), type(grads[0])
      opt.apply_gradients(zip(grads, layer.trainable_variables))

    step = tf.function(lambda: strategy.run(replica, args=(histories,
                                                            targets)))
    for _ in range(3):
      step()
    want = single.embeddings.numpy()
    for copy in layer.embeddings.value.values:
      np.testing.assert_allclose(copy.numpy(), want, rtol=1e-6)
    touched = set(layer.rows(histories).flat_values.numpy().tolist())
    untouched = sorted(set(range(50)) - touched)
    np.testing.assert_array_equal(want[untouched], start[untouched])
    assert not np.array_equal(want, start)
    out["embedding_touched_rows"] = len(touched)
    print(json.dumps(out))
""")


def test_mirrored_two_replicas_match_numpy_and_embedding_stays_sparse():
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
         "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get(
             "PYTHONPATH", "")}
  done = subprocess.run([sys.executable, "-c", _MIRRORED, str(REPO)],
                        capture_output=True, text=True, env=env, timeout=100,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  # 7 distinct ids hashed into 50 rows: two share a row.
  assert out.pop("embedding_touched_rows") == 6
  table, dense, grads = problem()
  for kind, got in out.items():
    want_table, want_dense, _ = reference(kind, table, dense, grads)
    for copy in got["table"]:   # both replicas' copies
      np.testing.assert_allclose(copy, want_table, rtol=1e-6,
                                 err_msg=kind)
    np.testing.assert_allclose(got["dense"], want_dense, rtol=1e-6,
                               err_msg=kind)


def test_lazy_momentum_flag_without_momentum_is_a_user_error():
  import tensorflow as tf
  from trainer import optim
  from trainer.config import Config
  from trainer.errors import UserError
  with pytest.raises(UserError, match="--optimizer=sgd"):
    optim.from_flags(Config(optimizer="lazy_momentum", momentum=0.0),
                     tf.Variable(0, dtype=tf.int64))
