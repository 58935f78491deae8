"""Command-line plumbing shared by the launch tools: absl flags, one-line usage errors, exit 2."""

import sys

from absl import app
from absl import flags

from launch import codes

_HELP = ("--help", "-help", "--helpshort", "-h", "--helpfull")


def usage_error(flag, value, rule):
  """Returns an app.UsageError saying which flag had which value and the rule it broke."""
  return app.UsageError(f"--{flag}={value} is invalid: {rule}")


def check(ok, flag, value, rule):
  """Raises usage_error(flag, value, rule) unless ok."""
  if not ok:
    raise usage_error(flag, value, rule)


def parse(prog, define, argv):
  """Parses argv[1:] up to '--' into fresh FlagValues; returns (flags, args after '--').

  Own FlagValues (not absl's global FLAGS): launch tools can be imported side by side (tests,
  the trainer) without duplicate flag definitions.
  """
  fv = flags.FlagValues()
  define(fv)
  args = list(argv[1:])
  split = args.index("--") if "--" in args else len(args)
  head, tail = args[:split], args[split + 1:]
  if any(a in _HELP for a in head):
    print(f"usage: python -m {prog} [flags] -- <trainer.main flags>\n\n{fv.get_help()}")
    sys.exit(0)
  try:
    rest = fv([prog] + head)[1:]
  except flags.UnrecognizedFlagError as e:
    raise app.UsageError(f"{e} (trainer flags go after a '--')") from None
  except flags.Error as e:
    raise app.UsageError(str(e)) from None
  if rest:
    raise app.UsageError(f"unexpected argument {rest[0]!r} (trainer flags go after a '--')")
  return fv, tail


def main(prog, body):
  """Runs body(sys.argv) -> exit code; a UsageError becomes one stderr line and exit 2."""
  try:
    code = body(sys.argv)
  except app.UsageError as e:
    message = " ".join(str(e).split())  # one line, whatever absl put in it
    print(f"{prog}: {message}", file=sys.stderr)
    code = codes.USAGE
  sys.exit(code)
