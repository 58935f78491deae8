"""Where Keras caches downloaded datasets, and a guarded Keras download."""

import os


def dataset_dirs() -> list[str]:
  """Directories where `keras.utils.get_file` may have put datasets.

  $KERAS_HOME (default ~/.keras), and /tmp/.keras, which Keras falls back to
  when the home directory is not writable.
  """
  home = os.environ.get("KERAS_HOME") or os.path.expanduser("~/.keras")
  dirs = [os.path.join(home, "datasets"), os.path.join("/tmp", ".keras",
                                                       "datasets")]
  return list(dict.fromkeys(dirs))  # dedupe, keep order


def download(name: str):
  """`keras.datasets.<name>.load_data()`; returns (result, None) or (None, why).

  Never raises: offline machines are normal, and the caller turns the reason
  into a message that says where to put the files instead.
  """
  try:
    import keras  # heavy: only when nothing was found locally
    return getattr(keras.datasets, name).load_data(), None
  except Exception as e:  # pylint: disable=broad-except
    # Any failure (no network, proxy, bad checksum) means "not available".
    return None, " ".join(f"{type(e).__name__}: {e}".split())[:200]
