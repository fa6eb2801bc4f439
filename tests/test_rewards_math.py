"""Math answer extraction and equivalence: unit cases, MATH-500 and GSM8K agreement, attacks."""

import json
import threading
import time
from pathlib import Path

import pytest

from r1jax.rewards import math as math_lib
from r1jax.rewards import pool as pool_lib



def _rows(data: Path, name: str) -> list[dict]:
  with open(data / name / "test.jsonl") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def pool():
  with pool_lib.RewardPool(num_workers=2, timeout_s=20) as p:
    yield p


def _verify_all(pool, pairs):
  """accuracy_reward(completion, gold) for each pair, in the worker pool."""
  futures = [pool.submit(math_lib.accuracy_reward, c, g) for c, g in pairs]
  return [f.result() for f in futures]


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}} is the set", r"\{1, 2\}"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\boxed{7}}", "7"),
    (r"\fbox{3}", "3"),
    (r"\boxed 5 dollars", "5"),
    ("<think>maybe \\boxed{1}</think><answer>\\boxed{2}</answer>", "2"),
    ("<think>x</think><answer> $42$ </answer>", "42"),
    ("<answer>**17**</answer>", "17"),
    ("<answer>x**2</answer>", "x**2"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("<think>\\boxed{9}</think> I give up", None),  # Only the answer region counts.
    ("The answer is 5.", None),  # No last-number fallback: loose extraction invites hacking.
    (r"\boxed{unbalanced", None),
])
def test_extract_answer(text, expected):
  assert math_lib.extract_answer(text) == expected


def test_gold_answer_forms():
  assert math_lib.gold_answer(r"so the answer is $\boxed{\frac{3}{4}}$.") == r"\frac{3}{4}"
  assert math_lib.gold_answer("steps\n#### 1,000") == "1,000"
  assert math_lib.gold_answer(27.0) == "27.0"
  assert math_lib.gold_answer(r"\frac{1}{2}") == r"\frac{1}{2}"
  with pytest.raises(TypeError, match="gold"):
    math_lib.gold_answer(None)
  with pytest.raises(TypeError, match="gold"):
    math_lib.accuracy_reward(r"\boxed{1}", ["1"])


@pytest.mark.parametrize("pred, gold", [
    (r"\frac{1}{2}", "0.5"), ("0.5", r"\frac{1}{2}"), ("1/2", r"\frac{1}{2}"),
    (r"\dfrac{1}{2}", "1/2"), (r"\tfrac12", "0.5"),
    (r"2\sqrt{2}", r"\sqrt{8}"), (r"\sqrt{8}", r"2\sqrt{2}"),
    (r"[1, 2)", r"[1,2)"), (r"(-\infty, 3] \cup (5, \infty)", r"(-\infty,3]\cup(5,\infty)"),
    ("x = 3", "3"), ("3", "x=3"),
    ("1,000", "1000"), ("1000", "1,000"), ("1,234,567", "1234567"),
    (r"10\text{ cm}", "10"), (r"5 \text{ inches}", "5"), (r"\$18", "18"), (r"90^\circ", "90"),
    (r"\text{Evelyn}", r"\text{Evelyn}"), (r"\pi/2", r"\frac{\pi}{2}"),
    ("27", 27.0), ("204", "204"),
])
def test_equivalent_answers_pass(pred, gold):
  assert math_lib.accuracy_reward(rf"Thus \boxed{{{pred}}}.", gold) == 1.0


@pytest.mark.parametrize("completion, gold", [
    (r"\boxed{4\sqrt{2}}", "4"), (r"\boxed{4}", r"4\sqrt{2}"),
    (r"\boxed{1-1/e}", "1+1/e"), (r"\boxed{1+\frac{1}{e}}", r"1-\frac{1}{e}"),
    (r"\boxed{(1,2]}", "[1,2)"), (r"\boxed{(0,3)}", "(3,0)"), (r"\boxed{2,3}", "23"),
    (r"\boxed{3.0000001}", "3"), (r"\boxed{-5}", "5"),
    ("**5**", "5"),  # Bold without \boxed or <answer> is not an answer form.
    ("The answer is 5", "5"), ("", "5"), (r"\boxed{}", "0"),
])
def test_wrong_answers_rejected(completion, gold):
  assert math_lib.accuracy_reward(completion, gold) == 0.0


def test_markdown_bold_inside_answer_tags_is_stripped_deliberately():
  assert math_lib.accuracy_reward("<answer>**5**</answer>", "5") == 1.0
  assert math_lib.accuracy_reward(r"\boxed{**5**}", "5") == 1.0
  assert math_lib.accuracy_reward("<answer>**6**</answer>", "5") == 0.0


def test_math500_gold_boxed_agrees_with_answer_field(pool, shared_data):
  rows = _rows(shared_data, "math500")
  outcomes = _verify_all(pool, [(r["solution"], r["answer"]) for r in rows])
  failures = [(r["unique_id"], math_lib.extract_answer(r["solution"]), r["answer"], o.error)
              for r, o in zip(rows, outcomes) if o.value != 1.0]
  # Measured: 500/500. A failure prints (id, extracted from \boxed, answer field, pool error).
  assert len(failures) <= 5, failures
  assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]


@pytest.mark.slow
def test_math500_neighbour_answers_rejected(pool, shared_data):
  rows = _rows(shared_data, "math500")
  pairs = [(rf"\boxed{{{rows[(i + 1) % len(rows)]['answer']}}}", r["answer"])
           for i, r in enumerate(rows)]
  outcomes = _verify_all(pool, pairs)
  accepted = [(p[0], p[1]) for p, o in zip(pairs, outcomes) if o.value == 1.0]
  assert len(accepted) <= 5, accepted  # >= 99% rejected
  # Every acceptance must be a genuinely equal pair (same string, or "x=5" against 5).
  for pred, gold in accepted:
    pred = math_lib.extract_answer(pred).replace(" ", "")
    assert pred == gold.replace(" ", "") or pred.split("=")[-1] == gold, (pred, gold)


def test_gsm8k_self_and_neighbour(pool, shared_data):
  rows = _rows(shared_data, "gsm8k")
  values = [float(math_lib.gold_answer(r["answer"]).replace(",", "")) for r in rows]

  def neighbour(i):  # The next row whose answer differs numerically.
    j = (i + 1) % len(rows)
    while values[j] == values[i]:
      j = (j + 1) % len(rows)
    return j

  same = _verify_all(pool, [(r["answer"], r["answer"]) for r in rows])
  other = _verify_all(pool, [(rows[neighbour(i)]["answer"], r["answer"])
                             for i, r in enumerate(rows)])
  assert [o.value for o in same] == [1.0] * len(rows)
  assert [o.value for o in other] == [0.0] * len(rows)


@pytest.mark.parametrize("name, completion", [
    ("10k-deep braces", r"\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"),
    ("300-deep braces", r"\boxed{" + "{" * 300 + "1" + "}" * 300 + "}"),
    ("10^6 digits", r"\boxed{" + "9" * 10**6 + "}"),
    ("unbalanced", r"\boxed{\frac{1}{2" + r"\left(" * 50),
    ("unbalanced in tags", r"<answer>\frac{{1}{2}}}}\sqrt{</answer>"),
    ("power tower", r"\boxed{9^{9^{9^{9}}}}"),
    ("huge factorial", r"\boxed{(10^{8})!}"),
])
def test_pathological_inputs_return_zero_within_timeout(pool, name, completion):
  """As the trainer scores them: in a pool worker, with a hard timeout and 0.0 as fallback."""
  def score(text, timeout_s):
    return pool.submit(math_lib.accuracy_reward, text, "1", timeout_s=timeout_s,
                       fallback=0.0).result().value_or_raise()
  assert score(r"\boxed{1}", 20) == 1.0  # Workers warm first.
  start = time.monotonic()
  assert score(completion, 1.5) == 0.0, name
  assert time.monotonic() - start < 4.0, name  # 1.5 s hard timeout + worker restart


def test_accuracy_reward_works_off_the_main_thread():
  """math-verify's signal timeouts fail in threads; accuracy_reward (in-process) must not."""
  results = []
  thread = threading.Thread(target=lambda: results.append(
      math_lib.accuracy_reward(r"<think>hm</think> \boxed{\dfrac{2}{4}}", "0.5")))
  thread.start()
  thread.join(timeout=60)
  assert results == [1.0]
  assert math_lib.answers_equivalent("1/2", "0.5")  # In-process works too in the main thread.


def test_identical_answers_are_right_without_math_verify(monkeypatch):
  """As evaluation counts them: a prediction equal to the gold (up to spaces) is correct even
  where math-verify could not parse it, so RL, generate and eval never disagree on it."""
  monkeypatch.setattr(math_lib, "answers_equivalent", lambda pred, gold: False)
  assert math_lib.accuracy_reward("<answer> \\text{ Mon } </answer>", "\\text{Mon}") == 1.0
  assert math_lib.accuracy_reward("<answer>13</answer>", "12") == 0.0
  assert math_lib.accuracy_reward("<answer> </answer>", " ") == 0.0
