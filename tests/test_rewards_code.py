"""Code reward: program extraction, test-case validation, output matching, scoring."""

import time

import pytest

from r1jax.rewards import code
from r1jax.rewards import sandbox

ADD_ONE = "<think>read n, print n+1</think>\n```python\nprint(int(input()) + 1)\n```"
STDIO = [{"input": "1\n", "output": "2\n"}, {"input": "41", "output": "42"},
         {"input": "-1", "output": "0"}, {"input": "5", "output": "7"}]  # Last one is wrong.
MODES = ["namespace", "rlimit"] if sandbox.namespaces_available() else ["rlimit"]


def _fenced(src: str) -> str:
  return f"<think>plan</think>\n```python\n{src}\n```"


@pytest.mark.parametrize("completion, expected", [
    ("```python\nprint(1)\n```", "print(1)\n"),
    ("```py\na = 1\n```\ntext\n```\nb = 2\n```", "b = 2\n"),  # The last block wins.
    ("<think>```python\nbad()\n```</think>\n```Python3\ngood()\n```", "good()\n"),
    ("<think>```python\nonly_in_reasoning()\n```</think> no code", None),
    ("print(1)", None),
    ("```python\nunterminated", None),
])
def test_extract_program(completion, expected):
  assert code.extract_program(completion) == expected


@pytest.mark.parametrize("tests, match", [
    ("not a list", "list of dicts"),
    ([["1", "2"]], "must be a dict"),
    ([{"input": "1"}], "exactly keys input and output"),
    ([{"input": "1", "output": "2", "extra": 0}], "exactly keys"),
    ([{"input": 1, "output": "2"}], "strings"),
    ([{"fn_name": "f", "output": 1}], "needs fn_name, args, output"),
    ([{"fn_name": "not valid", "args": [], "output": 1}], "identifier"),
    ([{"fn_name": "f", "args": "1", "output": 1}], "args must be a list"),
    ([{"fn_name": "f", "args": [object()], "output": 1}], "JSON"),
])
def test_malformed_tests_raise(tests, match):
  with pytest.raises(ValueError, match=match):
    code.code_reward(ADD_ONE, tests)


def test_output_matching_rules():
  assert code.stdout_matches("1 2\n3\n\n", "1  2   \n3")
  assert code.stdout_matches("0.30000000000000004\n", "0.3")
  assert not code.stdout_matches("1 2\n", "1\n2")
  assert not code.stdout_matches("12", "1 2")
  assert not code.stdout_matches("", "0")
  assert code.values_match([3, 0.30000000000000004, {"a": [True]}], [3, 0.3, {"a": [True]}])
  assert not code.values_match(1, True) and not code.values_match([1, 2], [2, 1])


@pytest.mark.parametrize("mode", MODES)
def test_stdin_stdout_fraction_and_binary(mode):
  assert code.code_reward(ADD_ONE, STDIO, mode=mode) == 0.75
  assert code.code_reward_binary(ADD_ONE, STDIO, mode=mode) == 0.0
  assert code.code_reward_binary(ADD_ONE, STDIO[:3], mode=mode) == 1.0


def test_function_call_tests():
  tests = [{"fn_name": "add", "args": [1, 2], "output": 3},
           {"fn_name": "add", "args": [1], "kwargs": {"b": 5}, "output": 6},
           {"fn_name": "pair", "args": [], "output": [1, "x"]},
           {"fn_name": "add", "args": [0, 0], "output": 1}]
  program = _fenced("def add(a, b=0):\n    print('noise')\n    return a + b\n\n"
                    "def pair():\n    return (1, 'x')\n\n"
                    "if __name__ == '__main__':\n    raise SystemExit('main must not run')")
  assert code.code_reward(program, tests) == 0.75
  leetcode = _fenced("class Solution:\n"
                     "    def twoSum(self, nums, target):\n"
                     "        seen = {}\n"
                     "        for i, n in enumerate(nums):\n"
                     "            if target - n in seen:\n"
                     "                return [seen[target - n], i]\n"
                     "            seen[n] = i")
  assert code.code_reward(leetcode, [{"fn_name": "twoSum", "args": [[2, 7, 11], 9],
                                      "output": [0, 1]}]) == 1.0
  assert code.code_reward(leetcode, [{"fn_name": "missing", "args": [], "output": 0}]) == 0.0


def test_failing_programs_score_zero():
  assert code.code_reward("no code here", STDIO) == 0.0
  assert code.code_reward(_fenced("raise RuntimeError"), STDIO) == 0.0
  assert code.code_reward(_fenced("syntax error ("), STDIO) == 0.0
  assert code.code_reward(ADD_ONE, []) == 0.0


def test_faking_the_function_result_does_not_help():
  """The program can read the harness's marker, but never the expected value."""
  hack = _fenced("import json, sys\nm = json.load(open('call.json'))['marker']\n"
                 "print(m + json.dumps(12345))\nsys.stdout.flush()\nimport os\nos._exit(0)\n"
                 "def f():\n    return 0")
  assert code.code_reward(hack, [{"fn_name": "f", "args": [], "output": 1}]) == 0.0


def test_time_budget_bounds_the_reward():
  start = time.monotonic()
  reward = code.code_reward(_fenced("while True:\n    pass"), STDIO * 5, timeout_s=0.5,
                            total_timeout_s=1.0)
  assert reward == 0.0 and time.monotonic() - start < 3.5
