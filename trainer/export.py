"""`python -m trainer.export`: a training checkpoint -> SavedModel (+ TFLite).

  python -m trainer.export --model_dir=DIR --export_dir=OUT \\
      [--checkpoint=PATH] [--data_dir=PATH] [--image_bytes] [--tflite]

The task and model are rebuilt from DIR/config.json (trainer.load), with
the checkpoint's weights: the latest in DIR, or --checkpoint (a prefix such
as DIR/ckpt-600, or a directory such as DIR/best, whose latest one is used).
Flags given here override only what they name (--data_dir, --file_patterns
when the data moved; the data are read for the input spec and class count).

Signature `serving_default`: the Task's `serving_signature` hook. Defaults:
  - ClassificationTask (the built-in datasets): input `images`, float32
    [N, H, W, C] as the model sees them after preprocess (uint8 pixels / 255),
    output `probabilities` [N, classes] (softmax of the logits);
  - any other task: every model input by name (`features` for one tensor,
    the keys of a dict of features), the model's outputs under their names
    (the keys of a dict, or the Keras output layer's name).
--image_bytes (image tasks): the input is `image_bytes`, a string [N] of
encoded JPEG/PNG/GIF/BMP files, decoded to the training images' size and
channels and preprocessed as evaluation does; a second signature `features`
keeps the float input. The export computes in float32 whatever
--mixed_precision the run used. --tflite also writes OUT/model.tflite
(float inputs, same names). OUT is written next to itself and renamed into
place. OUT must be new or an empty directory; a previous export of this
tool (its trainer-export.json lists what it wrote) is replaced with
--overwrite only. A training run's directory, a file, or a directory
holding anything else is refused (exit 2): export never removes what it
did not write. A model that cannot be exported is refused with one line
(exit 2).
"""

import json
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from trainer import errors  # noqa: E402
from trainer import export_dir as target  # noqa: E402
from trainer.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS

# Fields of the run's config.json that export's own flags may override.
OVERRIDABLE = ("data_dir", "file_patterns", "train_split")


def define_flags() -> None:
  """The command-line flags; only when run as a program, so that
  importing this module next to other absl programs is harmless."""
  flags.DEFINE_string("model_dir", None, "Training --model_dir: config.json "
                      "and checkpoints.")
  flags.DEFINE_string("export_dir", None, "Where to write the SavedModel: a "
                      "new or empty directory (see --overwrite). Its "
                      "serving_default signature "
                      "is the task's serving_signature: for classification "
                      "`images` (float32 [N,H,W,C] in [0,1]) -> "
                      "`probabilities`; otherwise the model's inputs and "
                      "outputs by name.")
  flags.DEFINE_string("checkpoint", "", "Checkpoint prefix (DIR/ckpt-N) or a "
                      "directory (e.g. DIR/best); default: the latest in "
                      "--model_dir.")
  flags.DEFINE_string("model", "", "A run whose task builds a dict of "
                      "models: the name of the one to export.")
  flags.DEFINE_bool("image_bytes", False, "Image tasks: serve `image_bytes` "
                    "(encoded JPEG/PNG, string [N]) decoded and preprocessed "
                    "as evaluation does.")
  flags.DEFINE_bool("overwrite", False, "Replace a previous export of this "
                    "tool at --export_dir (only if it holds nothing else). "
                    "A training run's directory, a file or any other "
                    "non-empty directory is never written over.")
  flags.DEFINE_bool("tflite", False, "Also write EXPORT_DIR/model.tflite.")
  flags.DEFINE_string("data_dir", None, "Override the run's --data_dir "
                      "(where the training data are now).")
  flags.DEFINE_string("file_patterns", None, "Override the run's "
                      "--file_patterns (--dataset=tfrecord).")
  flags.DEFINE_string("train_split", None, "Override the run's "
                      "--train_split (the split read for the input spec).")


def pick_model(model, name: str):
  """The model to export: the one model, or `name` of a dict of models."""
  if isinstance(model, dict):
    if name not in model:
      raise UserError(f"the task builds models {sorted(model)}: pick one with "
                      "--model=NAME.")
    return model[name]
  if name:
    raise UserError(f"--model={name!r}: the task builds one model, not a "
                    "dict of named models; drop --model.")
  return model


def signature_of(restored, model, image_bytes: bool):
  """(serving_default, extra signatures) for the restored run."""
  from trainer import serving
  signature = restored.task.serving_signature(model, restored.input_spec)
  if not isinstance(signature, serving.Signature):
    raise UserError(f"{type(restored.task).__name__}.serving_signature "
                    f"returned a {type(signature).__name__}, not a "
                    "trainer.serving.Signature.")
  if not image_bytes:
    return signature, {}
  source = restored.task.source(restored.config.train_split)
  return (serving.image_bytes_signature(restored.task, signature, source),
          {"features": signature})


def _write(model, endpoints: dict, directory: str) -> None:
  """The SavedModel of `endpoints`, each variable stored once."""
  import keras
  import tensorflow as tf
  # Keras' ExportArchive, not tf.saved_model.save on a tf.Module: with the
  # latter, a TF1-style session loader (`saved_model_cli run`) cannot find
  # the Keras 3 variables.
  archive = keras.export.ExportArchive()
  # archive.track(model) would list the keras.Variables, which SavedModel
  # stores apart from the tf.Variables the endpoints capture: every weight
  # twice. The archive's lists take the tf.Variables themselves (the same
  # objects, so stored once, and `.variables` works after loading), and a
  # plain tf.Module holding the model is tracked only for its lookup
  # tables and other resources.
  holder = tf.Module()
  holder.model = model
  archive.track(holder)
  for listed, of_model in ((archive.variables, model.variables),
                           (archive.trainable_variables,
                            model.trainable_variables),
                           (archive.non_trainable_variables,
                            model.non_trainable_variables)):
    listed.extend(v.value for v in of_model)
  for name, fn in endpoints.items():
    archive.add_endpoint(name, fn)
  archive.write_out(directory, verbose=False)


def tflite_bytes(model, signature) -> bytes:
  """The TFLite flatbuffer of `signature` (float inputs), as
  `serving_default`. Converted from a SavedModel: the converter freezes the
  Keras 3 variables there (from concrete functions it kept them as
  resource variables without values, and the interpreter returned NaN)."""
  import tensorflow as tf
  scratch = tempfile.mkdtemp(prefix="trainer-tflite-")
  try:
    _write(model, {"serving_default": signature.tf_function()}, scratch)
    converter = tf.lite.TFLiteConverter.from_saved_model(
        scratch, signature_keys=["serving_default"])
    try:
      return converter.convert()
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds
      why = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
      raise UserError(f"--tflite: the model has ops TFLite cannot convert "
                      f"({why}); export without --tflite.") from None
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def _spec_json(spec) -> dict:
  return {"dtype": spec.dtype.name, "shape": [None, *spec.shape.as_list()]}


def export(model_dir: str, export_dir: str, checkpoint: str = "",
           tflite: bool = False, image_bytes: bool = False,
           model_name: str = "", overwrite: bool = False,
           **overrides) -> dict:
  """Writes the SavedModel (and model.tflite); returns a summary dict.
  `export_dir` must be new or empty, or hold a previous export of this
  tool and `overwrite` be set (trainer.export_dir)."""
  export_dir = os.path.normpath(export_dir)
  target.check(export_dir, overwrite)
  from trainer import tfimport
  tf = tfimport.import_tensorflow()
  from trainer import load
  restored = load.restore(model_dir, checkpoint,
                          **{k: v for k, v in overrides.items()
                             if v is not None})
  model = pick_model(restored.model, model_name)
  signature, extra = signature_of(restored, model, image_bytes)
  try:
    serve = signature.tf_function()
    concrete = serve.get_concrete_function()
  except UserError:
    raise
  except (TypeError, ValueError, tf.errors.OpError) as e:
    raise UserError(f"the model cannot be traced for serving "
                    f"({type(e).__name__}: {errors.first_line(e, 200)}); "
                    "override "
                    "Task.serving_signature.") from None
  endpoints = {"serving_default": serve,
               **{k: s.tf_function() for k, s in extra.items()}}
  config = restored.config
  info = {"export_dir": export_dir, "checkpoint": restored.checkpoint,
          "step": _step_of(restored.checkpoint),
          "inputs": {n: _spec_json(s) for n, s in signature.inputs.items()},
          "outputs": {n: {"dtype": t.dtype.name,
                          "shape": t.shape.as_list()}
                      for n, t in concrete.structured_outputs.items()},
          "signatures": sorted(endpoints),
          "model": config.model, "dataset": config.dataset, "task": config.task}
  staging = target.staging_for(export_dir)
  try:
    _write(model, endpoints, staging)
    if tflite:
      float_signature = extra.get("features", signature)
      with open(os.path.join(staging, "model.tflite"), "wb") as f:
        f.write(tflite_bytes(model, float_signature))
      info["tflite"] = os.path.join(export_dir, "model.tflite")
    os.makedirs(os.path.join(staging, "assets.extra"), exist_ok=True)
    with open(os.path.join(staging, "assets.extra", "export.json"), "w") as f:
      json.dump(info, f, indent=2)
    target.seal(staging)
    target.replace(staging, export_dir, overwrite)
  finally:
    # Gone after a successful replace; the half-written export otherwise.
    shutil.rmtree(staging, ignore_errors=True)
  return info


def _step_of(path: str) -> int | None:
  from trainer import checkpoint as ckpt_lib
  number = ckpt_lib.number(path)
  return number if number >= 0 else None


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    errors.fail("trainer.export", f"{e}. See --helpfull.")


def main(argv):
  if len(argv) > 1:
    errors.fail("trainer.export", f"unexpected arguments {argv[1:]}; flags "
                "look like --name=value.")
  if not FLAGS.model_dir or not FLAGS.export_dir:
    errors.fail("trainer.export",
                "--model_dir and --export_dir are required.")
  overrides = {name: FLAGS[name].value for name in OVERRIDABLE
               if FLAGS[name].present}
  try:
    info = export(FLAGS.model_dir, FLAGS.export_dir, FLAGS.checkpoint,
                  FLAGS.tflite, FLAGS.image_bytes, FLAGS.model,
                  FLAGS.overwrite, **overrides)
  except UserError as e:
    errors.fail("trainer.export", str(e))
  print(json.dumps(info), flush=True)


def run():
  define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
