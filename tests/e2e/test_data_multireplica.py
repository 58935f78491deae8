"""Several replicas per worker: --cpu_replicas under multiworker is refused
(TF gives a CPU worker one device), and the per-worker pipeline's path for
more than one local replica is checked row for row against whole batches."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_trainer
from trainer.config import Config, validate
from trainer.data import pipeline
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(300)


def test_cpu_replicas_under_multiworker_is_refused_in_one_line(tmp_path):
  with pytest.raises(UserError, match="one CPU device per worker"):
    validate(Config(strategy="multiworker", cpu_replicas=2))
  validate(Config(strategy="multiworker", cpu_replicas=1))   # 1: no split
  proc = run_trainer("--strategy=multiworker", "--cpu_replicas=2",
                     f"--model_dir={tmp_path / 'run'}", check=False,
                     timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if "cpu_replicas" in l]
  assert len(lines) == 1 and "--strategy=mirrored" in lines[0], proc.stderr
  assert not (tmp_path / "run").exists()


def _photo_folder(root, count=24):
  """PNGs of many sizes, grayscale and RGB, in two class folders."""
  rng = np.random.default_rng(7)
  for i in range(count):
    shape = (int(rng.integers(6, 40)), int(rng.integers(6, 40)),
             1 if i % 3 == 0 else 3)
    folder = root / f"c{i % 2}"
    folder.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, shape).astype(np.uint8)
    (folder / f"{i:03d}.png").write_bytes(tf.io.encode_png(pixels).numpy())


@pytest.mark.parametrize("dataset", ["digits", "image_folder"])
def test_two_local_replicas_of_two_workers_build_the_global_batch(
    tmp_path, dataset):
  """Workers 0 and 1 of a 2 x 2 cluster: each of their per-replica batches
  equals the matching quarter of the whole-batch pipeline's global batch,
  augmentation and random-resized crops included."""
  from trainer.task import ClassificationTask
  import layers
  _photo_folder(tmp_path / "photos")
  config = Config(dataset=dataset, data_dir=str(tmp_path / "photos"),
                  image_size="12,10", augment=True, global_batch_size=16,
                  seed=4)
  task = ClassificationTask(config, layers.get("cnn"))
  args = (task, "train", 16, config.seed, 40)   # resume-like start
  whole = list(pipeline.train_dataset(*args).take(3))
  for worker in (0, 1):
    share = pipeline.worker_train_dataset(
        *args, num_replicas=4, first_replica=2 * worker, local_replicas=2)
    for k, (features, labels, meta) in enumerate(share.take(6)):
      g, replica = k // 2, 2 * worker + k % 2
      rows = slice(4 * replica, 4 * replica + 4)
      np.testing.assert_array_equal(meta["pos"], whole[g][2]["pos"][rows])
      np.testing.assert_array_equal(labels, whole[g][1][rows])
      np.testing.assert_allclose(features, whole[g][0][rows], rtol=1e-6,
                                 atol=1e-6)
  assert whole[0][0].shape == (16, 12, 10, 1 if dataset == "digits" else 3)
