"""Where the test suite's time goes: per file and per test, and how much of it is compiling.

Reads pytest's JUnit XML (`--junitxml`, each test's setup + call + teardown) and, when given,
the per-test compile seconds that `R1JAX_TEST_COMPILE_PROFILE=DIR` makes tests/conftest.py
write (tracing, lowering and XLA compilation inside the test processes). Prints markdown.

  R1JAX_TEST_COMPILE_PROFILE=/tmp/prof python -m pytest -q -n 2 --dist loadfile tests \\
      --junitxml=/tmp/prof/junit.xml
  python tools/test_profile.py --junit=/tmp/prof/junit.xml --compile=/tmp/prof
"""

import collections
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from absl import app, flags

_JUNIT = flags.DEFINE_string("junit", None, "pytest --junitxml output.", required=True)
_COMPILE = flags.DEFINE_string("compile", None, "R1JAX_TEST_COMPILE_PROFILE folder (optional).")
_TOP = flags.DEFINE_integer("top", 25, "How many of the slowest tests to list.")


def test_seconds(junit: Path) -> dict[str, float]:
  """{nodeid-like 'tests/test_x.py::name': seconds} from a JUnit XML file."""
  out = {}
  for case in ET.parse(junit).getroot().iter("testcase"):
    module = case.get("classname", "").split(".")[-1]
    out[f"tests/{module}.py::{case.get('name')}"] = float(case.get("time", 0.0))
  return out


def compile_seconds(folder: Path | None) -> dict[str, float]:
  """{nodeid: trace + lower + compile seconds}, summed over every process's file."""
  out: dict[str, float] = collections.Counter()
  for path in sorted(folder.glob("*.json")) if folder else []:
    for nodeid, parts in json.loads(path.read_text()).items():
      out[nodeid] += sum(parts.values())
  return out


def main(argv):
  del argv
  tests = test_seconds(Path(_JUNIT.value))
  comp = compile_seconds(Path(_COMPILE.value) if _COMPILE.value else None)
  files: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
  for nodeid, seconds in tests.items():
    f = files[nodeid.split("::")[0]]
    f[0] += 1
    f[1] += seconds
    f[2] += comp.get(nodeid, 0.0)
  total = sum(v[1] for v in files.values())
  total_c = sum(v[2] for v in files.values())
  head = f"{len(tests)} tests, {total:.0f} s of test time"
  if _COMPILE.value:
    head += (f", {total_c:.0f} s of it tracing, lowering and compiling in the test processes "
             f"({100 * total_c / max(total, 1e-9):.0f}%)")
  print(head + "\n")
  extra = lambda c: f" {c:.1f} |" if _COMPILE.value else ""
  c_head, c_rule = (" compiling (s) |", "---:|") if _COMPILE.value else ("", "")
  print(f"| file | tests | seconds |{c_head}\n|---|---:|---:|{c_rule}")
  for name, (n, s, c) in sorted(files.items(), key=lambda kv: -kv[1][1]):
    print(f"| {name} | {n} | {s:.1f} |" + extra(c))
  print(f"\n| {_TOP.value} slowest tests | seconds |{c_head}\n|---|---:|{c_rule}")
  for nodeid, s in sorted(tests.items(), key=lambda kv: -kv[1])[:_TOP.value]:
    print(f"| {nodeid} | {s:.1f} |" + extra(comp.get(nodeid, 0.0)))

if __name__ == "__main__":
  app.run(main)
