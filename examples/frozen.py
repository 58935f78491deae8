"""A frozen model from an earlier run, for the distillation teacher and the
SimCLR linear probe's encoder: trainer.load (the run's own config.json, its
latest checkpoint, the moving average if the run kept one), then
trainable=False.

Called in build_model, the earlier run is needed only when this one starts
training: its config.json is recorded in this run's bases/, and every later
build (a resume, --mode=eval, trainer.load, trainer.export) takes the
architecture from that record and the weights from this run's checkpoint.
"""

from trainer.errors import UserError


def load(run_dir: str, input_spec, dataset: str, flag: str):
  """The main model ("model", or the only one) of the run in `run_dir`.
  `flag`: how the user named run_dir (for the error lines). Refuses a run
  on another dataset or a checkpoint that does not hold the weights."""
  from trainer import load as load_lib
  try:
    restored = load_lib.restore(run_dir)
  except UserError as e:
    raise UserError(f"{flag}={run_dir}: {e}") from None
  if restored.config.dataset != dataset:
    raise UserError(f"the run in {run_dir} was trained on --dataset="
                    f"{restored.config.dataset}, not {dataset}; use the same "
                    "dataset.")
  model = restored.model
  if isinstance(model, dict):
    if "model" not in model:
      raise UserError(f"the run in {run_dir} has models {sorted(model)} and "
                      "none is named 'model'.")
    model = model["model"]
  inputs = getattr(model, "inputs", None)
  if inputs and tuple(inputs[0].shape[1:]) != tuple(input_spec.shape):
    raise UserError(f"the run in {run_dir} takes inputs of shape "
                    f"{tuple(inputs[0].shape[1:])}, not "
                    f"{tuple(input_spec.shape)}.")
  model.trainable = False
  return model
