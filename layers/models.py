"""Model registry: mlp, cnn, resnet20; each adapts to input shape and classes.

Every model returns float32 logits (the last Dense is float32 under mixed
precision, so the loss is computed in float32).
"""

from typing import Callable

import keras

from layers import blocks
from layers.dropout import Dropout

ModelFn = Callable[[tuple, int], keras.Model]
_MODELS: dict[str, ModelFn] = {}


def register(name: str):
  def wrap(fn: ModelFn) -> ModelFn:
    _MODELS[name] = fn
    return fn
  return wrap


def names() -> list[str]:
  return sorted(_MODELS)


def get(name: str) -> ModelFn:
  return _MODELS[name]


def _logits(x, num_classes):
  return keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)


@register("mlp")
def mlp(input_shape: tuple, num_classes: int) -> keras.Model:
  """The TF2 beginner tutorial model: Flatten-Dense128-Dropout0.2-Dense."""
  inputs = keras.Input(input_shape, name="image")
  x = keras.layers.Flatten(name="flatten")(inputs)
  x = keras.layers.Dense(128, activation="relu", name="hidden")(x)
  x = Dropout(0.2, name="dropout")(x)
  return keras.Model(inputs, _logits(x, num_classes), name="mlp")


@register("cnn")
def cnn(input_shape: tuple, num_classes: int) -> keras.Model:
  """The classic MNIST CNN: Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense."""
  padding = blocks.classic_conv_padding(input_shape[0], input_shape[1])
  inputs = keras.Input(input_shape, name="image")
  x = keras.layers.Conv2D(32, 3, activation="relu", padding=padding,
                          name="conv1")(inputs)
  x = keras.layers.MaxPooling2D(2, name="pool1")(x)
  x = keras.layers.Conv2D(64, 3, activation="relu", padding=padding,
                          name="conv2")(x)
  x = keras.layers.MaxPooling2D(2, name="pool2")(x)
  x = keras.layers.Conv2D(64, 3, activation="relu", padding=padding,
                          name="conv3")(x)
  x = keras.layers.Flatten(name="flatten")(x)
  x = keras.layers.Dense(64, activation="relu", name="dense")(x)
  return keras.Model(inputs, _logits(x, num_classes), name="cnn")


@register("resnet20")
def resnet20(input_shape: tuple, num_classes: int) -> keras.Model:
  """ResNet-20 for CIFAR (He et al. 2016): 3 stages x 3 blocks, 16/32/64."""
  inputs = keras.Input(input_shape, name="image")
  x = blocks.conv_bn_relu(inputs, 16, name="stem")
  for stage, filters in enumerate((16, 32, 64)):
    for block in range(3):
      strides = 2 if stage > 0 and block == 0 else 1
      x = blocks.residual_block(x, filters, strides, f"s{stage}b{block}")
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  return keras.Model(inputs, _logits(x, num_classes), name="resnet20")
