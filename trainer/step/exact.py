"""Sums that do not depend on who adds what: the --deterministic=topology
reduction.

Each virtual shard's gradient (and loss, metric sums, weight totals) is a
float32 tensor computed alike on every topology; what differs between
topologies is only which replica holds which shard and in which order the
shards meet. Float addition is not associative, so any float sum of the
shards (all_reduce, accumulation) depends on that. Here each tensor is
rounded onto one fixed-point grid that depends only on the largest |value|
over ALL shards (a maximum, which no order changes), summed as int64
(associative and exact: no overflow by construction), and turned back into
float32 once. The result is a function of the set of shards alone.

The grid: with M the largest |value| of a tensor over every shard and
2^(E-1) <= M < 2^E, a value x becomes round(x * 2^(P-E)) with
P = 62 - ceil(log2 V): every |q| <= 2^P, so V of them sum below 2^62. The
step of the grid is M x 2^-(P-1) at most (2^-58 x M for 16 shards),
finer than float32's own rounding of any value within 2^34 of M; values
smaller than half a step count as 0 (documented in docs/reliability.md).
A NaN or Inf in any shard makes the whole tensor NaN (the update's finite
check then drops it).

Why this and not a fixed pairwise tree over gathered shards (the other
design): it needs one int64 all-reduce of the summed grid values (2x the
bytes of today's float32 all-reduce) and a gather of one float per tensor,
where a tree needs every replica to receive all V shards (V x the bytes),
and its exactness holds whatever shards a replica holds, in any order,
with no bookkeeping of shard indices. Both keep each replica's shards
until the update's maximum is known (V / replicas copies under
accumulation).
"""

import math

import tensorflow as tf

from trainer import compat

_SUM = tf.distribute.ReduceOp.SUM


def grid_bits(shards: int) -> int:
  """P: |grid value| <= 2^P, so that `shards` of them sum below 2^62."""
  return 62 - math.ceil(math.log2(shards)) if shards > 1 else 62


def _power_of_two(exponent):
  """2^exponent as float64, exactly (int32 exponent in [-1022, 1023])."""
  biased = tf.cast(exponent, tf.int64) + 1023
  return tf.bitcast(tf.bitwise.left_shift(biased, 52), tf.float64)


def _exponent_above(m):
  """E with m < 2^E (m >= 0 float32; 0 and subnormals: -126)."""
  bits = tf.bitcast(m, tf.int32)
  biased = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 23), 0xFF)
  return tf.maximum(biased - 126, -126)


@tf.autograph.experimental.do_not_convert   # no control flow on tensors
def local_maxima(stacked: list) -> tf.Tensor:
  """float32 [n]: max |x| of each [local shards, ...] tensor, +Inf where it
  holds a NaN or Inf."""
  out = []
  for t in stacked:
    t = tf.cast(t, tf.float32)
    finite = tf.reduce_all(tf.math.is_finite(t))
    top = tf.reduce_max(tf.abs(t)) if t.shape.num_elements() else 0.0
    out.append(tf.where(finite, top, float("inf")))
  return tf.stack(out)


@tf.autograph.experimental.do_not_convert
def global_maxima(local, all_gather_kind: str) -> tf.Tensor:
  """The element-wise maximum of `local` over every replica (replica
  context)."""
  context = tf.distribute.get_replica_context()
  row = local[tf.newaxis]
  if all_gather_kind == "by_sum":
    gathered = compat.all_gather_by_sum(context, row, 0)
  else:
    gathered = context.all_gather(row, 0)
  return tf.reduce_max(gathered, axis=0)


@tf.autograph.experimental.do_not_convert
def exact_sum(stacked: list, shards: int, all_gather_kind: str) -> list:
  """Each float32 [local shards, *shape] tensor of `stacked` summed over
  its first axis and over every replica (replica context): float32
  [*shape], bit-identical whichever replica held which shards."""
  bits = grid_bits(shards)
  maxima = global_maxima(local_maxima(stacked), all_gather_kind)
  quantised, exponents = [], []
  for i, t in enumerate(stacked):
    m = maxima[i]
    e = _exponent_above(tf.where(tf.math.is_finite(m), m, 0.0))
    x = tf.cast(t, tf.float64) * _power_of_two(bits - e)
    q = tf.cast(tf.round(x), tf.int64)
    quantised.append(tf.reduce_sum(q, axis=0))
    exponents.append(e)
  context = tf.distribute.get_replica_context()
  summed = context.all_reduce(_SUM, quantised)
  out = []
  for i, q in enumerate(summed):
    value = tf.cast(tf.cast(q, tf.float64) * _power_of_two(exponents[i] - bits),
                    tf.float32)
    out.append(tf.where(tf.math.is_finite(maxima[i]), value,
                        tf.fill(tf.shape(value), float("nan"))))
  return out
