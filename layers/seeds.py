"""Per-example random seeds for layers, set by the train step.

Why: dropout masks must not depend on how a global batch is split across
replicas or workers, nor on what ran before a restart. The step publishes
(run seed, first stream position of the global micro-batch, this replica's
row offset in it); a layer draws the mask for the WHOLE global micro-batch
from a stateless RNG and keeps its own rows. So 1 replica and 8 replicas,
and a resumed run, draw identical masks for every example.
"""

import contextlib
import dataclasses
import threading

import tensorflow as tf

_local = threading.local()   # MirroredStrategy runs each replica in a thread


@dataclasses.dataclass(frozen=True)
class ExampleSeeds:
  seed: tf.Tensor          # int64 [2]: (run seed, batch start position)
  offset: tf.Tensor        # int: this replica's first row in the global batch
  global_batch: int        # rows of the global micro-batch (static)


@contextlib.contextmanager
def scope(seeds: ExampleSeeds):
  """Makes `seeds` visible to layers called inside the `with` block."""
  previous = getattr(_local, "seeds", None)
  _local.seeds = seeds
  try:
    yield
  finally:
    _local.seeds = previous


def current() -> ExampleSeeds | None:
  return getattr(_local, "seeds", None)


def uniform_rows(salt: int, row_shape, local_rows, dtype=tf.float32):
  """U[0,1) of shape [local_rows, *row_shape], this replica's rows of a draw
  over the global micro-batch; None when no step published seeds."""
  seeds = current()
  if seeds is None:
    return None
  seed = tf.random.experimental.stateless_fold_in(seeds.seed, salt)
  full = tf.random.stateless_uniform([seeds.global_batch, *row_shape],
                                     seed=seed, dtype=dtype)
  offset = tf.cast(seeds.offset, tf.int32)
  return full[offset:offset + tf.cast(local_rows, tf.int32)]
