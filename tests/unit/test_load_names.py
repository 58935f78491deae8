"""trainer.load names weights as a new process would: two loads in one
process (with other Keras layers made before and between) give the same
keys, and layers made afterwards still get names of their own."""

import keras
import numpy as np

import trainer


def test_two_loads_give_the_same_weight_names(tmp_path):
  from trainer.config import Config
  run = tmp_path / "run"
  # plugin_tasks.TinyDigits: Dense layers named by Keras ("dense", ...).
  trainer.train(Config(task="plugin_tasks:TinyDigits", global_batch_size=32,
                       train_steps=1, steps_per_loop=1, summary_every=1,
                       eval_every=0, mode="train", model_dir=str(run),
                       progress="log"))
  keras.layers.Dense(2)                       # counters moved on
  first = trainer.load.weights(trainer.load(str(run))[1])
  keras.layers.Dense(2)
  second = trainer.load.weights(trainer.load(str(run))[1])
  # Flatten, Dense(32), Dropout, Dense(10) in a new process.
  assert sorted(first) == sorted(second) == [
      "dense/bias", "dense/kernel", "dense_1/bias", "dense_1/kernel"]
  for name, value in first.items():
    np.testing.assert_array_equal(second[name], value)
  assert keras.layers.Dense(2).name not in ("dense", "dense_1")
