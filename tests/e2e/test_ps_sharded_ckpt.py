"""Checkpoints of tables sharded over parameter servers: each ps writes and
reads its own rows, a checkpoint restores on another number of ps tasks
and under the default strategy, and an older whole-value checkpoint still
restores into shards.

One cluster (1 worker, 3 ps, launch.server) and one coordinator process
(this file run as a script): a partitioner whose shard count the
coordinator sets plays "2 ps", "3 ps" and "1 ps" (shards land on ps 0..n-1,
as they do in a cluster of n)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

if __name__ != "__main__":
  from conftest import REPO, env, stop_all

pytestmark = pytest.mark.timeout(180)

ROWS, DIM = 50_000, 8   # 1.6 MB: well above every other byte of the files


def _table(seed=0):
  return np.random.default_rng(seed).standard_normal(
      (ROWS, DIM)).astype(np.float32)


def _coordinator(old, new, out):
  """Restores `old` (one whole value) into 2 shards, saves that as `new`,
  restores `new` into 3 shards and into 1; the restored tables and where
  the shards lived go to `out`."""
  import keras
  import tensorflow as tf
  from trainer import compat
  from trainer.distribute.ps_strategy import wait_for_servers

  class Shards(tf.distribute.experimental.partitioners.Partitioner):
    count = 2

    def __call__(self, shape, dtype, axis=0):
      del dtype
      parts = [1] * shape.rank
      if shape[0] >= ROWS:
        parts[axis] = self.count
      return parts

  shards = Shards()
  # Bounded: connecting to a server that is not up blocks without a limit.
  wait_for_servers(json.loads(os.environ["TF_CONFIG"]), 60)
  strategy = tf.distribute.ParameterServerStrategy(
      tf.distribute.cluster_resolver.TFConfigClusterResolver(),
      variable_partitioner=shards)

  def table(count):
    shards.count = count
    with strategy.scope():
      layer = keras.layers.Embedding(ROWS, DIM)
      layer.build()
    compat.save_sharded_by_shard(layer.weights)
    return layer

  report = {}
  two = table(2)
  tf.train.Checkpoint(model=two).read(old).assert_consumed()
  np.save(out / "restored_old_into_2.npy", two.embeddings.numpy())
  report["2"] = compat.shard_rows(two.embeddings)
  tf.train.Checkpoint(model=two).write(new)
  for count in (3, 1):
    layer = table(count)
    # As the trainer restores: each shard emptied first, read on its ps.
    checkpoint = tf.train.Checkpoint(model=layer)
    released = compat.release_for_restore(checkpoint, new, min_bytes=0)
    compat.restore_released(released, new)
    with compat.skipping(released):
      checkpoint.read(new).assert_consumed()
    compat.check_restored(released)
    report[f"released_{count}"] = len(released)
    np.save(out / f"restored_into_{count}.npy", layer.embeddings.numpy())
    if compat.is_sharded(layer.embeddings):
      report[str(count)] = compat.shard_rows(layer.embeddings)
  (out / "report.json").write_text(json.dumps(report))


def _start_servers(tmp_path, cluster):
  procs = []
  for kind in ("worker", "ps"):
    for index in range(len(cluster[kind])):
      tf_config = json.dumps({"cluster": cluster,
                              "task": {"type": kind, "index": index}})
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "launch.server"], cwd=REPO,
          env={**env(), "TF_CONFIG": tf_config},
          stdout=open(tmp_path / f"{kind}{index}.log", "w"),
          stderr=subprocess.STDOUT, start_new_session=True))
  return procs


def test_ps_table_checkpoint_is_written_by_the_ps_and_reshards(tmp_path):
  import keras
  import tensorflow as tf
  from launch.cluster import free_ports

  ports = free_ports(5)
  cluster = {"chief": [f"localhost:{ports[0]}"],
             "worker": [f"localhost:{ports[1]}"],
             "ps": [f"localhost:{p}" for p in ports[2:]]}
  # The layout an unsharded run (and earlier sharded ones) wrote.
  value = _table()
  plain = keras.layers.Embedding(ROWS, DIM)
  plain.build()
  plain.embeddings.assign(value)
  old = tf.train.Checkpoint(model=plain).write(str(tmp_path / "old" / "ckpt"))
  new = tmp_path / "new" / "ckpt"
  servers = _start_servers(tmp_path, cluster)
  try:
    chief = {"cluster": cluster, "task": {"type": "chief", "index": 0}}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, __file__, old, str(new), str(tmp_path)], cwd=REPO,
        env={**env(), "TF_CONFIG": json.dumps(chief),
             "GRPC_FAIL_FAST": "use_caller"},
        capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(f"coordinator: {time.monotonic() - started:.1f} s")
  finally:
    stop_all(servers)

  report = json.loads((tmp_path / "report.json").read_text())
  assert report["released_3"] == 3, report
  # (The strategy places shards round robin over the ps tasks.)
  for count, rows in (("2", [25_000, 25_000]),
                      ("3", [16_667, 16_667, 16_666])):
    assert [r for _, r in report[count]] == rows
    assert {re.search(r"/job:ps/replica:0/task:(\d)", d).group(1)
            for d, _ in report[count]} == set("012"[:int(count)])
  for name in ("restored_old_into_2", "restored_into_3", "restored_into_1"):
    np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), value,
                                  err_msg=name)
  # Each ps wrote its own half: no data file holds the whole table.
  table_bytes = ROWS * DIM * 4
  sizes = {p.name: p.stat().st_size for p in new.parent.glob("ckpt.data-*")}
  assert sum(sizes.values()) >= table_bytes, sizes
  assert max(sizes.values()) < 0.6 * table_bytes, sizes
  # The default strategy reads the sharded checkpoint as one variable.
  fresh = keras.layers.Embedding(ROWS, DIM)
  fresh.build()
  tf.train.Checkpoint(model=fresh).read(str(new)).assert_consumed()
  np.testing.assert_array_equal(fresh.embeddings.numpy(), value)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())
  _coordinator(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
