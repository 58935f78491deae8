"""Imports every built-in reader so that each registers its dataset names."""

from trainer.data.readers import digits, synthetic  # noqa: F401
from trainer.data.readers import cifar10, image_folder  # noqa: F401
from trainer.data.readers import mnist, tfrecord  # noqa: F401
from trainer.data.readers import array_record  # noqa: F401
