"""The house's layering, read from the code's own imports: no import cycle
anywhere, and no module imports one from a layer above its own.

Layers, lowest first (a module may import its own layer and those below):
  leaves      config, errors, exitcodes, state, compat, layers/, ... :
              import nothing of the project above them
  parts       data/, task, step/, guard, checkpoint, summary, optim, ...:
              what a run is made of
  distribute  trainer/distribute/: strategies, clusters, watchdogs
  executors   trainer/executors/: how a chunk runs
  build       trainer/build.py: the composition root
  controller  trainer/controller.py, load: the outer loop and its users
  clis        main, export, plot, convert, cli, launch/, trainer/__init__
  bench       bench/: measures everything
Imports inside functions count: a lazy import is still a dependency.

And the whole Config stays at the top: only trainer.config (where it is
defined), the CLIs, trainer.build (the composition root, which cuts it into
each part's narrow settings) and trainer.saved_config (config.json -> Config)
import it or take it as a parameter. The one exception is the user
contract: a Task is made from the run's Config (Task.__init__, and
ClassificationTask.__init__, which user tasks subclass).
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
PACKAGES = ("trainer", "launch", "layers", "bench")
ORDER = ("leaves", "parts", "distribute", "executors", "build", "controller",
         "clis", "bench")

# Module (dotted) or package prefix -> layer; the longest match wins.
LAYERS = {
    "layers": "leaves",
    "trainer.config": "leaves",
    "trainer.errors": "leaves",
    "trainer.exitcodes": "leaves",
    "trainer.state": "leaves",
    "trainer.compat": "leaves",
    "trainer.cpuinfo": "leaves",
    "trainer.tfimport": "leaves",
    "trainer.plugins": "leaves",
    "trainer.precision": "leaves",
    "trainer.distribute.role": "leaves",
    "trainer.distribute.net": "leaves",
    "trainer": "parts",
    "trainer.distribute": "distribute",
    "trainer.executors": "executors",
    "trainer.build": "build",
    "trainer.saved_config": "build",
    "trainer.controller": "controller",
    "trainer.load": "controller",
    "trainer.main": "clis",
    "trainer.cli": "clis",
    "trainer.export": "clis",
    "trainer.plot": "clis",
    "trainer.convert": "clis",
    "trainer.__init__": "clis",
    "launch": "clis",
    "bench": "bench",
}


def layer_of(module: str) -> str:
  parts = module.split(".")
  for n in range(len(parts), 0, -1):
    name = ".".join(parts[:n])
    if name in LAYERS:
      return LAYERS[name]
  raise KeyError(module)


def _modules(root: str) -> dict[str, str]:
  """dotted name -> file, for every .py file of the measured packages."""
  found = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(root, package)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(folder, f), root)[:-3]
          name = rel.replace(os.sep, ".")
          found[name] = os.path.join(folder, f)
  return found


def _resolve(name: str, modules: dict) -> str | None:
  """The project module an imported dotted name lands in, if any."""
  while name:
    if name in modules:
      return name
    if name + ".__init__" in modules:
      return name + ".__init__"
    name = name.rpartition(".")[0]
  return None


def imports(root: str = ROOT) -> dict[str, set[str]]:
  """module -> the project modules it imports (anywhere in the file)."""
  modules = _modules(root)
  graph = {}
  for name, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    package = name.rpartition(".")[0] if not name.endswith(
        "__init__") else name[:-len(".__init__")]
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")
          up = up[:len(up) - (node.level - 1)]
          base = ".".join(up + ([base] if base else []))
        names = [f"{base}.{a.name}" for a in node.names] + [base]
      else:
        continue
      for imported in names:
        target = _resolve(imported, modules)
        if target and target != name:
          targets.add(target)
    # `from trainer.data import pipeline` names both trainer.data (its
    # __init__) and the module: keep the module, drop the bare package.
    for t in list(targets):
      if t.endswith(".__init__") and any(
          o.startswith(t[:-len("__init__")]) and o != t for o in targets):
        targets.discard(t)
    graph[name] = targets
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, on_stack, stack, found = {}, {}, set(), [], []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def upward(graph: dict[str, set[str]]) -> list[str]:
  """'a (layer) -> b (higher layer)' for every import that runs up."""
  bad = []
  for module, targets in sorted(graph.items()):
    mine = ORDER.index(layer_of(module))
    for target in sorted(targets):
      theirs = ORDER.index(layer_of(target))
      if theirs > mine:
        bad.append(f"{module} ({ORDER[mine]}) -> {target} ({ORDER[theirs]})")
  return bad


def test_no_import_cycle():
  found = cycles(imports())
  assert not found, "import cycles: " + "; ".join(" <-> ".join(c)
                                                  for c in found)


def test_no_import_runs_up_a_layer():
  bad = upward(imports())
  assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
  for module in imports():
    assert layer_of(module) in ORDER


# Modules that may hold the whole Config, besides every CLI and bench module.
CONFIG_HOLDERS = {"trainer.config", "trainer.build", "trainer.saved_config"}
# The user contract: a Task is made from the run's Config.
CONFIG_CONTRACT = {"trainer.task": {"Task.__init__",
                                    "ClassificationTask.__init__"}}


def _holds_config(module: str) -> bool:
  return module in CONFIG_HOLDERS or layer_of(module) in ("clis", "bench")


def _names_config(node) -> bool:
  """An annotation that is the Config: `Config`, `x.Config`, "Config"."""
  if isinstance(node, ast.Name):
    return node.id == "Config"
  if isinstance(node, ast.Attribute):
    return node.attr == "Config"
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return node.value.split(".")[-1].strip() == "Config"
  if isinstance(node, ast.BinOp):   # Config | None
    return _names_config(node.left) or _names_config(node.right)
  if isinstance(node, ast.Subscript):   # Optional[Config]
    return _names_config(node.slice)
  return False


def config_takers(root: str = ROOT) -> list[str]:
  """'module: what' for every place below the top that imports the
  Config or names a parameter of type Config."""
  found = []
  for name, path in sorted(_modules(root).items()):
    if _holds_config(name):
      continue
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    allowed = CONFIG_CONTRACT.get(name, set())
    # Below build a parameter is not even named `config` (an unannotated
    # one would hide the whole Config): it is named for what it is.
    below = ORDER.index(layer_of(name)) < ORDER.index("build")
    # module aliases of trainer.config (`from trainer import config as c`)
    aliases = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module in (
          "trainer.config", "config") and any(
              a.name == "Config" for a in node.names) and not allowed:
        found.append(f"{name}: imports Config (line {node.lineno})")
      if isinstance(node, ast.ImportFrom) and node.module == "trainer":
        aliases |= {a.asname or a.name for a in node.names
                    if a.name == "config"}
      if isinstance(node, ast.Import):
        aliases |= {a.asname for a in node.names
                    if a.name == "trainer.config" and a.asname}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr == "Config" and
          isinstance(node.value, ast.Name) and node.value.id in aliases):
        found.append(f"{name}: uses {node.value.id}.Config (line "
                     f"{node.lineno})")

    def visit(node, prefix):
      for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
          visit(child, f"{prefix}{child.name}.")
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
          qualified = f"{prefix}{child.name}"
          args = child.args
          for arg in (args.posonlyargs + args.args + args.kwonlyargs +
                      [a for a in (args.vararg, args.kwarg) if a]):
            if qualified in allowed:
              continue
            if (arg.annotation is not None and
                _names_config(arg.annotation)):
              found.append(f"{name}: {qualified}({arg.arg}: Config)")
            elif below and arg.arg == "config":
              found.append(f"{name}: {qualified}(config)")
          visit(child, f"{qualified}.")
        else:
          visit(child, prefix)
    visit(tree, "")
  return found


def test_only_the_top_takes_the_whole_config():
  found = config_takers()
  assert not found, ("the whole Config below trainer.build (give the part a "
                     "narrow settings dataclass made in trainer/build.py, "
                     "see config.narrow):\n" + "\n".join(found))


@pytest.fixture
def tree_with(tmp_path):
  """A copy of the measured packages with one file's text appended to."""
  import shutil

  made = []

  def make(rel: str, extra: str) -> str:
    made.append(None)
    root = tmp_path / f"tree{len(made)}"
    for package in PACKAGES:
      shutil.copytree(os.path.join(ROOT, package), root / package,
                      ignore=shutil.ignore_patterns("__pycache__"))
    with open(root / rel, "a", encoding="utf-8") as f:
      f.write(extra)
    return str(root)
  return make


def test_the_checks_see_an_upward_import_and_a_cycle(tree_with):
  root = tree_with("trainer/guard.py",
                   "\n\ndef _late():\n  from trainer import controller\n")
  graph = imports(root)
  assert "trainer.guard (parts) -> trainer.controller (controller)" in \
      upward(graph)
  # controller imports guard: the added import closes a cycle.
  assert any({"trainer.guard", "trainer.controller"} <= set(c)
             for c in cycles(graph))


def test_the_config_check_sees_an_import_and_a_parameter(tree_with):
  root = tree_with("trainer/guard.py",
                   "\n\nfrom trainer.config import Config\n\n"
                   "class _Late:\n"
                   "  def run(self, config: Config | None = None):\n"
                   "    del config\n")
  for rel, extra in (
      ("trainer/data/__init__.py", "def _late(split, config):\n  pass\n"),
      # The user contract's constructors only.
      ("trainer/task.py", "def _late(config: 'Config'):\n  pass\n")):
    with open(os.path.join(root, rel), "a", encoding="utf-8") as f:
      f.write("\n\n" + extra)
  found = config_takers(root)
  assert [f for f in found if not f.startswith("trainer.guard: imports")] \
      == ["trainer.data.__init__: _late(config)",
          "trainer.guard: _Late.run(config: Config)",
          "trainer.task: _late(config: Config)"]
  assert any(f.startswith("trainer.guard: imports Config") for f in found)
