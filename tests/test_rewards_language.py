"""Language consistency: English and Chinese CoTs, mixing, and neutral math / code / numbers."""

import time

import pytest

from r1jax.rewards import language


def _cot(text):
  return f"<think>{text}</think><answer>42</answer>"


def test_pure_english_and_pure_chinese_score_one():
  assert language.language_consistency_reward(
      _cot("First, compute the sum. It's 42, so I'm done."), "en") == 1.0
  chinese = _cot("首先计算总和，然后验证结果是否正确。")  # No spaces at all.
  assert language.language_consistency_reward(chinese, "zh") == 1.0
  assert language.language_consistency_reward(chinese, "en") == 0.0


def test_mixing_gives_the_word_share():
  # 4 English words + 4 Han characters.
  text = _cot("let us compute 计算总和 now")
  assert language.word_counts(language.reasoning_text(text)) == {"en": 4, "zh": 4, "other": 0}
  assert language.language_consistency_reward(text, "en") == 0.5
  assert language.language_consistency_reward(text, "zh") == 0.5
  assert language.language_consistency_reward(_cot("Значит ответ yes"), "en") == pytest.approx(
      1 / 3)  # Cyrillic words count as "other".


@pytest.mark.parametrize("neutral", [
    r"$\frac{a+b}{2} = \sqrt{x^2 + y^2}$", r"\[ \int_0^1 f(x)\,dx \]", r"\(x_1\)",
    "```python\nfor item in range(10):\n    print('hello world')\n```",
    "`sorted(values)`", "3.14159, 1,000,000 = 10^6", "x y z n", r"\alpha \beta",
    "https://example.com/some/path", "$$E = mc^2$$",
])
def test_math_code_numbers_are_neutral(neutral):
  zh = _cot(f"所以 {neutral} 成立")
  en = _cot(f"so {neutral} holds")
  assert language.language_consistency_reward(zh, "zh") == 1.0, neutral
  assert language.language_consistency_reward(en, "en") == 1.0, neutral


def test_only_the_reasoning_counts_by_default():
  text = "<think>我们计算</think> The answer is 42."
  assert language.language_consistency_reward(text, "zh") == 1.0
  assert language.language_consistency_reward(text, "zh", whole_completion=True) < 1.0
  assert language.reasoning_text("<think>unclosed reasoning") == "unclosed reasoning"
  assert language.reasoning_text("no tags") == "no tags"


def test_no_words_is_not_mixing_and_bad_lang_raises():
  assert language.language_consistency_reward(_cot("$1+1=2$"), "en") == 1.0
  with pytest.raises(ValueError, match="unsupported language"):
    language.language_consistency_reward(_cot("hi"), "fr")


def test_linear_time_on_adversarial_delimiters():
  text = _cot("\\[ word " * 30_000 + "$$ x " * 30_000 + "` y " * 30_000)
  start = time.monotonic()
  language.language_consistency_reward(text, "en")
  assert time.monotonic() - start < 2.0
