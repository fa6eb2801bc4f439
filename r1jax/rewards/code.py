"""Code reward: run a completion's program against test cases in the sandbox.

Two test styles (one dict per case):
- stdin/stdout: {"input": str, "output": str}. Outputs match when their non-empty lines have
  the same whitespace-separated tokens; numeric tokens match within 1e-6 (abs or rel), as
  competitive-programming checkers do.
- function call: {"fn_name": str, "args": list, "kwargs": dict (optional), "output": JSON value}.
  The function is looked up in the program's globals, else as a method of a `Solution` class
  (LeetCode style); its return value is compared as JSON (tuples = lists, floats within 1e-6).
Each case runs in a fresh sandboxed process, so one case cannot poison another.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from typing import Any

from r1jax.rewards import sandbox

_PYTHON_TAGS = ("", "python", "python3", "py")
_STDIO_KEYS, _CALL_KEYS = {"input", "output"}, {"fn_name", "args", "kwargs", "output"}
_FLOAT_TOL = 1e-6

# Runs inside the sandbox for function-call tests: exec the program, call, print the marker.
_HARNESS = """\
import json, sys
spec = json.load(open("call.json"))
g = {"__name__": "__solution__"}
exec(compile(open("main.py").read(), "main.py", "exec"), g)
fn = g.get(spec["fn_name"])
if fn is None and isinstance(g.get("Solution"), type):
    fn = getattr(g["Solution"](), spec["fn_name"], None)
if not callable(fn):
    sys.exit("no function named " + spec["fn_name"])
result = fn(*spec["args"], **spec["kwargs"])
if isinstance(result, (set, frozenset)):
    result = sorted(result, key=repr)
sys.stdout.flush()
sys.stdout.write("\\n" + spec["marker"] + json.dumps(result, default=repr) + "\\n")
"""


def extract_program(completion: str) -> str | None:
  """The last fenced Python (or untagged) code block after </think> (anywhere if none)."""
  k = completion.rfind("</think>")
  region = completion if k < 0 else completion[k + len("</think>"):]
  parts = region.split("```")  # Linear; a lazy regex would be quadratic on unclosed fences.
  # Blocks are the odd parts that a later fence closes; the first line is the language tag.
  for part in reversed(parts[1:len(parts) - 1:2]):
    tag, newline, body = part.partition("\n")
    if newline and tag.strip().lower() in _PYTHON_TAGS:
      return body
  return None


def validate_tests(tests: Any) -> list[dict]:
  """Checks the test-case list and returns it; raises ValueError naming the first bad case."""
  if not isinstance(tests, (list, tuple)):
    raise ValueError(f"tests must be a list of dicts, got {type(tests).__name__}")
  for i, t in enumerate(tests):
    if not isinstance(t, dict):
      raise ValueError(f"test {i} must be a dict, got {type(t).__name__}")
    keys = set(t)
    if "fn_name" in keys:
      if not keys <= _CALL_KEYS or not {"fn_name", "args", "output"} <= keys:
        raise ValueError(f"function-call test {i} needs fn_name, args, output (and optional "
                         f"kwargs), got keys {sorted(keys)}")
      if not isinstance(t["fn_name"], str) or not t["fn_name"].isidentifier():
        raise ValueError(f"test {i}: fn_name must be an identifier, got {t['fn_name']!r}")
      if not isinstance(t["args"], (list, tuple)) or not isinstance(t.get("kwargs", {}), dict):
        raise ValueError(f"test {i}: args must be a list and kwargs a dict")
      try:
        json.dumps([t["args"], t.get("kwargs", {})])
      except TypeError as e:
        raise ValueError(f"test {i}: args/kwargs must be JSON-serialisable: {e}") from e
    elif keys != _STDIO_KEYS:
      raise ValueError(f"stdin/stdout test {i} needs exactly keys input and output, "
                       f"got {sorted(keys)}")
    elif not isinstance(t["input"], str) or not isinstance(t["output"], str):
      raise ValueError(f"test {i}: input and output must be strings")
  return list(tests)


def _token_equal(a: str, b: str) -> bool:
  if a == b:
    return True
  try:
    x, y = float(a), float(b)
  except ValueError:
    return False
  return math.isclose(x, y, rel_tol=_FLOAT_TOL, abs_tol=_FLOAT_TOL)


def stdout_matches(actual: str, expected: str) -> bool:
  """Token-wise comparison of non-empty lines, tolerant to trailing spaces and float noise."""
  a = [line.split() for line in actual.splitlines() if line.strip()]
  b = [line.split() for line in expected.splitlines() if line.strip()]
  return len(a) == len(b) and all(
      len(x) == len(y) and all(map(_token_equal, x, y)) for x, y in zip(a, b))


def values_match(actual: Any, expected: Any) -> bool:
  """Equality of JSON values (both sides JSON-decoded) with floats within tolerance."""
  if isinstance(expected, bool) or isinstance(actual, bool):
    return actual is expected
  if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
    return math.isclose(actual, expected, rel_tol=_FLOAT_TOL, abs_tol=_FLOAT_TOL)
  if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
    return len(actual) == len(expected) and all(map(values_match, actual, expected))
  if isinstance(expected, dict) and isinstance(actual, dict):
    return set(actual) == set(expected) and all(
        values_match(actual[k], v) for k, v in expected.items())
  return actual == expected


def run_test(program: str, test: dict, limits: sandbox.Limits, mode: str = "auto",
             python: str | None = None) -> bool:
  """Runs one validated test case in a fresh sandbox; True if it passed."""
  if "fn_name" not in test:
    result = sandbox.run_python(program, stdin=test["input"], limits=limits, mode=mode,
                                python=python)
    return result.ok and stdout_matches(result.stdout, test["output"])
  marker = "@@r1jax-result-" + secrets.token_hex(8) + "@@"
  call = json.dumps({"fn_name": test["fn_name"], "args": list(test["args"]),
                     "kwargs": test.get("kwargs", {}), "marker": marker})
  result = sandbox.run_python(program, limits=limits, mode=mode, entry="harness.py",
                              extra_files={"harness.py": _HARNESS, "call.json": call},
                              python=python)
  if not result.ok or marker not in result.stdout:
    return False
  try:
    actual = json.loads(result.stdout.rsplit(marker, 1)[1].strip())
  except ValueError:
    return False
  return values_match(actual, json.loads(json.dumps(test["output"])))


def code_reward(completion: str, tests: list[dict], timeout_s: float = 5.0,
                memory_mb: int = 1024, total_timeout_s: float = 60.0, binary: bool = False,
                mode: str = "auto", python: str | None = None) -> float:
  """Fraction of tests the completion's program passes (0 without a program).

  timeout_s and memory_mb limit each test; once total_timeout_s is spent the remaining tests
  count as failed, so the reward always returns within about total_timeout_s + timeout_s.
  binary=True returns 1.0 only if every test passes, and stops at the first failure.
  mode and python (the interpreter) go to sandbox.run_python.
  """
  tests = validate_tests(tests)
  program = extract_program(completion)
  if program is None or not tests:
    return 0.0
  limits = sandbox.Limits(timeout_s=timeout_s, memory_mb=memory_mb)
  deadline = time.monotonic() + total_timeout_s
  passed = 0
  for test in tests:
    if time.monotonic() >= deadline:
      break
    if run_test(program, test, limits, mode, python):
      passed += 1
    elif binary:
      return 0.0
  if binary:
    return float(passed == len(tests))
  return passed / len(tests)


def code_reward_binary(completion: str, tests: list[dict], **kwargs) -> float:
  """1.0 if the program passes every test, else 0.0."""
  return code_reward(completion, tests, binary=True, **kwargs)
