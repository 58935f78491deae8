"""Loads user code named 'package.module:attribute' (--task, --model)."""

import importlib

from trainer.errors import UserError


def load(path: str, flag: str):
  """Imports the module and returns the attribute, or raises UserError."""
  module_name, sep, attribute = path.partition(":")
  if not sep or not module_name or not attribute:
    raise UserError(f"--{flag}={path!r} must look like 'package.module:Name'.")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # any import-time failure is the user's to fix
    raise UserError(f"--{flag}={path!r}: cannot import {module_name!r} "
                    f"({type(e).__name__}: {e}); check the module is on "
                    "PYTHONPATH.") from None
  obj = module
  for part in attribute.split("."):
    if not hasattr(obj, part):
      raise UserError(f"--{flag}={path!r}: module {module_name!r} has no "
                      f"attribute {attribute!r}.")
    obj = getattr(obj, part)
  return obj
