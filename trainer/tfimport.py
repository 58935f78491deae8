"""`import tensorflow` for the CLI, without scikit-learn.

Keras 3, which `import tensorflow` loads, imports scikit-learn for its
keras.wrappers estimators whenever it is installed: 0.8-0.9 s of the 3.1-4.1 s
the import takes on this machine, paid by every trainer process. It is
installed here (the digits set ships inside it), but the trainer never uses
those wrappers, and the digits reader reads its file without importing it.
So the CLI hides scikit-learn while TensorFlow loads, and only then: a
task's own `import sklearn` afterwards works as usual (Keras' wrappers raise
their "scikit-learn is required" ImportError in such a process).
"""

import sys


def import_tensorflow():
  """Imports TensorFlow (without scikit-learn if neither is loaded yet)."""
  if "tensorflow" in sys.modules or "sklearn" in sys.modules:
    import tensorflow as tf
    return tf
  sys.modules["sklearn"] = None   # `import sklearn` raises ImportError
  try:
    import tensorflow as tf
  finally:
    del sys.modules["sklearn"]
  return tf
