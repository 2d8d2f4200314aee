"""The package layout: modules import downward only (no import cycle), and an import inside a function says why."""
import ast
import os

import pytest

from conftest import REPO_ROOT
PACKAGES = ("meme_jax", "data_pipelines", "configs")


def _modules():
  """{dotted module name: path} of every module of the project's packages."""
  out = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(REPO_ROOT, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          dotted = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
          out[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
  return out


MODULES = _modules()


def _imports(path: str):
  """(imported project module, line, inside a function) for every import statement of the file."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
  nested = {id(n) for fn in functions for n in ast.walk(fn) if n is not fn}
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from package import module` imports the module when it is one.
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
               for a in node.names]
    for name in names:
      while name and name not in MODULES:
        name = name.rpartition(".")[0]
      yield name or None, node.lineno, id(node) in nested


def _graph():
  graph = {m: set() for m in MODULES}
  for module, path in MODULES.items():
    for target, _, _ in _imports(path):
      if target and target != module and not module.startswith(target + "."):
        graph[module].add(target)
  return graph


def test_the_layout_is_read_from_the_packages():
  assert {"meme_jax.train", "meme_jax.tasks", "meme_jax.topdown.task", "meme_jax.bottomup.grouping",
          "data_pipelines.topdown"} <= set(MODULES)
  assert "meme_jax.tasks" in _graph()["meme_jax.train"]


def test_no_import_cycle():
  graph = _graph()
  state, stack, cycles = {}, [], []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for target in sorted(graph[node]):
      if state.get(target) == "open":
        cycles.append(stack[stack.index(target):] + [target])
      elif target not in state:
        visit(target)
    stack.pop()
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module)
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_inside_functions_say_why(module):
  path = MODULES[module]
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  unexplained = []
  for _, line, inside in _imports(path):
    if not inside:
      continue
    # A reason is a comment on an import of the block (besides the linter's pragma) or a comment just above the
    # block (consecutive imports, possibly inside a `try:`).
    first = line - 1
    while first > 0 and lines[first - 1].strip().startswith(("import ", "from ", "try:")):
      first -= 1
    last = line - 1
    while last + 1 < len(lines) and lines[last + 1].strip().startswith(("import ", "from ")):
      last += 1
    comments = [l.partition("#")[2].replace("pylint: disable=import-outside-toplevel", "").strip(" ,#")
                for l in lines[first:last + 1]]
    if not any(comments) and not (first > 0 and lines[first - 1].strip().startswith("#")):
      unexplained.append(f"{os.path.relpath(path, REPO_ROOT)}:{line}: {lines[line - 1].strip()}")
  assert not unexplained, "imports inside functions without a reason:\n" + "\n".join(unexplained)
