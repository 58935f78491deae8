"""A table sharded over 2 parameter servers, trained by 1 worker with lazy
Adam under launch.local --max_restarts: SIGKILL of the coordinator, of the
worker and of a ps, each once. Training finishes at --train_steps, and the
final table and slots equal those of the last checkpoint before the kill
plus the updates after it: bit for bit as the trainer resuming that
checkpoint in this process (default strategy) makes them, and to rel 1e-5
as a hand-written NumPy Adam makes them.

Every update here reads the same batch (tests/plugin_tasks.py:RowTable
with --global_batch_size=40: each batch is its 40 examples, in order), so
an update's result depends only on the table, its slots and the
optimizer's update count, all of which the checkpoint holds: "the updates
after it" are the optimizer's iterations since. (With one worker the
order of updates is deterministic anyway; one batch makes the check also
cover the worker's kill, after which its stream restarts where the run
began.)"""

import os
import re
import signal

import numpy as np
import pytest

from conftest import REPO, Cluster, checkpoint_weights

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not os.environ.get("TRAINER_SLOW"),
        reason="three 1 worker + 2 ps runs under launch.local, each "
               "restarted after a SIGKILL: minutes; set TRAINER_SLOW=1")]

TESTS = str(REPO / "tests")
LR, BATCH, UPDATES, EVERY = 0.002, 40, 600, 100
KEYS = [f"optimizer/{name}/.ATTRIBUTES/VARIABLE_VALUE"
        for name in ("_trainable_variables/0", "_variables/1",
                     "_variables/2")]
ITERATIONS = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"


def numpy_adam(table, m, v, first, last):
  """Updates first..last of lazy Adam (the full table stream each update:
  BATCH is its length)."""
  from plugin_tasks import TABLE_IDS, numpy_lazy_adam
  assert BATCH == len(TABLE_IDS)
  return numpy_lazy_adam(table, m, v, first, last, LR, BATCH)


def _state(path):
  weights = checkpoint_weights(path)
  return [weights[k] for k in KEYS], int(weights[ITERATIONS])


def _checkpoints(model_dir):
  return sorted(int(m.group(1)) for p in model_dir.glob("ckpt-*.index")
                if (m := re.match(r"ckpt-(\d+)\.index", p.name)))


@pytest.mark.parametrize("victim", ["chief0", "worker0", "ps1"])
def test_killed_process_restarts_and_the_table_is_checkpoint_plus_updates(
    tmp_path, monkeypatch, victim):
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [TESTS, os.environ.get("PYTHONPATH", "")]))
  model_dir = tmp_path / "run"
  cluster = Cluster(
      tmp_path,
      ["--strategy=parameter_server", "--task=plugin_tasks:RowTable",
       "--optimizer=lazy_adam", f"--learning_rate={LR}",
       f"--global_batch_size={BATCH}", f"--train_steps={UPDATES}",
       "--steps_per_loop=10", f"--checkpoint_every={EVERY}",
       f"--summary_every={EVERY}", "--keep_checkpoints=100",
       "--eval_every=0", "--mode=train", "--progress=log",
       "--ps_shard_min_bytes=256", f"--model_dir={model_dir}"],
      workers=1, ps=2, launcher_flags=["--max_restarts=2", "--timeout_s=800"])
  try:
    cluster.wait_for(lambda: _checkpoints(model_dir), 300, "a checkpoint")
    before = _checkpoints(model_dir)[-1]
    pid = cluster.children()[victim]
    os.kill(pid, signal.SIGKILL)
    after = _checkpoints(model_dir)[-1]
    rc = cluster.wait(timeout=600)
  finally:
    cluster.stop()
  log = cluster.log()
  assert rc == 0, log[-5000:]
  assert before < UPDATES, f"the run was over before the kill ({before})"
  final = _checkpoints(model_dir)[-1]
  assert final == UPDATES, _checkpoints(model_dir)
  (table, m, v), iterations = _state(model_dir / f"ckpt-{final}")
  if victim == "worker0":
    # The coordinator went on: no restore.
    assert "restored" not in log
    last = max(s for s in _checkpoints(model_dir) if s <= after)
  else:
    restored = re.findall(r"restored \S+ at step (\d+)", log)
    assert len(restored) == 1, log[-5000:]
    last = int(restored[0])
    assert last in (before, after), (last, before, after)
  start, done = _state(model_dir / f"ckpt-{last}")
  # The kill left the table at its last checkpoint plus `iterations -
  # done` updates after it (at least the UPDATES - last the run counts).
  assert iterations >= UPDATES and iterations - done >= UPDATES - last
  want = numpy_adam(*start, done + 1, iterations)
  for got, expected, name in zip((table, m, v), want, ("table", "m", "v")):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5,
                               err_msg=f"{victim}: {name}")
  # And the same from the very start (the checkpoint itself was right).
  from plugin_tasks import table_start
  zeros = np.zeros_like(table)
  scratch = numpy_adam(table_start(), zeros, zeros, 1, iterations)
  np.testing.assert_allclose(table, scratch[0], rtol=1e-5, atol=1e-5,
                             err_msg=victim)
  if iterations == UPDATES:
    # No update cut off uncounted (a killed worker may leave one): exact.
    # The checkpoint resumed by the trainer in this process (default
    # strategy, the same updates) gives the very same bits.
    replay = _resume_in_process(model_dir, last, tmp_path / "replay")
    for got, expected, name in zip((table, m, v), replay,
                                   ("table", "m", "v")):
      np.testing.assert_array_equal(got, expected,
                                    err_msg=f"{victim}: {name}")
  print(f"{victim}: killed after ckpt-{before}, checked from ckpt-{last}; "
        f"{iterations} optimizer updates for {UPDATES} counted")


def _resume_in_process(model_dir, step, replay_dir):
  """(table, m, v) after the trainer (default strategy, this process)
  resumes ckpt-`step` of `model_dir` and trains to UPDATES."""
  import shutil
  from trainer import controller
  from trainer.config import Config
  replay_dir.mkdir()
  for path in model_dir.glob(f"ckpt-{step}.*"):
    shutil.copy(path, replay_dir / path.name)
  (replay_dir / "checkpoint").write_text(
      f'model_checkpoint_path: "ckpt-{step}"\n')
  config = Config(task="plugin_tasks:RowTable", optimizer="lazy_adam",
                  learning_rate=LR, global_batch_size=BATCH,
                  train_steps=UPDATES, steps_per_loop=10,
                  checkpoint_every=EVERY, eval_every=0, mode="train",
                  progress="log", model_dir=str(replay_dir))
  controller.create(config).train(evaluate=False)
  return _state(replay_dir / f"ckpt-{UPDATES}")[0]
