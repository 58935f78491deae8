"""The docs agree with the code: README.md stays a front door, every relative
link resolves, every flag and module a command names exists, every
trainer.main command line passes the CLI's own flag checks, the exit code
tables match trainer/exitcodes.py, and no page narrates history by issue
number or session.

Flags are collected without importing TensorFlow: trainer.main's are the
Config fields (trainer.config.define_flags defines one flag per field); the
other CLIs' are read from their `DEFINE_*("name", ...)` and
`add_argument("--name", ...)` calls in trainer/, launch/ and bench/.
"""

import ast
import dataclasses
import functools
import importlib.util
import pathlib
import re
import shlex

import pytest
from absl import flags

from trainer import config
from trainer.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BENCH_README = REPO / "bench" / "README.md"
MAX_README_LINES = 300

# Programs whose own flags the docs quote; their command lines are not ours.
FOREIGN = {"tensorboard", "saved_model_cli", "kubectl", "sbatch", "pip",
           "make", "git"}
# Flags every absl program has (app.run defines the help flags).
ABSL_BUILTIN = {"help", "helpshort", "helpfull", "helpxml", "flagfile",
                "undefok"}

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z]\w*)")
MODULE = re.compile(r"(?:^|\s)(?:\S*/)?python3?\s+-m\s+([\w.]+)")
SCRIPT = re.compile(r"(?:^|\s)(?:\S*/)?python3?\s+([\w./-]+\.py)\b")
HISTORY = re.compile(
    r"\bissues?\s*#?\s*\d+|\b(?:first|second|third|fourth|fifth|sixth|"
    r"seventh|eighth|ninth|tenth|this|last|previous|earlier|next)\s+"
    r"session\b", re.I)


def doc_pages():
  """README.md, every page of docs/ and bench/README.md."""
  return [README, *sorted((REPO / "docs").glob("*.md")), BENCH_README]


def page_id(page):
  return str(page.relative_to(REPO))


def code_blocks(text):
  """(language, body) of every fenced block."""
  return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def shell_lines(text):
  """Command lines of the shell blocks (no language, sh, bash, console),
  with backslash continuations joined."""
  lines = []
  for language, body in code_blocks(text):
    if language not in ("", "sh", "bash", "shell", "console"):
      continue
    body = body.replace("\\\n", " ")
    lines += [line.split("  #")[0] for line in body.splitlines()
              if line.strip()]
  return lines


def inline_spans(text):
  """Backticked spans outside fenced blocks."""
  return INLINE.findall(FENCE.sub("", text))


def slug(heading):
  """GitHub's anchor for a heading."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def anchors(path):
  text = FENCE.sub("", path.read_text())
  return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def _defined_in_source(path):
  """Flag names a module defines: DEFINE_*("name", ...) and
  add_argument("--name", ...) calls with a literal name."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if not (isinstance(node, ast.Call) and node.args and
            isinstance(node.args[0], ast.Constant) and
            isinstance(node.args[0].value, str)):
      continue
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(
        func, "id", "")
    value = node.args[0].value
    if called.startswith("DEFINE_"):
      names.add(value)
    elif called == "add_argument" and value.startswith("--"):
      names.add(value[2:])
  return names


def absl_flags():
  """absl's own flags (help, logging) that every absl CLI accepts."""
  import absl.logging  # noqa: F401  (defines --verbosity, --logtostderr, ...)
  names = set(ABSL_BUILTIN)
  for module, defined in flags.FLAGS.flags_by_module_dict().items():
    if module.startswith("absl."):
      names |= {f.name for f in defined}
  return names


@pytest.fixture(scope="module")
def cli_flags():
  """{"trainer.main": its flags, "*": every flag any CLI defines}."""
  main = {f.name for f in dataclasses.fields(config.Config)} | absl_flags()
  everything = set(main)
  for package in ("trainer", "launch", "bench"):
    for path in (REPO / package).rglob("*.py"):
      everything |= _defined_in_source(path)
  return {"trainer.main": main, "*": everything}


def unknown_flags(command, cli_flags):
  """The --flags of one command line (or backticked span) that the program
  it runs does not define. Flags after `python -m trainer.main` (or after a
  launcher's `--`, which hands them to its --trainer_module) must be
  trainer.main's; the others must be defined by some CLI."""
  words = command.split()
  while words and re.fullmatch(r"\w+=\S*", words[0]):   # VAR=value prefix
    words = words[1:]
  if words and words[0].rsplit("/", 1)[-1] in FOREIGN:
    return []
  unknown, module, trainer_module = [], None, "trainer.main"
  for i, word in enumerate(words):
    if word == "-m" and i + 1 < len(words):
      module = words[i + 1]
      continue
    if word == "--" and module and module.startswith("launch."):
      module = trainer_module
      continue
    for name in FLAG.findall(word):
      if module and module.startswith("launch.") and name == "trainer_module":
        trainer_module = word.split("=", 1)[1].strip("[]")
      known = cli_flags.get(module, cli_flags["*"])
      if name not in known and not (name.startswith("no") and
                                    name[2:] in known):
        unknown.append(f"--{name}")
  return unknown


def test_readme_is_a_front_door():
  lines = README.read_text().count("\n")
  assert lines <= MAX_README_LINES, (
      f"README.md has {lines} lines; move detail into docs/ "
      f"(at most {MAX_README_LINES})")


@pytest.mark.parametrize("page", doc_pages(), ids=page_id)
def test_relative_links_resolve(page):
  broken = []
  for target in LINK.findall(page.read_text()):
    if re.match(r"[a-z]+:", target):        # http:, https:, mailto:
      continue
    path_part, _, anchor = target.partition("#")
    path = (page.parent / path_part).resolve() if path_part else page
    if not path.exists():
      broken.append(f"{target}: no such file")
    elif anchor and path.suffix == ".md" and anchor not in anchors(path):
      broken.append(f"{target}: no heading #{anchor} in {path.name}")
  assert not broken, f"{page.relative_to(REPO)}: {broken}"


@pytest.mark.parametrize("page", doc_pages(), ids=page_id)
def test_named_flags_exist(page, cli_flags):
  text = page.read_text()
  unknown = {}
  for command in shell_lines(text) + inline_spans(text):
    for flag in unknown_flags(command, cli_flags):
      unknown.setdefault(flag, command.strip()[:80])
  assert not unknown, (
      f"{page.relative_to(REPO)} names flags no CLI defines: {unknown}")


@pytest.mark.parametrize("page", doc_pages(), ids=page_id)
def test_commands_name_existing_modules_and_scripts(page):
  text = page.read_text()
  commands = shell_lines(text) + inline_spans(text)
  missing = set()
  for command in commands:
    missing |= {m for m in MODULE.findall(command)
                if importlib.util.find_spec(m) is None}
    missing |= {s for s in SCRIPT.findall(command)
                if not (REPO / s).exists() and "/" in s}
  assert not missing, (
      f"{page.relative_to(REPO)} runs modules or scripts that do not "
      f"exist: {sorted(missing)}")


@pytest.mark.parametrize("page", doc_pages(), ids=page_id)
def test_no_history_in_docs(page):
  found = sorted({m.group(0) for m in HISTORY.finditer(page.read_text())})
  assert not found, (
      f"{page.relative_to(REPO)} narrates history ({found}): say what is "
      "and why, not when it changed")


# A value that stands for the reader's own (DIR, S, NAME|local): not parsed.
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(?:\|.*)?|.*\.\.\.")


def trainer_main_args(command):
  """The trainer.main flags of a command line (after `python -m
  trainer.main`, or after a launcher's `--` when it runs trainer.main),
  without placeholder values; None if it runs no trainer.main or asks for
  its help."""
  try:
    words = shlex.split(command, comments=True)
  except ValueError:
    return None
  args, module = None, None
  for i, word in enumerate(words):
    if word == "-m" and i + 1 < len(words):
      module = words[i + 1]
      if module == "trainer.main":
        args = []
    elif word == "--" and module and module.startswith("launch."):
      module = "trainer.main" if not any(
          w.startswith("--trainer_module=") for w in words[:i]) else None
      args = [] if module else args
    elif word.startswith("--trainer_module=") and args is not None:
      args = None
    elif args is not None and module == "trainer.main" and \
        word.startswith("--"):
      name, _, value = word[2:].partition("=")
      if name in ABSL_BUILTIN:          # --helpfull: prints, parses nothing
        return None
      if not (value and PLACEHOLDER.fullmatch(value)):
        args.append(word)
  return args


@pytest.fixture(scope="module")
def trainer_flag_values():
  """trainer.main's flags, defined by trainer.config.define_flags itself
  into a fresh FlagValues (absl's global FLAGS is left alone)."""
  fresh = flags.FlagValues()

  class Into:
    def __getattr__(self, name):
      return functools.partial(getattr(flags, name), flag_values=fresh)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(config, "flags", Into())
    config.define_flags()
  return fresh


def config_error(args, flag_values):
  """None if trainer.main's flag parsing and checks accept args, else the
  error they give."""
  flag_values.unparse_flags()
  try:
    flag_values(["trainer.main", *args])
    config.validate(config.from_flags(flag_values))
  except (flags.Error, UserError) as e:
    return str(e)
  finally:
    flag_values.unparse_flags()
  return None


@pytest.mark.parametrize("page", doc_pages(), ids=page_id)
def test_trainer_commands_pass_the_flag_checks(page, trainer_flag_values):
  text = page.read_text()
  refused = {}
  for command in shell_lines(text) + inline_spans(text):
    args = trainer_main_args(command)
    if args is None:
      continue
    error = config_error(args, trainer_flag_values)
    if error:
      refused[command.strip()[:100]] = error
  assert not refused, (
      f"{page_id(page)}: trainer.main would refuse: {refused}")


def test_flag_check_catches_a_bogus_flag(cli_flags):
  """The checker itself: a flag no CLI defines is reported, per program."""
  assert unknown_flags("python -m trainer.main --bogus_flag=1",
                       cli_flags) == ["--bogus_flag"]
  # launch.local's own flag, given to the trainer after the `--`.
  assert unknown_flags("python -m launch.local --workers=2 -- --workers=2",
                       cli_flags) == ["--workers"]
  assert unknown_flags(
      "python -m launch.local --workers=2 --trainer_module=bench.paired -- "
      "--strategy=multiworker --batch=128", cli_flags) == []
  assert unknown_flags("tensorboard --logdir runs/", cli_flags) == []


def test_command_check_catches_a_refused_command(trainer_flag_values):
  """The checker itself: what trainer.main refuses is reported."""
  def error(command):
    return config_error(trainer_main_args(command), trainer_flag_values)
  assert error("python -m trainer.main --optimizer=nadam") and \
      "--optimizer='nadam'" in error("python -m trainer.main --optimizer=nadam")
  assert error("python -m launch.local --workers=2 -- --strategy=multiworker "
               "--cpu_replicas=2")
  assert error("python -m trainer.main --seed=S --data_dir=DIR") is None
  assert error("python -m trainer.main --global_batch_size=30 "
               "--grad_accum_steps=4")


def exit_code_rows(page):
  """{code: the row's other cells} of the table under a page's "Exit codes"
  heading."""
  text = page.read_text()
  section = re.split(r"^#+ Exit codes\s*$", text, flags=re.M)[1]
  section = re.split(r"^#", section, flags=re.M)[0]
  return {int(m.group(1)): [c.strip() for c in m.group(2).split(" | ")]
          for m in re.finditer(r"^\| (\d+) \| (.*) \|$", section, re.M)}


@pytest.mark.parametrize("page", [README, REPO / "docs" / "reliability.md"],
                         ids=page_id)
def test_exit_code_tables_list_every_code(page):
  from trainer import exitcodes
  assert sorted(exit_code_rows(page)) == sorted(exitcodes.MEANINGS), (
      f"{page_id(page)}'s exit code table and trainer/exitcodes.py differ")


def test_restart_column_follows_the_launcher_rule():
  """reliability.md says which codes launch.local --max_restarts restarts:
  exactly those outside exitcodes.NOT_RETRYABLE (0 is "done")."""
  from trainer import exitcodes
  rows = exit_code_rows(REPO / "docs" / "reliability.md")
  for code, cells in rows.items():
    restart = cells[-1]
    if code == exitcodes.TIMEOUT:
      continue                       # the launcher's own code, never a child's
    if code == exitcodes.OK:
      assert restart == "done"
    elif code in exitcodes.NOT_RETRYABLE:
      assert restart.startswith("not restarted"), (code, restart)
    else:
      assert restart == "restarted", (code, restart)
