"""A dataset split as random-access examples: the unit every pipeline reads.

Random access by example index is what makes exact resume cheap: the order of
examples is a pure function of (seed, epoch), so repositioning after a restart
means skipping integers, never decoding the skipped examples.
"""

import dataclasses
from typing import Any, Callable

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Source:
  """One split of a dataset.

  Attributes:
    name: human-readable name, e.g. "mnist:test[:8000]".
    num_examples: number of examples in the split.
    gather: traceable function int64 indices [B] -> (features, labels), each a
      tensor (or nest of tensors) with leading dimension B. Called inside a
      tf.data map on whole batches, so it must be pure TF.
    feature_spec: tf.TensorSpec (or nest) of ONE example's features as
      `gather` returns them (before preprocessing), e.g. uint8 [28, 28, 1].
    label_spec: tf.TensorSpec (or nest) of one example's labels.
    num_classes: class count for classification sets, None otherwise.
    skipped: records dropped as corrupt while loading (with --skip_corrupt).
    decode_channels: 0 when `gather` returns pixel arrays; otherwise its
      features are encoded images (tf.string [B], any size, as stored) and
      this is the channel count the model gets (see trainer.data.resize).
    describe: example index -> where it comes from ("FILE" or "FILE record
      N"), to name a damaged example found when it is read; or None.
  The property `in_memory`: `gather` is array_source's own, which only
  looks rows up in arrays held in memory (no read, no decode, nothing that
  can fail): the training pipeline may then load several batches per map
  call (pipeline.batches_per_call). A Source copied with another gather
  (dataclasses.replace) is not in memory.
  """
  name: str
  num_examples: int
  gather: Callable[[tf.Tensor], Any]
  feature_spec: Any
  label_spec: Any
  num_classes: int | None = None
  skipped: int = 0
  decode_channels: int = 0
  describe: Callable[[int], str] | None = None

  @property
  def in_memory(self) -> bool:
    return getattr(self.gather, "looks_up_memory", False)


def _spec_of(array: np.ndarray) -> tf.TensorSpec:
  return tf.TensorSpec(array.shape[1:], tf.as_dtype(array.dtype))


def array_source(name: str, features, labels, num_classes: int | None = None,
                 skipped: int = 0) -> Source:
  """A Source over in-memory NumPy arrays (or nests of arrays).

  uint8 images stay uint8 here: casting to float happens in the pipeline's
  preprocessing map, after batching, where it is 4x cheaper to move.
  """
  flat = tf.nest.flatten(features) + tf.nest.flatten(labels)
  sizes = {int(a.shape[0]) for a in flat}
  if len(sizes) != 1:
    raise ValueError(f"{name}: features and labels disagree on the number of "
                     f"examples ({sorted(sizes)}).")
  for a in flat:
    if a.dtype == np.float64:
      raise ValueError(f"{name}: float64 arrays are not accepted; cast to "
                       "float32 (TF would otherwise compute in float64).")
  # Constants, not variables: they are captured once into the dataset graph.
  feats = tf.nest.map_structure(tf.constant, features)
  labs = tf.nest.map_structure(tf.constant, labels)

  @tf.autograph.experimental.do_not_convert   # pure TF: nothing to rewrite
  def gather(indices):
    take = lambda t: tf.gather(t, indices)
    return tf.nest.map_structure(take, feats), tf.nest.map_structure(take, labs)

  gather.looks_up_memory = True
  return Source(
      name=name,
      num_examples=sizes.pop(),
      gather=gather,
      feature_spec=tf.nest.map_structure(_spec_of, features),
      label_spec=tf.nest.map_structure(_spec_of, labels),
      num_classes=num_classes,
      skipped=skipped)


def host_source(name: str, items: np.ndarray, labels: np.ndarray,
                num_classes: int | None, fetch=None,
                fetch_labels: bool = False) -> Source:
  """A Source over host NumPy arrays looked up OUTSIDE the graph.

  array_source captures its arrays as graph constants: fine for decoded
  images that must be in memory anyway, but tracing and the graph then grow
  with N (measured: 5 s to trace a map over 32k paths). Here a batch's rows
  are picked by a numpy_function, so start-up does not depend on N.
  `items`: int64 keys or bytes (paths); `fetch(items of the batch) ->
  np.ndarray of bytes` turns them into the features (e.g. records by key),
  else the items themselves are the (string) features. `fetch_labels`:
  fetch returns (features, labels) of the batch instead (records that carry
  their labels); `labels` then only gives the count.
  """
  if len(items) != len(labels):
    raise ValueError(f"{name}: {len(items)} items but {len(labels)} labels.")
  labels = np.asarray(labels, np.int32)

  def pick(indices):
    rows = items[indices]
    if fetch_labels:
      rows, found = fetch(rows)
      return np.asarray(rows, dtype=object), np.asarray(found, np.int32)
    if fetch is not None:
      rows = fetch(rows)
    return np.asarray(rows, dtype=object), labels[indices]

  @tf.autograph.experimental.do_not_convert   # pure TF: nothing to rewrite
  def gather(indices):
    features, labs = tf.numpy_function(pick, [indices], (tf.string, tf.int32),
                                       stateful=False)
    return tf.ensure_shape(features, [None]), tf.ensure_shape(labs, [None])

  return Source(name=name, num_examples=len(labels), gather=gather,
                feature_spec=tf.TensorSpec([], tf.string),
                label_spec=tf.TensorSpec([], tf.int32),
                num_classes=num_classes)
