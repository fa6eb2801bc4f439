"""The miniature R1-Zero's world: correct golds, a clean held-out split, a template-free corpus."""

import hashlib
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


def test_the_default_world_is_unchanged_draw_for_draw():
  """No World: the corpus and both splits are the ones every committed tiny run trained on
  (their digest, taken before World existed)."""
  import hashlib
  h = hashlib.sha256()
  for doc in synthetic.corpus(2000, seed=0):
    h.update(doc.encode())
  for split in ("train", "held_out"):
    for p in synthetic.problems(split, 300, seed=0):
      h.update(p.expression.encode())
  assert h.hexdigest() == "7fe95d21737403e5f2caba49e79a88732b77db5071f7c501df422346eea46a03"


WORLD = synthetic.World(min_ops=2, max_ops=6, second_language=0.3, self_check=0.2)
_HAN = re.compile("[\u4e00-\u9fff]")
_CORRECTION = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)[.。] (?:Wait, |等等，)\1 \2 \3 (?:is|是) "
                         r"(\d+)(?:, not |，不是 )\4[.。]")


def test_world_levels_take_equal_shares_with_right_golds_and_clean_splits():
  train = synthetic.problems("train", 500, seed=0, world=WORLD)
  held = synthetic.problems("held_out", 100, seed=0, world=WORLD)
  for ps in (train, held):
    counts = {k: sum(len(p.ops) == k for p in ps) for k in WORLD.levels}
    assert set(counts) == {2, 3, 4, 5, 6} and max(counts.values()) - min(counts.values()) <= 1
    for p in ps:
      assert p.answer == _independent_value(p.expression)
      assert all(0 <= s[3] <= synthetic.MAX_VALUE for s in p.steps())
  assert not {p.expression for p in train} & {p.expression for p in held}
  docs = list(synthetic.corpus(1500, seed=0, world=WORLD))
  held_all = {p.expression for p in synthetic.problems("held_out", 400, seed=0, world=WORLD)}
  for doc in docs:
    for e in re.findall(r"\d+(?: [+-] \d+){2,6}", doc):
      assert e not in held_all, e


def test_world_corpus_mixes_languages_and_corrects_its_slips():
  """Shares near the World's; every correction names the wrong value and the right one; the
  answers stay right; the language reward and the reflection counter see what RL will."""
  from r1jax.core.metrics import reflection_counts
  from r1jax.rewards.language import language_consistency_reward
  docs = list(synthetic.corpus(3000, seed=1, world=WORLD))
  zh = [d for d in docs if _HAN.search(d)]
  checked = [d for d in docs if "Wait, " in d or "等等，" in d]
  assert abs(len(zh) / len(docs) - 0.3) < 0.04 and abs(len(checked) / len(docs) - 0.2) < 0.04
  for doc in checked:
    (a, op, b, wrong, right), = _CORRECTION.findall(doc)
    assert int(right) == (int(a) + int(b) if op == "+" else int(a) - int(b)) != int(wrong)
  import random
  rng = random.Random(0)
  for p in synthetic.problems("train", 200, seed=4, world=WORLD):
    for lang in ("en", "zh"):
      sol = synthetic._solution(p, rng, lang, check=True)  # pylint: disable=protected-access
      if extract_answer(sol) is not None:
        assert accuracy_reward(sol, str(p.answer)) == 1.0, sol
      if lang == "zh":
        assert language_consistency_reward(sol, "en") < 1.0 < 1.0 + language_consistency_reward(
            sol, "zh"), sol
  assert reflection_counts([d for d in checked if "Wait, " in d])["reflect/total"] >= 1.0
  assert reflection_counts([d for d in docs if d not in checked])["reflect/wait"] == 0.0


def test_world_sets_its_shares_of_tag_solutions_and_of_working_on_a_new_line():
  """The tag style's share moves with `tags`; with `newline`, a share of pages start their
  working on its own line, tags on their own lines too, and the first operand is right there."""
  import random
  lay = synthetic.World(min_ops=2, max_ops=6, tags=0.3, newline=0.4)
  assert abs(sum(lay.style_weights) - 1.0) < 1e-9 and synthetic.World().style_weights[3] == 0.08
  docs = list(synthetic.corpus(3000, seed=2, world=lay))
  tagged = [d for d in docs if re.search(r"<answer> \d+ </answer>\Z", d)]
  labelled = [re.search(r"(?:Answer|A|Assistant|Solution):(\s)", d) for d in docs]
  labelled = [m.group(1) for m in labelled if m]  # 4 of the 5 wraps name the answer
  assert abs(len(tagged) / len(docs) - 0.3) < 0.04, len(tagged)
  assert abs(labelled.count("\n") / len(labelled) - 0.4) < 0.05, labelled.count("\n")
  own_line = [d for d in tagged if "<think>\n" in d]
  assert own_line and all(re.search(r"<think>\n.*\n</think> <answer> \d+ </answer>\Z", d, re.S)
                          for d in own_line)
  assert all("<think>\n" not in d for d in synthetic.corpus(500, seed=2, world=WORLD))
  rng = random.Random(0)
  for p in synthetic.problems("train", 50, seed=1, world=lay):
    page = synthetic._page(p, rng, world=lay)  # pylint: disable=protected-access
    if "<think>\n" in page:
      lead = r"<think>\n(?:First, |Step 1: |首先，|第1步：)?"
      assert re.search(lead + re.escape(f"{p.numbers[0]} {p.ops[0]} {p.numbers[1]} = "),
                       page), page


def test_world_sets_its_share_of_prose_that_stays_on_one_thing():
  """With `topical`, that share of prose blocks name one thing in every sentence (random
  blocks of 3+ sentences almost never do); at 0 the corpus is the same, draw for draw."""
  verbs, things = "|".join(synthetic.VERBS), "|".join(synthetic.THINGS)
  named = lambda block: re.findall(rf"(?:{verbs}) ({things}) ", block)
  for share in (0.0, 0.7):
    world = synthetic.World(min_ops=2, max_ops=6, topical=share)
    blocks = [b for d in synthetic.corpus(3000, seed=4, world=world)
              for b in [d.split("\n")[0]] if len(named(b)) >= 3]
    one = sum(len(set(named(b))) == 1 for b in blocks) / len(blocks)
    assert len(blocks) > 300 and abs(one - share) < 0.06, (share, one)
  h = hashlib.sha256("\n".join(synthetic.corpus(200, seed=4, world=synthetic.World(
      min_ops=2, max_ops=6, topical=0.0))).encode())  # the digest from before `topical`
  assert h.hexdigest() == "849c666aeb675c9e8107a0baa91dc8b778e9beba7aac9a0c08ea6250ddce6578"
  import pytest
  with pytest.raises(ValueError, match="topical must be a share"):
    synthetic.World(topical=1.2)


def test_world_refuses_bad_settings():
  import pytest
  with pytest.raises(ValueError, match="min_ops <= max_ops"):
    synthetic.World(min_ops=4, max_ops=3)
  with pytest.raises(ValueError, match="2 <= min_ops"):
    synthetic.World(min_ops=1, max_ops=3)
  with pytest.raises(ValueError, match="too few distinct problems for 3000"):
    synthetic.problems("held_out", 3000, seed=0, world=synthetic.World(2, 2))
  with pytest.raises(ValueError, match="second_language must be a share"):
    synthetic.World(second_language=1.5)
  with pytest.raises(ValueError, match="newline must be a share"):
    synthetic.World(newline=-0.1)
  with pytest.raises(ValueError, match="tags must be a share"):
    synthetic.World(tags=2.0)


def test_a_pipeline_builds_its_data_in_the_world_it_names(tmp_path):
  """The pipeline's `synthetic.world` group reaches the data (levels, Chinese), the tokenizer
  learns the second language's words, and a re-run with another world is refused."""
  import ml_collections
  import pytest
  from r1jax.core.tokenizer import load_tokenizer
  from r1jax.stages.pipeline import prepare_data
  s = ml_collections.ConfigDict(dict(corpus_docs=300, train_problems=40, held_out_problems=10,
                                     vocab_size=384, world=dict(min_ops=2, max_ops=5,
                                                                second_language=0.5)))
  paths = prepare_data(s, tmp_path, seed=0)
  rows = [json.loads(line) for line in open(paths["rl_train"])]
  assert sorted({r["level"] for r in rows}) == [2, 3, 4, 5]
  texts = [json.loads(line)["text"] for line in open(paths["corpus"])]
  assert 0.35 < sum(bool(_HAN.search(t)) for t in texts) / len(texts) < 0.65
  tok = load_tokenizer(paths["tokenizer"])
  assert tok.decode(tok.encode("然后 12 - 9 = 3。")) == "然后 12 - 9 = 3。"
  assert len(tok.encode("然后")) < len("然后".encode())  # pieces, not 6 byte fallbacks
  s.world.max_ops = 6
  with pytest.raises(ValueError, match="generated with other settings"):
    prepare_data(s, tmp_path, seed=0)
