"""`python -m trainer.export`: a training checkpoint -> SavedModel (+ TFLite).

  python -m trainer.export --model_dir=DIR --export_dir=OUT \\
      [--checkpoint=PATH] [--tflite]

The model is rebuilt from DIR/config.json (same task, model and dataset
flags) and the checkpoint's model weights are restored into it (with
--ema_decay, the moving average of them, which evaluation used too): the latest
checkpoint in DIR, or --checkpoint (a checkpoint prefix such as
DIR/ckpt-600, or a directory such as DIR/best, whose latest one is used).

Signature `serving_default`:
  input  `images`: float32 [batch, H, W, C] with values in [0, 1], i.e. the
         features exactly as the model sees them after Task.preprocess; for
         the built-in datasets that is the uint8 pixels divided by 255 (no
         augmentation). Callers scale uint8 images themselves: one input
         contract for every task, and no hidden rescaling to get wrong twice.
  output `probabilities`: float32 [batch, num_classes], softmax of the logits.
The export computes in float32 whatever --mixed_precision the run used (the
checkpoint's weights are float32 either way). --tflite also writes
OUT/model.tflite (float32, same input and output). OUT is replaced as a
whole: it is written next to itself and renamed into place.
"""

import dataclasses
import json
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from trainer import errors
from trainer.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags; only when run as a program, so that
  importing this module next to other absl programs is harmless."""
  flags.DEFINE_string("model_dir", None, "Training --model_dir: config.json "
                      "and checkpoints.")
  flags.DEFINE_string("export_dir", None, "Where to write the SavedModel "
                      "(replaced if it exists). Its serving_default signature "
                      "takes `images`, float32 [N,H,W,C] in [0,1] (uint8 "
                      "pixels / 255), and returns `probabilities` [N,classes].")
  flags.DEFINE_string("checkpoint", "", "Checkpoint prefix (DIR/ckpt-N) or a "
                      "directory (e.g. DIR/best); default: the latest in "
                      "--model_dir.")
  flags.DEFINE_bool("tflite", False, "Also write EXPORT_DIR/model.tflite.")


INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


def load_config(model_dir: str):
  """The Config saved in model_dir/config.json (unknown fields ignored)."""
  from trainer.config import Config
  path = os.path.join(model_dir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
  except FileNotFoundError:
    raise UserError(f"--model_dir={model_dir} has no config.json: give the "
                    "--model_dir of a training run.") from None
  known = {f.name for f in dataclasses.fields(Config)}
  unknown = sorted(set(saved) - known)
  if unknown:
    logging.warning("config.json fields unknown to this version, ignored: %s",
                    ", ".join(unknown))
  return Config(**{k: v for k, v in saved.items() if k in known})


def find_checkpoint(model_dir: str, checkpoint: str = "") -> str:
  import tensorflow as tf
  path = checkpoint or model_dir
  if os.path.isdir(path):
    found = tf.train.latest_checkpoint(path)
    if found is None:
      raise UserError(f"no checkpoint in {path}: train first, or pass "
                      "--checkpoint=PREFIX.")
    return found
  if not tf.io.gfile.exists(path + ".index"):
    raise UserError(f"--checkpoint={path}: no such checkpoint ({path}.index "
                    "is missing).")
  return path


def restore_model(model_dir: str, checkpoint: str = ""):
  """(model, input spec, checkpoint path, config) rebuilt from a run."""
  import keras
  import tensorflow as tf
  from trainer import task as task_lib
  from trainer.data import pipeline
  config = load_config(model_dir)
  path = find_checkpoint(model_dir, checkpoint)
  keras.mixed_precision.set_global_policy("float32")
  task = task_lib.from_config(config)
  spec = pipeline.input_spec(task, config.train_split)
  if not isinstance(spec, tf.TensorSpec):
    raise UserError(f"the task's features are {spec}, not one image tensor: "
                    "trainer.export handles single-input models only.")
  model = task.build_model(spec)
  objects = {"model": model}
  if config.ema_decay:
    # The run evaluated its moving average: export that, not the raw weights.
    from trainer.ema import EMA
    objects["ema"] = EMA(model.trainable_variables, config.ema_decay)
  status = tf.train.Checkpoint(**objects).restore(path).expect_partial()
  try:
    status.assert_existing_objects_matched()
  except AssertionError as e:
    raise UserError(f"{path} does not hold this model's weights "
                    f"({str(e).splitlines()[0][:200]}).") from None
  if "ema" in objects:
    objects["ema"].swap_in()
  return model, spec, path, config


def serving_function(model, spec):
  """The `serving_default` function: images -> {"probabilities": ...}."""
  import tensorflow as tf

  @tf.function(input_signature=[tf.TensorSpec(
      [None, *spec.shape], spec.dtype, name=INPUT_NAME)])
  def serve(images):
    logits = tf.cast(model(images, training=False), tf.float32)
    return {OUTPUT_NAME: tf.nn.softmax(logits, axis=-1)}

  return serve


def tflite_bytes(serve, spec) -> bytes:
  """The TFLite flatbuffer of `serve`, with the same signature names.

  The weights are frozen into constants first: TF 2.21's converter keeps
  Keras 3 variables as resource variables (VAR_HANDLE ops with no values),
  and the interpreter then returns NaN.
  """
  import tensorflow as tf
  # No public equivalent in TF 2.21; the converter itself uses it.
  from tensorflow.python.framework import convert_to_constants
  frozen = convert_to_constants.convert_variables_to_constants_v2(
      serve.get_concrete_function())

  @tf.function(input_signature=[tf.TensorSpec(
      [None, *spec.shape], spec.dtype, name=INPUT_NAME)])
  def serve_frozen(images):
    return {OUTPUT_NAME: frozen(images)[0]}

  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [serve_frozen.get_concrete_function()], tf.Module())
  return converter.convert()


def export(model_dir: str, export_dir: str, checkpoint: str = "",
           tflite: bool = False) -> dict:
  """Writes the SavedModel (and model.tflite); returns a summary dict."""
  import keras
  model, spec, path, config = restore_model(model_dir, checkpoint)
  serve = serving_function(model, spec)
  export_dir = os.path.normpath(export_dir)
  staging = f"{export_dir}.tmp-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  # Keras' ExportArchive, not tf.saved_model.save on a tf.Module: with the
  # latter, a TF1-style session loader (`saved_model_cli run`) cannot find
  # the Keras 3 variables.
  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint("serving_default", serve)
  archive.write_out(staging, verbose=False)
  info = {"export_dir": export_dir, "checkpoint": path,
          "step": _step_of(path), "input": {
              "name": INPUT_NAME, "dtype": spec.dtype.name,
              "shape": [None, *spec.shape.as_list()],
              # A --task's preprocess decides its own range.
              "range": None if config.task else [0.0, 1.0]},
          "output": {"name": OUTPUT_NAME, "what": "softmax probabilities"},
          "model": config.model, "dataset": config.dataset, "task": config.task}
  if tflite:
    with open(os.path.join(staging, "model.tflite"), "wb") as f:
      f.write(tflite_bytes(serve, spec))
    info["tflite"] = os.path.join(export_dir, "model.tflite")
  os.makedirs(os.path.join(staging, "assets.extra"), exist_ok=True)
  with open(os.path.join(staging, "assets.extra", "export.json"), "w") as f:
    json.dump(info, f, indent=2)
  _replace(staging, export_dir)
  return info


def _step_of(path: str) -> int | None:
  try:
    return int(path.rsplit("-", 1)[1])
  except (IndexError, ValueError):
    return None


def _replace(staging: str, target: str) -> None:
  """Moves `staging` to `target`, replacing an older export."""
  old = f"{target}.old-{os.getpid()}"
  if os.path.exists(target):
    os.rename(target, old)
  os.rename(staging, target)
  shutil.rmtree(old, ignore_errors=True)


def main(argv):
  if len(argv) > 1:
    errors.fail("trainer.export", f"unexpected arguments {argv[1:]}; flags "
                "look like --name=value.")
  if not FLAGS.model_dir or not FLAGS.export_dir:
    errors.fail("trainer.export",
                "--model_dir and --export_dir are required.")
  try:
    info = export(FLAGS.model_dir, FLAGS.export_dir, FLAGS.checkpoint,
                  FLAGS.tflite)
  except UserError as e:
    errors.fail("trainer.export", str(e))
  print(json.dumps(info), flush=True)


def run():
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
