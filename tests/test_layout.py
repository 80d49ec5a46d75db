"""The package's shape: imports point one way, and no module grows past a readable size.

The rules are the ones docs/DESIGN.md#import-rules states; this test reads every module's
`import` statements (deferred ones inside functions included) with `ast`, so a new upward
import fails here, not in review.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "jaxkd")
MAX_LINES = 420


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


MODULES = _modules()


def _imports(path: str) -> set[str]:
  """The jaxkd modules that the module at `path` imports."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      # `from jaxkd.data import spec` names an attribute: keep the longest module prefix.
      while name and name not in MODULES:
        name = name.rpartition(".")[0]
      if name.startswith("jaxkd.") or name == "jaxkd":
        found.add(name)
  return found


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _under(module: str, *prefixes: str) -> bool:
  return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_graph_is_read():
  assert "jaxkd.train.loop" in GRAPH and "jaxkd.objectives" in GRAPH["jaxkd.train.step"]
  assert "jaxkd.data" in GRAPH["jaxkd.train.loop"]


@pytest.mark.parametrize("module,allowed", [
    ("jaxkd._logits", ()),
    ("jaxkd.losses", ("jaxkd._logits",)),
    ("jaxkd.weighting", ("jaxkd._logits",)),
    ("jaxkd._lm_chunk", ()),
    ("jaxkd._lm_pass", ("jaxkd._lm_chunk",)),
    ("jaxkd.lm", ("jaxkd._lm_chunk", "jaxkd._lm_pass")),
    ("jaxkd.objectives", ("jaxkd.losses", "jaxkd.weighting")),
    ("jaxkd.optim", ()),
    ("jaxkd.sharding", ()),
    ("jaxkd.train.report", ()),
])
def test_pure_modules_import_only_what_they_may(module, allowed):
  assert GRAPH[module] <= set(allowed), GRAPH[module] - set(allowed)


@pytest.mark.parametrize("prefix,never", [
    ("jaxkd.losses", ("jaxkd.models", "jaxkd.data", "jaxkd.train", "jaxkd.config")),
    ("jaxkd.weighting", ("jaxkd.losses", "jaxkd.models", "jaxkd.data", "jaxkd.train")),
    ("jaxkd.objectives", ("jaxkd.models", "jaxkd.data", "jaxkd.train", "jaxkd.config")),
    ("jaxkd.data", ("jaxkd.train", "jaxkd.models", "jaxkd.config", "jaxkd.checkpoint")),
    ("jaxkd.models", ("jaxkd.data", "jaxkd.train", "jaxkd.config", "jaxkd.objectives")),
    ("jaxkd.train.step", ("jaxkd.data", "jaxkd.checkpoint", "jaxkd.config")),
    ("jaxkd.train.lm_step", ("jaxkd.data", "jaxkd.checkpoint", "jaxkd.config",
                             "jaxkd.lm_config")),
    ("jaxkd.lm_config", ("jaxkd.train", "jaxkd.suite", "jaxkd.main", "jaxkd.data")),
    ("jaxkd.config", ("jaxkd.train", "jaxkd.suite", "jaxkd.main")),
    ("jaxkd.checkpoint", ("jaxkd.train", "jaxkd.config", "jaxkd.data")),
])
def test_nothing_imports_upwards(prefix, never):
  for module, imports in GRAPH.items():
    if _under(module, prefix):
      bad = sorted(i for i in imports if _under(i, *never))
      assert not bad, f"{module} imports {bad}"


def test_the_config_enters_the_trainer_once():
  """Of the trainer's modules only the loops read configs (the image one `jaxkd.config`,
  the language-model one `jaxkd.lm_config`); the steps and reports do not."""
  readers = sorted((m, c) for m, imports in GRAPH.items() if _under(m, "jaxkd.train")
                   for c in ("jaxkd.config", "jaxkd.lm_config") if c in imports)
  assert readers == [("jaxkd.train.lm_loop", "jaxkd.lm_config"),
                     ("jaxkd.train.loop", "jaxkd.config")], readers


def test_no_import_cycles():
  state = {}

  def visit(module, path):
    state[module] = "open"
    for nxt in sorted(GRAPH[module]):
      if state.get(nxt) == "open":
        # A package's __init__ importing its own submodules is not a cycle back to it.
        cycle = path[path.index(nxt):] + [nxt] if nxt in path else [module, nxt]
        if not all(_under(m, nxt) for m in cycle):
          raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[module] = "done"

  for module in sorted(GRAPH):
    if module not in state:
      visit(module, [module])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_readable(module):
  lines = sum(1 for _ in open(MODULES[module]))
  assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines (> {MAX_LINES}): split it"


def test_the_step_loads_without_data_checkpoints_or_configs():
  """`import jaxkd.train.step` (what a benchmark needs) loads none of the trainer's I/O."""
  import subprocess
  import sys
  code = ("import sys, jaxkd.train.step; print(sorted(m for m in ('orbax.checkpoint', "
          "'grain', 'tensorflow_datasets', 'jaxkd.data', 'jaxkd.config', 'jaxkd.checkpoint') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", out.stdout
