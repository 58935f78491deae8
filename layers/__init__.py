"""Model building blocks and the model registry."""

from layers.blocks import classic_conv_padding, conv_bn_relu, residual_block
from layers.dropout import Dropout
from layers.embedding import Embedding, hash_ids
from layers.models import get, names, register

__all__ = ["Dropout", "Embedding", "classic_conv_padding", "conv_bn_relu",
           "get", "hash_ids", "names", "register", "residual_block"]
