"""Forward FLOPs of a model, counted two ways.

1. TF's profiler (`tf.compat.v1.profiler`, float_operation) on the graph of a
   concrete function of the forward pass at a fixed batch: counts the ops
   that have registered FLOP statistics (Conv2D, MatMul, BiasAdd, elementwise
   ops, ...). This is the figure the benchmark uses.
2. An analytic count per Keras layer (multiply-add = 2 FLOPs for Conv2D and
   Dense, plus bias adds), as a cross-check; it ignores activations, pooling
   and batch norm, which are <2% for these models.

Training FLOPs are taken as 3x forward (the backward pass computes gradients
with respect to activations and to weights, each about one forward).
"""

import math

# One copy of the profiler count and the factor, in the trainer (perf/).
from trainer.flops import TRAIN_FACTOR, profiler_forward_flops  # noqa: F401


def _build(model_name: str):
  import keras
  import layers
  from bench import common
  keras.utils.set_random_seed(0)
  return layers.get(model_name)(common.SHAPES[model_name], common.NUM_CLASSES)


def analytic_forward_flops(model) -> float:
  """Per example: 2*MACs of Conv2D/Dense (+ bias adds)."""
  import keras
  total = 0
  for layer in model.layers:
    if isinstance(layer, keras.layers.Conv2D):
      out = layer.output.shape   # (None, H, W, C)
      k = math.prod(layer.kernel_size) * layer.input.shape[-1] // layer.groups
      positions = out[1] * out[2] * out[3]
      total += 2 * k * positions + (positions if layer.use_bias else 0)
    elif isinstance(layer, keras.layers.Dense):
      n_in, n_out = layer.input.shape[-1], layer.units
      total += 2 * n_in * n_out + (n_out if layer.use_bias else 0)
  return float(total)


def count(model_name: str, batch: int = 32) -> dict:
  model = _build(model_name)
  prof = profiler_forward_flops(model, batch) / batch
  analytic = analytic_forward_flops(model)
  return {"model": model_name,
          "forward_flops_per_example_profiler": prof,
          "forward_flops_per_example_analytic": analytic,
          "train_flops_per_example": TRAIN_FACTOR * prof,
          "params": int(model.count_params()),
          "method": "TF profiler float_operation on the forward concrete "
                    f"function at batch {batch}; training = "
                    f"{TRAIN_FACTOR:g} x forward"}
