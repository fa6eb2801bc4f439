"""Length shaping: DAPO soft overlong punishment and cosine length scaling."""

import math

import pytest

from r1jax.rewards import length


@pytest.mark.parametrize("n, expected", [
    (0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (17, -1.0), (10**6, -1.0)])
def test_overlong_penalty(n, expected):
  # max_len 16, cache 4: free up to 12 tokens, then linear to -1 at 16.
  assert length.overlong_penalty("", n, max_len=16, cache_len=4) == pytest.approx(expected)


def test_overlong_bad_input():
  with pytest.raises(ValueError, match="cache_len"):
    length.overlong_penalty("", 3, max_len=16, cache_len=0)
  with pytest.raises(ValueError, match="length"):
    length.overlong_penalty("", -1, max_len=16, cache_len=4)
  with pytest.raises(ValueError, match="length"):
    length.overlong_penalty("", "12", max_len=16, cache_len=4)


def test_cosine_scaled_endpoints_and_monotonicity():
  assert length.cosine_scaled(True, 0, 100) == pytest.approx(2.0)
  assert length.cosine_scaled(True, 100, 100) == pytest.approx(1.0)
  assert length.cosine_scaled(True, 50, 100) == pytest.approx(1.5)
  assert length.cosine_scaled(False, 0, 100) == pytest.approx(-10.0)
  assert length.cosine_scaled(False, 100, 100) == pytest.approx(0.0)
  assert length.cosine_scaled(False, 101, 100) == -10.0
  correct = [length.cosine_scaled(True, n, 100) for n in range(0, 101, 10)]
  wrong = [length.cosine_scaled(False, n, 100) for n in range(0, 101, 10)]
  assert correct == sorted(correct, reverse=True) and wrong == sorted(wrong)
  assert min(correct) > max(wrong)  # Any correct answer beats any wrong one.
  assert length.cosine_scaled(True, 25, 100, correct_start=1.0, correct_end=0.0) == \
      pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_cosine_length_reward_uses_accuracy():
  assert length.cosine_length_reward(r"\boxed{4}", "4", 0, 100) == pytest.approx(2.0)
  assert length.cosine_length_reward(r"\boxed{5}", "4", 0, 100) == pytest.approx(-10.0)
