"""Serving signatures: named, typed inputs and outputs of an exported model.

A `Signature` is what `Task.serving_signature` returns (trainer.export
writes it as `serving_default`) and what each entry of
`Task.serving_signatures` is (written under its name). The defaults here:
- inputs: one per feature tensor of the model's input (after
  Task.preprocess), named by its key for a dict of features, `input_<i>`
  for a tuple, or the task's single-input name (`features`; `images` for
  ClassificationTask);
- outputs: the model's outputs under their names (the keys of a dict, the
  Keras output layer name of a single output), cast to float32; a
  classification task serves `probabilities` (softmax of the logits).
`trainer.serving_images.image_bytes_signature` wraps a single-image
signature so that it takes encoded JPEG/PNG/GIF/BMP bytes of any size and
channel count, resized and prepared as evaluation does.
"""

import dataclasses
import re
from typing import Callable

import tensorflow as tf

from trainer.errors import UserError


def _paths(structure) -> list[tuple[str, object]]:
  """(path joined by '/', leaf) in tf.nest order; '' for a lone leaf."""
  import keras
  return [("/".join(str(p) for p in path), leaf)
          for path, leaf in keras.tree.flatten_with_path(structure)]


@dataclasses.dataclass(frozen=True)
class Signature:
  """inputs: name -> spec of ONE example (no batch dimension);
  fn: {name: batched tensor} -> {output name: batched tensor}."""
  inputs: dict
  fn: Callable[[dict], dict]

  def tf_function(self) -> tf.types.experimental.GenericFunction:
    """The tf.function with a batch dimension on every input and the input
    names as the signature's argument names."""
    names = list(self.inputs)
    specs = [tf.TensorSpec([None, *self.inputs[n].shape], self.inputs[n].dtype,
                           name=n) for n in names]
    fn = self.fn

    @tf.function(input_signature=specs)
    def serve(*args):
      outputs = fn(dict(zip(names, args)))
      if not isinstance(outputs, dict) or not outputs:
        raise UserError("the serving function must return a non-empty dict "
                        f"of named tensors, not {type(outputs).__name__}.")
      return outputs

    return serve


def _clean(name: str) -> str:
  """A signature name from a nest path: letters, digits, '_' only."""
  return re.sub(r"\W", "_", name) or "input"


def input_names(input_spec, single_name: str
                ) -> list[tuple[str, tf.TensorSpec]]:
  """(name, spec) of every feature tensor, in tf.nest order."""
  pairs = _paths(input_spec)
  for path, spec in pairs:
    if not isinstance(spec, tf.TensorSpec):
      raise UserError(f"feature {path or single_name!r} is a "
                      f"{type(spec).__name__}, not a dense tensor: override "
                      "Task.serving_signature to export this model.")
  if len(pairs) == 1 and not pairs[0][0]:
    return [(single_name, pairs[0][1])]
  if isinstance(input_spec, (list, tuple)):
    return [(_clean(f"input_{p}"), s) for p, s in pairs]
  named = [(_clean(p), s) for p, s in pairs]
  if len({n for n, _ in named}) != len(named):
    raise UserError(f"feature names {[p for p, _ in pairs]} collide once made "
                    "signature-safe: override Task.serving_signature.")
  return named


def output_dict(model, outputs) -> dict:
  """The model's outputs by name, float outputs cast to float32."""
  if isinstance(outputs, dict):
    pairs = _paths(outputs)
    named = {_clean(p): t for p, t in pairs}
  else:
    flat = tf.nest.flatten(outputs)
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(flat) or len(set(names)) != len(names):
      names = ["outputs"] if len(flat) == 1 else [
          f"output_{i}" for i in range(len(flat))]
    named = {_clean(n): t for n, t in zip(names, flat)}
  return {n: tf.cast(t, tf.float32) if t.dtype.is_floating else t
          for n, t in named.items()}


def default_signature(model, input_spec, single_name: str = "features"
                      ) -> Signature:
  """Every input by name; the model's outputs under their names."""
  pairs = input_names(input_spec, single_name)

  def fn(inputs):
    features = tf.nest.pack_sequence_as(
        input_spec, [inputs[name] for name, _ in pairs])
    return output_dict(model, model(features, training=False))

  return Signature({name: spec for name, spec in pairs}, fn)


def classification_signature(model, input_spec,
                             single_name: str = "images") -> Signature:
  """Every input by name; `probabilities`, the softmax of the logits."""
  base = default_signature(model, input_spec, single_name)

  def fn(inputs):
    features = tf.nest.pack_sequence_as(
        input_spec, [inputs[name] for name in base.inputs])
    logits = model(features, training=False)
    if isinstance(logits, dict) or len(tf.nest.flatten(logits)) != 1:
      raise UserError("a classification task's model must return one logits "
                      "tensor [batch, classes]; override "
                      "Task.serving_signature for several outputs.")
    return {"probabilities": tf.nn.softmax(tf.cast(logits, tf.float32), -1)}

  return Signature(base.inputs, fn)
