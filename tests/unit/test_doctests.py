"""The `>>>` examples in the docstrings of trainer/ and layers/ run as
written: every module whose source holds one is collected."""

import doctest
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _modules_with_examples() -> list[str]:
  found = []
  for package in ("trainer", "layers"):
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for f in sorted(files):
        if not f.endswith(".py"):
          continue
        path = os.path.join(folder, f)
        with open(path, encoding="utf-8") as text:
          if ">>> " not in text.read():
            continue
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        # Programs that parse flags when imported as __main__ only.
        found.append(name.removesuffix(".__init__"))
  return sorted(found)


MODULES = _modules_with_examples()


def test_there_are_examples():
  assert {"trainer", "trainer.cli", "trainer.build", "trainer.config"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name}: no example ran"
  assert result.failed == 0, f"{name}: {result.failed} example(s) failed"
