"""The package's layering, import placement and size limits, read from the source itself.

Layers, lowest first: core → data → generation → rewards → train → evaluation → stages →
main. A module imports only from its own layer or lower ones, so the shared core never
imports a stage and data flows one way. Imports sit at module top; the few function-level
ones are listed here with the reason each is deferred.
"""

import ast
import time
from pathlib import Path

import pytest

from r1jax import stages

PACKAGE = Path(__file__).resolve().parents[1] / "r1jax"
LAYERS = ["core", "data", "generation", "rewards", "train", "evaluation", "stages", "main"]
# (module, imported module) -> why the import is deferred to the function that needs it.
DEFERRED = {
    ("core/weights.py", "r1jax.core"): "core/hf.py needs the optional 'hf' extra (safetensors)",
    ("core/tokenizer.py", "tokenizers"): "optional 'hf' extra: only HF tokenizer folders",
    ("data/rows.py", "pyarrow.parquet"): "optional: only parquet inputs need pyarrow",
    ("rewards/math.py", "math_verify"): "pulls in sympy (~1 s): cheap callers should not pay",
}


def modules():
  return sorted(p for p in PACKAGE.rglob("*.py"))


def source(path: Path) -> str:
  """The file's text as one consistent version: read again while it changes under us.

  An editor (or a checkout) that rewrites a module while the suite runs truncates it first;
  a plain read at that moment sees half a file and fails a layout test falsely. The read
  counts only when the file's inode, size and mtime are the same before and after it.
  """
  for _ in range(50):
    before = path.stat()
    data = path.read_bytes()
    after = path.stat()
    same = (before.st_ino, before.st_size, before.st_mtime_ns) == (
        after.st_ino, after.st_size, after.st_mtime_ns)
    if same and len(data) == after.st_size:
      return data.decode("utf-8")
    time.sleep(0.1)
  raise AssertionError(f"{path} kept changing while it was read")


def layer_of(module: str) -> int:
  """Layer index of a dotted r1jax module name (or a path relative to the package)."""
  parts = module.replace("/", ".").removesuffix(".py").split(".")
  head = parts[1] if parts[0] == "r1jax" else parts[0]
  return LAYERS.index("main" if head in ("main", "__init__") else head)


def imports(tree: ast.AST):
  """(node, imported module names) for every import statement."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield node, [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      yield node, [node.module] + [f"{node.module}.{a.name}" for a in node.names]


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
  rel = str(path.relative_to(PACKAGE))
  if rel == "__init__.py":
    return
  own = layer_of(rel)
  for node, names in imports(ast.parse(source(path))):
    for name in names:
      if name.startswith("r1jax.") and name.split(".")[1] in LAYERS:
        assert layer_of(name) <= own, f"{rel}:{node.lineno} imports {name}, a higher layer"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_sit_at_module_top(path):
  rel = str(path.relative_to(PACKAGE))
  tree = ast.parse(source(path))
  top = {id(n) for n in tree.body}
  for node, names in imports(tree):
    if id(node) not in top:
      assert (rel, names[0]) in DEFERRED, f"{rel}:{node.lineno}: function-level import {names}"


def test_files_and_functions_stay_small():
  for path in modules():
    lines = source(path).splitlines()
    assert len(lines) <= 500, f"{path.relative_to(PACKAGE)} has {len(lines)} lines"
    for node in ast.walk(ast.parse("\n".join(lines))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        assert n < 80, f"{path.relative_to(PACKAGE)}:{node.name} is {n} lines"


def test_every_stage_is_one_file_with_a_run_function():
  for name, target in stages.STAGES.items():
    module, fn = target.split(":")
    assert module == f"r1jax.stages.{name}", (name, target)
    tree = ast.parse(source(PACKAGE / "stages" / f"{name}.py"))
    assert fn in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, name
