"""The one exception type that means "the user gave us something wrong"."""


class UserError(Exception):
  """A problem the user can fix: bad flag values, missing files, a model_dir
  holding a different model. `trainer.main` prints str(error) as ONE line on
  stderr and exits 2; the message must name the problem and the fix."""
