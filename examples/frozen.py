"""A frozen model from an earlier run: rebuilt from RUN/config.json, its
latest checkpoint's weights restored (the moving average if the run had
--ema_decay, as its evaluation used), trainable=False. Used by the
distillation teacher and the SimCLR linear probe's encoder."""

import os

import keras
import tensorflow as tf

from trainer.errors import UserError


def load(run_dir: str, input_spec, dataset: str, flag: str) -> keras.Model:
  """The main model ("model", or the only one) of the run in `run_dir`.
  `flag`: how the user named run_dir (for the error lines). Refuses a run
  on another dataset or a checkpoint that does not hold the weights."""
  from trainer.export import load_config
  from trainer.task import from_config
  if not os.path.isdir(run_dir):
    raise UserError(f"{flag}={run_dir}: no such directory; run the earlier "
                    "training first.")
  config = load_config(run_dir)
  if config.dataset != dataset:
    raise UserError(f"the run in {run_dir} was trained on --dataset="
                    f"{config.dataset}, not {dataset}; use the same dataset.")
  latest = tf.train.latest_checkpoint(run_dir)
  if latest is None:
    raise UserError(f"{flag}={run_dir} holds no checkpoint; run the earlier "
                    "training first.")
  built = from_config(config).build_model(input_spec)
  if isinstance(built, keras.Model):
    built = {"model": built}
  if "model" not in built and len(built) != 1:
    raise UserError(f"the run in {run_dir} has models {sorted(built)} and "
                    "none is named 'model'.")
  # The layout trainer.build checkpoints: one model as itself, several as
  # a module with one attribute per name.
  if len(built) == 1:
    tracked = next(iter(built.values()))
  else:
    tracked = tf.Module(name="model")
    for name, model in built.items():
      setattr(tracked, name, model)
  objects = {"model": tracked}
  if config.ema_decay:
    from trainer.ema import EMA
    objects["ema"] = EMA([v for m in built.values()
                          for v in m.trainable_variables], config.ema_decay)
  status = tf.train.Checkpoint(**objects).restore(latest).expect_partial()
  try:
    status.assert_existing_objects_matched()
  except AssertionError as e:
    raise UserError(f"{latest} does not hold the weights of the run's "
                    f"models ({str(e).splitlines()[0][:200]}).") from None
  if "ema" in objects:
    objects["ema"].swap_in()
  model = built.get("model") or next(iter(built.values()))
  model.trainable = False
  return model
