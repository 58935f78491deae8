"""Small finished runs shared by the export tests: each trained once per
test process (in-process, a few seconds), in a directory removed at exit."""

import atexit
import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="trainer-export-runs-"))
atexit.register(shutil.rmtree, str(_ROOT), True)


@functools.cache
def digits_run(model: str = "mlp", image_size: str = "") -> Path:
  """A 2-update run of the built-in classification task on digits."""
  import trainer
  from trainer.config import Config
  model_dir = _ROOT / f"digits-{model}-{image_size.replace(',', 'x')}"
  trainer.train(Config(model=model, dataset="digits", image_size=image_size,
                       global_batch_size=32, train_steps=2, steps_per_loop=2,
                       summary_every=2, checkpoint_every=2, eval_every=0,
                       mode="train", model_dir=str(model_dir),
                       progress="log"))
  return model_dir


def tree_digest(root: Path) -> str:
  """A digest of every entry under `root`: paths, kinds, modes and bytes."""
  digest = hashlib.sha256()
  if not root.exists():
    return "absent"
  if root.is_file():
    return hashlib.sha256(root.read_bytes()).hexdigest()
  for dirpath, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(dirs + files):
      path = Path(dirpath) / name
      digest.update(str(path.relative_to(root)).encode())
      digest.update(oct(path.lstat().st_mode).encode())
      if path.is_file() and not path.is_symlink():
        digest.update(path.read_bytes())
  return digest.hexdigest()
