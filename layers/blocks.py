"""Building blocks: the classic conv stack and the CIFAR residual block."""

import keras

_L2 = 1e-4   # resnet20's weight decay, as in He et al. (2016) for CIFAR


def conv_bn_relu(x, filters, strides=1, name=None, relu=True):
  x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same",
                          use_bias=False, kernel_initializer="he_normal",
                          kernel_regularizer=keras.regularizers.L2(_L2),
                          name=f"{name}_conv")(x)
  x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
  return keras.layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


def residual_block(x, filters, strides, name):
  """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""
  shortcut = x
  y = conv_bn_relu(x, filters, strides, name=f"{name}_a")
  y = conv_bn_relu(y, filters, 1, name=f"{name}_b", relu=False)
  if strides != 1 or x.shape[-1] != filters:
    shortcut = keras.layers.Conv2D(
        filters, 1, strides=strides, use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=keras.regularizers.L2(_L2),
        name=f"{name}_proj")(x)
    shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
  y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
  return keras.layers.Activation("relu", name=f"{name}_out")(y)


def classic_conv_padding(height: int, width: int) -> str:
  """'valid' when the classic valid-padding stack fits (28x28 MNIST: 3x3 at
  the end), 'same' for inputs too small for it (8x8 digits)."""
  def final(size):
    return ((size - 2) // 2 - 2) // 2 - 2
  return "valid" if min(final(height), final(width)) >= 1 else "same"
