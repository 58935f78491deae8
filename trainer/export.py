"""`python -m trainer.export`: a training checkpoint -> SavedModel (+ TFLite).

  python -m trainer.export --model_dir=DIR --export_dir=OUT \\
      [--checkpoint=PATH] [--data_dir=PATH] [--signatures=a,b] \\
      [--image_bytes] [--tflite] [--overwrite]

The task and model are rebuilt from DIR/config.json (trainer.load), with
the checkpoint's weights: the latest in DIR, or --checkpoint (a prefix such
as DIR/ckpt-600, or a directory such as DIR/best, whose latest one is used).
Flags given here override only what they name (--data_dir, --file_patterns
when the data moved; the data are read for the input spec and class count).

Signatures: the Task's `serving_signatures` hook, by name (--signatures=a,b
picks some; default all); its default is {"serving_default": the
`serving_signature` hook}, which gives:
  - ClassificationTask (the built-in datasets): input `images`, float32
    [N, H, W, C] as the model sees them after preprocess (uint8 pixels / 255),
    output `probabilities` [N, classes] (softmax of the logits);
  - any other task: every model input by name (`features` for one tensor,
    the keys of a dict of features), the model's outputs under their names
    (the keys of a dict, or the Keras output layer's name).
A SavedModel always answers to serving_default (TF Serving's default):
without it among --signatures, the first one chosen serves under that name
too. OUT/assets.extra/export.json describes the export: the run's task, the
checkpoint and step, EMA or raw weights, every signature's inputs and
outputs.
--image_bytes (image tasks): serving_default takes `image_bytes`, a string
[N] of encoded JPEG/PNG/GIF/BMP files of any size and channel count,
decoded, resized and preprocessed as evaluation does; a second signature
`features` keeps the float input. The export computes in float32 whatever
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
import re
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import flags  # noqa: E402

from trainer import cli  # noqa: E402
from trainer import export_dir as target  # noqa: E402
from trainer.errors import UserError, first_line  # noqa: E402

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
  flags.DEFINE_list("signatures", [], "Names of the task's "
                    "serving_signatures to export (default: all of them; "
                    "the built-in tasks have one, serving_default).")
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


def signatures_of(restored, model, image_bytes: bool,
                  wanted: list[str] | None = None) -> dict:
  """{name: trainer.serving.Signature} to export: the task's
  serving_signatures, those named in `wanted` (all when empty), and with
  `image_bytes` serving_default taking encoded images (its float version
  kept as `features`)."""
  from trainer import serving, serving_images
  task = restored.task
  hook = f"{type(task).__name__}.serving_signatures"
  found = task.serving_signatures(model, restored.input_spec)
  if not isinstance(found, dict) or not found:
    raise UserError(f"{hook} returned {type(found).__name__}, not a "
                    "non-empty dict {name: trainer.serving.Signature}.")
  for name, signature in found.items():
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w*", name):
      raise UserError(f"{hook}: signature name {name!r} must be letters, "
                      "digits and '_', not starting with a digit.")
    if not isinstance(signature, serving.Signature):
      raise UserError(f"{hook}[{name!r}] is a {type(signature).__name__}, "
                      "not a trainer.serving.Signature.")
  if wanted:
    unknown = [n for n in wanted if n not in found]
    if unknown:
      raise UserError(f"--signatures: the task has no signature "
                      f"{', '.join(map(repr, unknown))}; it has "
                      f"{', '.join(found)}.")
    found = {n: found[n] for n in dict.fromkeys(wanted)}
  if not image_bytes:
    return found
  if "serving_default" not in found:
    raise UserError("--image_bytes serves serving_default from encoded "
                    "images: include serving_default in --signatures.")
  if "features" in found:
    raise UserError("--image_bytes names the float signature `features`, "
                    "which the task already uses: leave out --image_bytes "
                    "or that signature (--signatures).")
  plain = found["serving_default"]
  source = task.source(restored.config.train_split)
  return {**found,
          "serving_default": serving_images.image_bytes_signature(task, plain,
                                                           source),
          "features": plain}


def _traced(signatures: dict) -> dict:
  """{name: tf.function} with each traced once: a model that cannot be
  traced is refused here, with one line."""
  import tensorflow as tf
  functions = {}
  for name, signature in signatures.items():
    try:
      functions[name] = signature.tf_function()
      functions[name].get_concrete_function()
    except UserError:
      raise
    except (TypeError, ValueError, tf.errors.OpError) as e:
      raise UserError(f"signature {name!r} cannot be traced for serving "
                      f"({type(e).__name__}: {first_line(e, 200)}); "
                      "override Task.serving_signatures.") from None
  return functions


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


def _outputs_json(function) -> dict:
  outputs = function.get_concrete_function().structured_outputs
  return {n: {"dtype": t.dtype.name, "shape": t.shape.as_list()}
          for n, t in outputs.items()}


def describe(restored, signatures: dict, functions: dict, model_name: str,
             image_bytes: bool) -> dict:
  """What export.json says of the export: the run's task as trained (its
  import path and --task_args, or the built-in one's model and data), the
  checkpoint and step, which weights, and every signature's inputs and
  outputs. The SavedModel answers to serving_default always (TF Serving
  needs one): when it is not among the signatures, the first one serves
  under that name too."""
  config = restored.config
  if config.task:
    task = {"task": config.task, "task_args": config.task_args}
  else:
    task = {"task": "classification", "model": config.model,
            "dataset": config.dataset, "image_size": config.image_size}
  described = {name: {"inputs": {n: _spec_json(s)
                                 for n, s in signature.inputs.items()},
                      "outputs": _outputs_json(functions[name])}
               for name, signature in signatures.items()}
  default = ("serving_default" if "serving_default" in signatures
             else next(iter(signatures)))
  if default != "serving_default":
    described["serving_default"] = {**described[default],
                                    "same_as": default}
  return {**task, "model_name": model_name or None,
          "checkpoint": restored.checkpoint,
          "step": _step_of(restored.checkpoint),
          "weights": restored.weights, "ema_decay": config.ema_decay,
          "image_bytes": image_bytes,
          "inputs": described["serving_default"]["inputs"],
          "outputs": described["serving_default"]["outputs"],
          "signatures": described}


def export(model_dir: str, export_dir: str, checkpoint: str = "",
           tflite: bool = False, image_bytes: bool = False,
           model_name: str = "", overwrite: bool = False,
           signatures: list[str] | None = None, **overrides) -> dict:
  """Writes the SavedModel (and model.tflite); returns what export.json
  says. `export_dir` must be new or empty, or hold a previous export of
  this tool and `overwrite` be set (trainer.export_dir). `signatures`:
  the names of Task.serving_signatures to export (default: all)."""
  export_dir = os.path.normpath(export_dir)
  target.check(export_dir, overwrite)
  from trainer import tfimport
  tfimport.import_tensorflow()
  from trainer import load
  restored = load.restore(model_dir, checkpoint,
                          **{k: v for k, v in overrides.items()
                             if v is not None})
  model = pick_model(restored.model, model_name)
  chosen = signatures_of(restored, model, image_bytes, signatures)
  functions = _traced(chosen)
  info = {"export_dir": export_dir,
          **describe(restored, chosen, functions, model_name, image_bytes)}
  staging = target.staging_for(export_dir)
  try:
    _write(model, functions, staging)
    if tflite:
      # Float inputs: the signature image_bytes wraps, else the default.
      float_signature = chosen["features"] if image_bytes else chosen.get(
          "serving_default", next(iter(chosen.values())))
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


def main() -> None:
  if not FLAGS.model_dir or not FLAGS.export_dir:
    raise UserError("--model_dir and --export_dir are required.")
  overrides = {name: FLAGS[name].value for name in OVERRIDABLE
               if FLAGS[name].present}
  info = export(FLAGS.model_dir, FLAGS.export_dir, FLAGS.checkpoint,
                FLAGS.tflite, FLAGS.image_bytes, FLAGS.model,
                FLAGS.overwrite, FLAGS.signatures, **overrides)
  print(json.dumps(info), flush=True)


def run():
  cli.run("trainer.export", main, define_flags)


if __name__ == "__main__":
  run()
