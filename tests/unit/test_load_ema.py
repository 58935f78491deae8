"""trainer.load and trainer.export of a run kept with --ema_decay give the
moving average's weights (the ones its evaluation used), unless asked for
the raw ones."""

import numpy as np
import tensorflow as tf

import trainer
from trainer.config import Config


def test_load_gives_the_ema_weights_and_raw_on_request(tmp_path):
  model_dir = tmp_path / "run"
  config = Config(model="mlp", dataset="digits", global_batch_size=32,
                  train_steps=20, steps_per_loop=10, summary_every=10,
                  checkpoint_every=20, eval_every=0, mode="train",
                  ema_decay=0.9, model_dir=str(model_dir))
  trainer.train(config)
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
  keys = reader.get_variable_to_shape_map()
  averages = [reader.get_tensor(f"ema/averages/{i}/.ATTRIBUTES/VARIABLE_VALUE")
              for i in range(sum(k.startswith("ema/averages/") for k in keys))]
  _, model = trainer.load(str(model_dir))
  _, raw = trainer.load(str(model_dir), ema=False)
  assert len(averages) == len(model.trainable_variables) > 0
  for average, mine, theirs in zip(averages, model.trainable_variables,
                                   raw.trainable_variables):
    np.testing.assert_array_equal(mine.numpy(), average)
  # After 20 updates at decay 0.9 the average lags the weights.
  assert max(float(np.max(np.abs(a.numpy() - b.numpy())))
             for a, b in zip(model.trainable_variables,
                             raw.trainable_variables)) > 1e-4
  x = np.random.default_rng(0).random((4, 8, 8, 1), np.float32)
  assert not np.allclose(model(x).numpy(), raw(x).numpy())
