"""A record damaged in the middle of an on-disk split, found when it is
read: with --skip_corrupt it weighs 0 and is counted; without, the run saves
a checkpoint and stops with one line naming the file and record."""

import numpy as np
import pytest

from conftest import (REPO, assert_weights_close, checkpoint_weights,
                      last_json, run_trainer)
from trainer import convert
from trainer.data import records, registry

pytestmark = pytest.mark.timeout(300)
pytest.importorskip("array_record")

DAMAGED = 700     # index in the train split: the middle of shard 1 of 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """digits train/test as ArrayRecord; a copy whose train record DAMAGED
  holds bytes that are not an image."""
  from array_record.python import array_record_module
  root = tmp_path_factory.mktemp("data")
  good, bad = root / "good", root / "bad"
  for out in (good, bad):
    convert.convert("digits", registry.DataArgs(), "train,test", str(out),
                    shards=3, fmt="png", container="array_record")
  source = registry.get("array_record")("train", registry.DataArgs(
      data_dir=str(good)))
  path = sorted(bad.glob("train-00001-*"))[0]
  first = 500   # shard 1 of 3 holds train examples 500..999
  writer = array_record_module.ArrayRecordWriter(
      str(path), records.array_record_options(raw=False))
  for index in range(first, 1000):
    images, labels = source.gather(np.array([index]))
    data = b"\x89PNG not really" if index == DAMAGED else \
        convert.tf.io.encode_png(images[0]).numpy()
    writer.write(records.encode(data, int(labels[0]), (8, 8, 1), False, 10))
  writer.close()
  return good, bad, path


COMMON = ["--dataset=array_record", "--image_size=8", "--model=cnn",
          "--optimizer=sgd", "--learning_rate=0.05", "--global_batch_size=32",
          "--train_steps=60", "--steps_per_loop=10", "--summary_every=60",
          "--checkpoint_every=60", "--eval_every=0", "--mode=train", "--seed=3"]


def _scalar(model_dir, tag):
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(str(model_dir / "train"),
                                           size_guidance={"tensors": 0})
  acc.Reload()
  return [float(tensor_util.make_ndarray(e.tensor_proto))
          for e in acc.Tensors(tag)]


def test_skip_corrupt_equals_weight_zero_and_counts(data, tmp_path):
  good, bad, path = data
  # 60 updates x 32 = 1920 positions > 1500: the damaged example is read
  # once or twice (each epoch), wherever the shuffle puts it.
  skipped = run_trainer(*COMMON, f"--data_dir={bad}", "--skip_corrupt",
                        f"--model_dir={tmp_path / 'skip'}")
  assert last_json(skipped)["global_step"] == 60
  assert f"{path} record {DAMAGED - 500}" in skipped.stderr
  counts = _scalar(tmp_path / "skip", "skipped_examples")
  assert counts and 1 <= sum(counts) <= 2, counts
  run_trainer(*COMMON, f"--data_dir={good}", "--task=data_damage_tasks:zero_one",
              f"--model_dir={tmp_path / 'ref'}",
              extra_env={"DAMAGED_INDEX": DAMAGED,
                         "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
  assert_weights_close(checkpoint_weights(tmp_path / "skip" / "ckpt-60"),
                       checkpoint_weights(tmp_path / "ref" / "ckpt-60"),
                       rtol=1e-6, atol=1e-7)
  assert _scalar(tmp_path / "ref", "skipped_examples") == [0.0]


def test_without_skip_corrupt_saves_and_stops_with_one_line(data, tmp_path):
  _, bad, path = data
  proc = run_trainer(*COMMON, f"--data_dir={bad}",
                     f"--model_dir={tmp_path / 'stop'}", check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if "is damaged" in l]
  assert len(lines) == 1 and f"{path} record {DAMAGED - 500}" in lines[0]
  assert "--skip_corrupt" in lines[0]
  assert list((tmp_path / "stop").glob("ckpt-*.index")), "no checkpoint"
