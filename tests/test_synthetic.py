"""The miniature R1-Zero's world: correct golds, a clean held-out split, a template-free corpus."""

import json
import re

from r1jax.data import synthetic
from r1jax.data.rows import load_rows
from r1jax.rewards.format import format_reward
from r1jax.rewards.math import accuracy_reward, extract_answer
from r1jax.core.tokenizer import R1_ZERO_PROMPT


def _independent_value(expression: str) -> int:
  """Left-to-right + / - of the integers in the expression, restated without the module."""
  tokens = expression.split()
  value = int(tokens[0])
  for op, n in zip(tokens[1::2], tokens[2::2]):
    value = value + int(n) if op == "+" else value - int(n)
  return value


def test_golds_are_right_and_running_values_in_range():
  for split in ("train", "held_out"):
    for p in synthetic.problems(split, 300, seed=1):
      assert p.answer == _independent_value(p.expression)
      assert all(0 <= s[3] <= synthetic.MAX_VALUE for s in p.steps())
      assert 2 <= len(p.ops) <= 3


def test_splits_are_disjoint_and_deterministic():
  train = {p.expression for p in synthetic.problems("train", 2000, seed=0)}
  held = {p.expression for p in synthetic.problems("held_out", 200, seed=0)}
  assert not train & held
  assert [p.expression for p in synthetic.problems("held_out", 50, seed=0)] == \
      [p.expression for p in synthetic.problems("held_out", 50, seed=0)]
  assert synthetic.problems("train", 50, seed=0) != synthetic.problems("train", 50, seed=1)


def test_corpus_never_holds_held_out_problems_nor_the_template():
  held = {p.expression for p in synthetic.problems("held_out", 400, seed=0)}
  docs = list(synthetic.corpus(3000, seed=0))
  template_head = R1_ZERO_PROMPT.split(".")[0]
  expr = re.compile(r"\d+(?: [+-] \d+){2,3}")
  for doc in docs:
    assert template_head not in doc
    for e in expr.findall(doc):
      assert e not in held, e
  # The base sees the tags in a minority of pages only: R1-Zero must still teach the format.
  tagged = sum(doc.endswith("</answer>") for doc in docs) / len(docs)
  assert 0.03 < tagged < 0.15
  assert all(format_reward(d.rsplit("Assistant:", 1)[-1]) == 1.0 for d in docs
             if d.endswith("</answer>") and "Assistant:" in d)


def test_every_gold_style_worked_answer_is_graded_right(tmp_path):
  """The corpus' answer forms (tags, boxed, ####) extract to the gold; 'The answer is' does not."""
  import random
  rng = random.Random(0)
  for p in synthetic.problems("train", 200, seed=3):
    sol = synthetic._solution(p, rng)  # pylint: disable=protected-access
    got = extract_answer(sol)
    if "The answer is" in sol or (got is None and " = " in sol and sol.endswith(".")):
      assert got is None
    else:
      assert accuracy_reward(sol, str(p.answer)) == 1.0, sol


def test_written_dataset_loads_with_the_generic_adapter(tmp_path):
  paths = synthetic.write_dataset(tmp_path, corpus_docs=50, train_problems=40,
                                  held_out_problems=10, seed=0)
  rows, bad = load_rows(paths["held_out"])
  assert not bad and len(rows) == 10
  assert all(r["task"] == "math" and r["gold"] == str(_independent_value(r["question"].split(
      " ", 1)[1])) for r in rows)
  texts = [json.loads(l)["text"] for l in paths["corpus"].open()]
  assert len(texts) == 50 and all(texts)
