"""Length shaping: DAPO's soft overlong punishment and a cosine length-scaled correctness reward.

Lengths are response tokens, supplied by the trainer (the sample's `num_tokens` by default):
counting characters here would disagree with the sampler's max length.
"""

from __future__ import annotations

import math

from r1jax.rewards import math as math_lib


def _check_length(length: int, max_len: int) -> None:
  if isinstance(length, bool) or not isinstance(length, (int, float)) or length < 0:
    raise ValueError(f"length must be a non-negative token count, got {length!r}")
  if max_len <= 0:
    raise ValueError(f"max_len must be positive, got {max_len}")


def overlong_penalty(completion: str, length: int, max_len: int, cache_len: int) -> float:
  """DAPO soft overlong punishment: 0 up to max_len - cache_len, then linear down to -1 at max_len.

  Beyond max_len (a truncated response) it is -1. The completion text itself is not used.
  """
  del completion
  _check_length(length, max_len)
  if not 0 < cache_len <= max_len:
    raise ValueError(f"need 0 < cache_len <= max_len, got {cache_len}, {max_len}")
  expected = max_len - cache_len
  if length <= expected:
    return 0.0
  if length <= max_len:
    return (expected - length) / cache_len
  return -1.0


def cosine_scaled(correct: bool, length: int, max_len: int, correct_start: float = 2.0,
                  correct_end: float = 1.0, wrong_start: float = -10.0, wrong_end: float = 0.0,
                  exceed: float = -10.0) -> float:
  """Cosine length scaling (Yeo et al. 2025, "Demystifying Long CoT Reasoning in LLMs").

  Correct answers earn correct_start at length 0 falling to correct_end at max_len (short is
  better); wrong ones earn wrong_start rising to wrong_end (thinking longer is less bad);
  over max_len earns `exceed`.
  """
  _check_length(length, max_len)
  if length > max_len:
    return exceed
  start, end = (correct_start, correct_end) if correct else (wrong_start, wrong_end)
  return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * length / max_len))


def cosine_length_reward(completion: str, gold: str, length: int, max_len: int,
                         **scale) -> float:
  """Math accuracy scaled by response length with `cosine_scaled`; runs math-verify in-process."""
  correct = math_lib.accuracy_reward(completion, gold) == 1.0
  return cosine_scaled(correct, length, max_len, **scale)
