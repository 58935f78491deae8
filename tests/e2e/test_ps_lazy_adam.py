"""Sparse lazy Adam on a table sharded over 2 parameter servers, with 1
worker (one update after another: a deterministic order), equals the same
task under the default strategy, and both equal a hand-written NumPy
row-wise Adam (tests/plugin_tasks.py:RowTable: a 64 x 4 table, rows looked
up by a fixed stream, a squared-distance loss)."""

import json
import os
import re

import numpy as np
import pytest

from conftest import REPO, Cluster, checkpoint_weights

pytestmark = pytest.mark.timeout(300)

TESTS = str(REPO / "tests")
LR, BATCH, UPDATES = 0.05, 8, 12
FLAGS = ["--task=plugin_tasks:RowTable", "--optimizer=lazy_adam",
         f"--learning_rate={LR}", f"--global_batch_size={BATCH}",
         f"--train_steps={UPDATES}", "--steps_per_loop=4",
         "--summary_every=12", "--eval_every=0", "--progress=log"]
# Keras 3 checkpoints the weights under the optimizer; Adam's slots are
# its variables 1 (first moment) and 2 (second moment) with one variable.
KEYS = [f"optimizer/{name}/.ATTRIBUTES/VARIABLE_VALUE"
        for name in ("_trainable_variables/0", "_variables/1",
                     "_variables/2")]


def numpy_lazy_adam(updates):
  """The table (and moments) after `updates` updates from the start."""
  from plugin_tasks import numpy_lazy_adam as adam, table_start
  zeros = np.zeros_like(table_start())
  return adam(table_start(), zeros, zeros, 1, updates, LR, BATCH)


def _train_default(model_dir):
  from trainer import controller
  from trainer.config import Config
  config = Config(task="plugin_tasks:RowTable", optimizer="lazy_adam",
                  learning_rate=LR, global_batch_size=BATCH,
                  train_steps=UPDATES, steps_per_loop=4, summary_every=12,
                  eval_every=0, progress="log", model_dir=str(model_dir))
  return controller.create(config).train()


def _slots(weights):
  """(table, first moment, second moment) of a checkpoint."""
  found = [weights[k] for k in KEYS]
  assert all(w.shape == (64, 4) for w in found), [w.shape for w in found]
  return found


def test_one_worker_two_ps_lazy_adam_equals_default_and_numpy(
    tmp_path, monkeypatch):
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [TESTS, os.environ.get("PYTHONPATH", "")]))
  ps_dir = tmp_path / "ps"
  # 1 KiB table and slots: over 256 bytes, each is split over the 2 ps.
  cluster = Cluster(tmp_path, [*FLAGS, "--strategy=parameter_server",
                               "--ps_shard_min_bytes=256",
                               f"--model_dir={ps_dir}"], workers=1, ps=2)
  try:
    default_dir = tmp_path / "default"
    default_result = _train_default(default_dir)
    rc = cluster.wait(timeout=240)
  finally:
    cluster.stop()
  log = cluster.log()
  assert rc == 0, log[-5000:]
  # The table and its two moments, each split over the 2 ps.
  split = re.findall(r"parameter_server: (\S+) \[64, 4\] sharded over 2 ps: "
                     r"rows 0-31 on ps \d, rows 32-63 on ps \d", log)
  assert len(split) == 3, log[-5000:]

  want_table, want_m, want_v = numpy_lazy_adam(UPDATES)
  sharded = checkpoint_weights(ps_dir / f"ckpt-{UPDATES}")
  default = checkpoint_weights(default_dir / f"ckpt-{UPDATES}")
  for got, name in ((sharded, "parameter servers"), (default, "default")):
    table, m, v = _slots(got)
    np.testing.assert_allclose(table, want_table, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(m, want_m, rtol=1e-5, atol=1e-7,
                               err_msg=name)
    np.testing.assert_allclose(v, want_v, rtol=1e-5, atol=1e-9,
                               err_msg=name)
  for a, b in zip(_slots(sharded), _slots(default)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
  # The evaluation at the end: on the coordinator, reading the table's rows
  # from the ps tasks; on one device; and by NumPy.
  from plugin_tasks import TABLE_IDS, TABLE_TARGETS
  chief = [l[len("[chief] "):] for l in log.splitlines()
           if l.startswith("[chief] {")]
  ps_result = json.loads(chief[-1])
  want_loss = np.mean(np.sum(
      np.square(want_table[TABLE_IDS] - TABLE_TARGETS), axis=1))
  for result in (ps_result, default_result):
    assert abs(result["eval_loss"] - want_loss) <= 1e-5 * want_loss, (
        result, want_loss)
  # Lazy: the rows never looked up keep their first value, bit for bit.
  from plugin_tasks import table_start
  np.testing.assert_array_equal(_slots(sharded)[0][48:], table_start()[48:])
