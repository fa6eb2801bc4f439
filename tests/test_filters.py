"""Rejection-sampling filters, selection and the readable format, on hand-made cases."""

import numpy as np
import pytest

from r1jax.data.formats import READABLE, parse_readable, zero_to_readable
from r1jax.rewards import filters as F

OFF = F.Filters(verifier="", truncated=False)
ZERO = "<think> 3 + 4 = 7, then 7 * 2 = 14 </think> <answer> 14 </answer>"

# Real mixed-language reasoning, the kind R1-Zero drifts into (Chinese and English in one CoT),
# and the same reasoning in one language each.
MIXED_COT = ("<think>首先，我们需要计算每个篮子里的苹果数量。 Each basket holds 12 apples, and "
             "there are 3 baskets, 所以总共有 36 个苹果。 Then we give away 10 of them, "
             "剩下 26 个。</think> <answer>26</answer>")
ENGLISH_COT = ("<think>First we count the apples in each basket. Each basket holds 12 apples "
               "and there are 3 baskets, so there are 36 apples. Then we give away 10 of them, "
               "which leaves 26.</think> <answer>26</answer>")
CHINESE_COT = ("<think>首先，我们需要计算每个篮子里的苹果数量。每个篮子有 12 个苹果，一共 3 个篮子，"
               "所以总共有 36 个苹果。送出 10 个以后，剩下 26 个。</think> <answer>26</answer>")


def reasons(f, text, **kw):
  return F.reject_reasons(f, text, **kw)


def test_verifier_rejects_wrong_and_keeps_right():
  f = F.Filters(verifier="accuracy", truncated=False)
  assert reasons(f, ZERO, rewards={"accuracy": 1.0}) == []
  assert reasons(f, ZERO, rewards={"accuracy": 0.0}) == ["wrong"]
  # A verifier that does not apply to the task (NaN) never rejects.
  assert reasons(f, ZERO, rewards={"accuracy": float("nan")}) == []
  with pytest.raises(KeyError, match="not a reward"):
    reasons(f, ZERO, rewards={"format": 1.0})


def test_reward_crash_is_a_reason_not_a_verdict():
  f = F.Filters(verifier="accuracy", truncated=False)
  out = reasons(f, ZERO, rewards={"accuracy": 0.0}, failed={"accuracy": True})
  assert out == ["reward_error"]  # the fallback 0 is not counted as "wrong" too


def test_language_filter_on_real_mixed_reasoning():
  f = F.Filters(verifier="", truncated=False, language="en", min_language=0.95)
  assert reasons(f, MIXED_COT) == ["mixed_language"]
  assert reasons(f, ENGLISH_COT) == []
  zh = F.Filters(verifier="", truncated=False, language="zh", min_language=0.95)
  assert reasons(zh, CHINESE_COT) == []
  assert reasons(zh, MIXED_COT) == ["mixed_language"]
  assert reasons(zh, ENGLISH_COT) == ["mixed_language"]


def test_long_paragraph_filter_reads_the_reasoning():
  f = F.Filters(verifier="", truncated=False, max_paragraph_chars=80)
  short = "<think>Step one is short.\n\nStep two is short too.</think> <answer>1</answer>"
  long_ = "<think>" + "word " * 40 + "\n\nok</think> <answer>1</answer>"
  assert reasons(f, short) == []
  assert reasons(f, long_) == ["long_paragraph"]
  assert F.longest_paragraph("ab\n\n  abcd  \n \nabc") == 4


def test_code_block_filter_spares_code_tasks():
  f = F.Filters(verifier="", truncated=False, code_blocks=True)
  code = "<think>```python\nprint(1)\n```</think> <answer>1</answer>"
  assert reasons(f, code, task="math") == ["code_block"]
  assert reasons(f, code, task="code") == []
  assert reasons(f, ZERO, task="math") == []
  assert reasons(f, "<think>```python\nwhile True:", task="general") == ["code_block"]


def test_repetition_filter_catches_loops_not_normal_reasoning():
  f = F.Filters(verifier="", truncated=False, repetition_ngram=6, repetition_max=3)
  loop = "<think>" + "so the answer is 14 and " * 5 + "</think>"
  assert reasons(f, loop) == ["repetition"]
  assert reasons(f, ENGLISH_COT) == []
  assert reasons(f, ZERO) == []
  zh_loop = "<think>" + "我们再检查一遍结果。" * 4 + "</think>"
  assert reasons(f, zh_loop) == ["repetition"]
  assert F.max_ngram_repeats("a b a b a b", 2) == 3 and F.max_ngram_repeats("a b", 3) == 0


def test_truncation_filter():
  f = F.Filters(verifier="", truncated=True)
  assert reasons(f, ZERO, truncated=True) == ["truncated"]
  assert reasons(f, ZERO, truncated=False) == []
  assert reasons(OFF, ZERO, truncated=True) == []


def test_structure_filters():
  zero = F.Filters(verifier="", truncated=False, structure="zero")
  readable = F.Filters(verifier="", truncated=False, structure="readable")
  good_readable = zero_to_readable(ZERO)
  assert reasons(zero, ZERO) == [] and reasons(zero, good_readable) == ["unreadable"]
  assert reasons(readable, good_readable) == [] and reasons(readable, ZERO) == ["unreadable"]
  assert reasons(zero, "3 + 4 = 7 so 14") == ["unreadable"]
  assert reasons(zero, ZERO + " and more") == ["unreadable"]


def test_every_applicable_reason_is_counted():
  f = F.Filters(verifier="accuracy", truncated=True, structure="zero", language="en")
  out = reasons(f, "首先 no tags at all", truncated=True, rewards={"accuracy": 0.0})
  assert out == ["wrong", "mixed_language", "truncated", "unreadable"]


def test_bad_filter_settings():
  with pytest.raises(ValueError, match="language"):
    F.Filters(language="fr")
  with pytest.raises(ValueError, match="structure"):
    F.Filters(structure="pretty")
  with pytest.raises(ValueError, match="unknown filters"):
    F.Filters.from_config({"verifer": "accuracy"})


def test_selection():
  lengths = [9, 3, 7, 3, 5]
  rng = lambda: np.random.default_rng([0, 4])
  assert F.select([0, 1, 2, 3, 4], lengths, 2, "first", rng()) == [0, 1]
  assert F.select([0, 1, 2, 3, 4], lengths, 2, "shortest", rng()) == [1, 3]
  assert F.select([0, 2, 4], lengths, 1, "shortest", rng()) == [4]
  assert F.select([0, 2], lengths, 0, "first", rng()) == [0, 2]  # 0 = every accepted one
  assert F.select([], lengths, 2, "random", rng()) == []
  a = F.select([0, 1, 2, 3, 4], lengths, 2, "random", rng())
  assert a == F.select([0, 1, 2, 3, 4], lengths, 2, "random", rng()) and len(set(a)) == 2
  draws = {tuple(F.select(list(range(5)), lengths, 2, "random", np.random.default_rng(s)))
           for s in range(40)}
  assert len(draws) > 5  # really random across seeds
  with pytest.raises(ValueError, match="selection"):
    F.select([0], lengths, 1, "best", rng())


def test_pass_rate_signal():
  assert not F.carries_signal(0.0, 0.01, 0.99) and not F.carries_signal(1.0, 0.01, 0.99)
  assert F.carries_signal(0.5, 0.01, 0.99) and F.carries_signal(1.0, 0.0, 1.0)


def test_readable_conversion_exact_and_refusals():
  out = zero_to_readable("<think>\n 3 + 4 = 7\n7 * 2 = 14 \n</think>\n<answer> $14$ </answer>\n")
  assert out == ("<think>\n3 + 4 = 7\n7 * 2 = 14\n</think>\n\n"
                 "The final answer is $\\boxed{14}$.")
  assert parse_readable(out) == ("3 + 4 = 7\n7 * 2 = 14", "The final answer is $\\boxed{14}$.")
  boxed = zero_to_readable("<think>x</think><answer>so \\boxed{\\frac{1}{2}}</answer>")
  assert boxed.endswith("$\\boxed{\\frac{1}{2}}$.")
  for bad in ("<think>r</think> <answer>1</answer> extra",  # text after the answer
              "<think></think> <answer>1</answer>",  # no reasoning
              "<think>r</think> <answer> </answer>",  # no answer
              "<think>r <think> r</think> <answer>1</answer>",  # a repeated tag
              "r</think> <answer>1</answer>", "plain text"):
    assert zero_to_readable(bad) is None, bad
  for bad in ("<think>r</think>", "<think>r</think> no box", "x <think>r</think> \\boxed{1}",
              "<think>r</think> \\boxed{1} <answer>1</answer>",
              "<think>r</think> " + "long " * 500 + "\\boxed{1}"):
    assert parse_readable(bad) is None, bad
  assert READABLE.render(" r ", " s ") == "<think>\nr\n</think>\n\ns"
