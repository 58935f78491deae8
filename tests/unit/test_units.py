"""Fast in-process checks of the pure pieces and of tracing."""

import math

import numpy as np
import pytest
import tensorflow as tf

from trainer import optim
from trainer.config import Config
from trainer.data import pipeline, splits
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(300)


def test_example_stream_is_a_fresh_permutation_each_epoch():
  n = 97
  positions = tf.range(3 * n, dtype=tf.int64)
  idx = pipeline.example_indices(positions, n, seed=5).numpy()
  epochs = idx.reshape(3, n)
  for epoch in epochs:
    assert sorted(epoch) == list(range(n))          # every example once
  assert not np.array_equal(epochs[0], epochs[1])   # reshuffled per epoch
  again = pipeline.example_indices(positions, n, seed=5).numpy()
  assert np.array_equal(idx, again)                 # a pure function
  other = pipeline.example_indices(positions, n, seed=6).numpy()
  assert not np.array_equal(idx, other)


def test_stream_started_midway_continues_the_same_sequence():
  from trainer.task import ClassificationTask
  import layers
  task = ClassificationTask(Config(), layers.get("cnn"))
  full = pipeline.train_dataset(task, "train", 32, seed=1, start_position=0)
  late = pipeline.train_dataset(task, "train", 32, seed=1,
                                start_position=5 * 32)
  batches = list(full.take(8).as_numpy_iterator())[5:]
  resumed = list(late.take(3).as_numpy_iterator())
  for a, b in zip(batches, resumed):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2]["pos"], b[2]["pos"])


def test_training_streams_are_endless_for_tf_distribute():
  """A finite (even 2**62-long) stream makes multi-worker iterators
  all-reduce a has-data flag on every batch (get_next_as_optional): the
  training streams must have INFINITE cardinality."""
  from trainer.task import ClassificationTask
  import layers
  task = ClassificationTask(Config(), layers.get("cnn"))
  whole = pipeline.train_dataset(task, "train", 32, seed=1, start_position=64)
  share = pipeline.worker_train_dataset(
      task, "train", 32, seed=1, start_position=64, num_replicas=2,
      first_replica=1, local_replicas=1)
  for ds in (whole, share):
    assert ds.cardinality().numpy() == tf.data.INFINITE_CARDINALITY
  # Worker 1's rows of the global batch starting at 64: positions 80..95.
  rows = next(iter(share))[2]["pos"].numpy()
  np.testing.assert_array_equal(rows, np.arange(80, 96))

  def custom(limit):
    def make(batch_size, seed, start_position):
      del seed
      positions = tf.data.Dataset.range(start_position, limit)
      return positions.batch(batch_size, drop_remainder=True).map(
          lambda p: (tf.cast(p, tf.float32)[:, None], p % 2))
    return pipeline._custom_train_dataset(make, 4, 0, 8)  # noqa: SLF001
  huge = custom(2 ** 62)   # finite by tf.data's count, endless in practice
  assert huge.cardinality().numpy() == tf.data.INFINITE_CARDINALITY
  np.testing.assert_array_equal(next(iter(huge))[2]["pos"].numpy(),
                                [8, 9, 10, 11])
  with pytest.raises(tf.errors.FailedPreconditionError, match="infinite"):
    list(custom(16).take(5))   # a stream that ends is an error, not reused


def test_batches_loaded_in_groups_equal_batches_made_one_by_one():
  """In-memory sources load several global batches per map call (one
  gather), preprocessing each batch on its own: the stream must equal
  batches built one at a time, eagerly, outside tf.data, including the
  per-batch augmentation draws, from a start inside a group."""
  from trainer.task import ClassificationTask
  import layers
  config = Config(dataset="synthetic", synthetic_shape="12,12,3",
                  augment=True, global_batch_size=24)
  task = ClassificationTask(config, layers.get("cnn"))
  source = task.source("train")
  one = pipeline.train_dataset(task, "train", 24, seed=3, start_position=0)
  assert pipeline.batches_per_call(source, 24, one.element_spec) == 4
  start = 77
  got = list(pipeline.train_dataset(task, "train", 24, seed=3,
                                    start_position=start).take(25))
  for b, (features, labels, meta) in enumerate(got):
    positions = start + 24 * b + tf.range(24, dtype=tf.int64)
    want_f, want_l = source.gather(pipeline.example_indices(
        positions, source.num_examples, 3))
    want_meta = {"pos": positions, "start": tf.fill([24], positions[0]),
                 "weight": tf.ones([24]), "skipped": tf.zeros([24])}
    want_f, want_l = task.preprocess(want_f, want_l, want_meta, True)
    np.testing.assert_array_equal(features.numpy(), want_f.numpy())
    np.testing.assert_array_equal(labels.numpy(), want_l.numpy())
    for key, value in want_meta.items():
      np.testing.assert_array_equal(meta[key].numpy(), value.numpy())


def test_batches_per_call_only_groups_small_dense_batches_held_in_memory():
  import dataclasses
  from trainer.data.readers import images
  from trainer.data.source import array_source
  source = array_source("small", np.zeros([10, 8, 8, 1], np.uint8),
                        np.zeros([10], np.int32))
  assert source.in_memory

  def batch(size, row_shape=(8, 8, 1), dtype=tf.float32, features=None):
    meta = {"pos": tf.TensorSpec([size], tf.int64)}
    return (features or tf.TensorSpec([size, *row_shape], dtype),
            tf.TensorSpec([size], tf.int32), meta)

  calls = pipeline.batches_per_call
  # At most 4 batches and 256 rows a call.
  assert [calls(source, b, batch(b)) for b in (16, 64, 100, 256)] == [4, 4, 2,
                                                                      1]
  # Each batch at most 128 KiB as the map gives it: 28x28 float32 rows.
  assert calls(source, 32, batch(32, (28, 28, 1))) == 4      # 100 KB
  assert calls(source, 64, batch(64, (28, 28, 1))) == 1      # 200 KB
  # Only dense tensors of static shape stack; strings are yet to decode.
  assert calls(source, 32, batch(32, (None, 3))) == 1
  assert calls(source, 32, batch(32, (), tf.string)) == 1
  sparse = tf.SparseTensorSpec([32, 10], tf.float32)
  assert calls(source, 32, batch(32, features=sparse)) == 1
  # A gather that reads or decodes: one batch a call.
  decoded = images.decoding_source(
      array_source("png", np.array([b"x", b"y"], object),
                   np.zeros([2], np.int32)), (8, 8, 1), from_paths=False)
  assert not decoded.in_memory and calls(decoded, 32, batch(32)) == 1
  own = dataclasses.replace(source, gather=lambda i: source.gather(i))
  assert not own.in_memory and calls(own, 32, batch(32)) == 1


def test_eval_dataset_pads_with_zero_weight():
  from trainer.task import ClassificationTask
  import layers
  task = ClassificationTask(Config(), layers.get("cnn"))
  ds, batches, examples = pipeline.eval_dataset(task, "test", 64)
  assert examples == 297 and batches == 5
  weights = np.concatenate([b[2]["weight"] for b in ds.as_numpy_iterator()])
  assert weights.shape == (320,) and weights.sum() == 297
  assert np.all(weights[:297] == 1) and np.all(weights[297:] == 0)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule_matches_formula(schedule):
  config = Config(learning_rate=0.1, warmup_steps=10, train_steps=110,
                  lr_schedule=schedule)
  for step in (0, 4, 9, 10, 35, 60, 109, 200):
    warm = min(1.0, (step + 1) / 10)
    if schedule == "cosine":
      progress = min(max((step - 10) / 100, 0.0), 1.0)
      expected = 0.1 * warm * 0.5 * (1 + math.cos(math.pi * progress))
    else:
      expected = 0.1 * warm
    assert float(optim.learning_rate_at(step, config)) == pytest.approx(
        expected, rel=1e-5, abs=1e-7)  # float32 maths


@pytest.mark.parametrize("wait_steps, traces", [(0, 1), (3, 2)])
def test_train_loop_does_not_retrace_when_chunk_size_changes(
    tmp_path, wait_steps, traces):
  """Chunks of 7, 7, 6 (and the probe's cuts) reuse one trace; the input
  wait probe adds exactly one (timed) trace of its own."""
  from trainer import controller
  config = Config(train_steps=20, steps_per_loop=7, summary_every=10,
                  checkpoint_every=100, eval_every=0, mode="train",
                  global_batch_size=16, input_wait_steps=wait_steps,
                  model_dir=str(tmp_path / "run"))
  runner = controller.create(config)
  runner.train(evaluate=False)
  assert runner.global_step == 20
  # The per-chunk guard's loop runs every chunk; the per-update one only
  # replays a chunk with a non-finite update (none here).
  assert runner.steps.unguarded_chunk.experimental_get_tracing_count() == traces
  assert runner.steps.guarded_loop.experimental_get_tracing_count() == 0


class _OnDemand:
  """The chunk's iterator, fetched on demand (as the input-wait probe's)."""
  fetch_ahead = False

  def __init__(self, iterator):
    self.iterator = iterator

  def __iter__(self):
    return self

  def __next__(self):
    return next(self.iterator)


@pytest.mark.parametrize("accum", [1, 2])
def test_chunk_fetches_ahead_but_stops_at_its_last_update(tmp_path, accum):
  """The chunk dequeues each micro-batch while the one before it runs, but
  nothing past its last update (one-update chunks too): the iterator's next
  batch is the next update's first, and the weights are those of the same
  chunks fetching each batch when its micro-step starts."""
  from trainer import controller

  def run(name, wrap):
    config = Config(train_steps=20, global_batch_size=16, mode="train",
                    grad_accum_steps=accum, model_dir=str(tmp_path / name))
    runner = controller.create(config)
    assert runner.steps.fetch_ahead
    iterator = runner.executor.train_iterator()
    for todo in (3, 1, 2):
      assert bool(runner.steps.unguarded_chunk(wrap(iterator),
                                               tf.constant(todo, tf.int64)))
    assert int(runner.state.position.numpy()) == 6 * 16
    _, _, meta = next(iterator)
    np.testing.assert_array_equal(meta["pos"].numpy(),
                                  96 + np.arange(16 // accum))
    return [v.numpy() for v in runner.model.weights]

  ahead = run("ahead", lambda it: it)
  for a, b in zip(ahead, run("on_demand", _OnDemand)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spec, sizes, expected", [
    ("train", {"train": 10}, [("train", list(range(10)))]),
    ("test[:3]", {"test": 10}, [("test", [0, 1, 2])]),
    ("train[80%:]", {"train": 10}, [("train", [8, 9])]),
    ("train[-2:]+test[:1]", {"train": 5, "test": 4},
     [("train", [3, 4]), ("test", [0])]),
])
def test_split_strings(spec, sizes, expected):
  got = [(name, list(idx)) for name, idx in splits.select(spec, sizes)]
  assert got == expected


@pytest.mark.parametrize("spec", ["train[", "train[a:b]", "val", "train[5:5]"])
def test_bad_split_strings(spec):
  with pytest.raises(ValueError):
    splits.select(spec, {"train": 10})


def test_validation_names_flag_value_and_rule():
  from trainer.config import check_divisible, validate
  with pytest.raises(UserError, match=r"--grad_accum_steps \(4\)"):
    validate(Config(global_batch_size=30, grad_accum_steps=4))
  with pytest.raises(UserError, match=r"4 x 2 = 8"):
    check_divisible(Config(global_batch_size=36, grad_accum_steps=2), 4)
  with pytest.raises(UserError, match="--cpu_replicas=2 needs"):
    validate(Config(cpu_replicas=2))
