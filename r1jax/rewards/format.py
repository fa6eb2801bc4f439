"""Format rewards for the R1-Zero template: <think>reasoning</think> then the answer.

Strict: each tag exactly once, in order, nothing but whitespace around the blocks, and nothing
after the answer (text after </answer> is where a policy would hide a second answer). The
tag-count variant gives partial credit early in training, when the strict one is all zeros.
Both are linear scans, cheap enough to run inline in the trainer process.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def split_think(completion: str, think_prefilled: bool = False) -> tuple[str, str] | None:
  """(reasoning, rest after </think>) if the completion is `<think>…</think>…` with each tag once.

  think_prefilled: the prompt already ended with <think>, so the completion must not repeat it.
  """
  text = THINK_OPEN + completion if think_prefilled else completion
  if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
    return None
  body = text.lstrip()
  if not body.startswith(THINK_OPEN):
    return None
  reasoning, _, rest = body[len(THINK_OPEN):].partition(THINK_CLOSE)
  return reasoning, rest


def format_reward(completion: str, require_answer_tag: bool = True,
                  think_prefilled: bool = False) -> float:
  """1.0 for `<think>R</think><answer>A</answer>` (R, A non-empty; whitespace between), else 0.0.

  require_answer_tag=False accepts R1's later form `<think>R</think> summary`: a non-empty
  summary and no answer tags.
  """
  parts = split_think(completion, think_prefilled)
  if parts is None or not parts[0].strip():
    return 0.0
  rest = parts[1].strip()
  if not require_answer_tag:
    return float(bool(rest) and ANSWER_OPEN not in rest and ANSWER_CLOSE not in rest)
  if rest.count(ANSWER_OPEN) != 1 or rest.count(ANSWER_CLOSE) != 1:
    return 0.0
  if not (rest.startswith(ANSWER_OPEN) and rest.endswith(ANSWER_CLOSE)):
    return 0.0  # Text between </think> and <answer>, or after </answer>.
  return float(bool(rest[len(ANSWER_OPEN):-len(ANSWER_CLOSE)].strip()))


def tag_count_reward(completion: str, think_prefilled: bool = False) -> float:
  """Partial credit: 0.25 for each of the four template tags that occurs exactly once."""
  text = THINK_OPEN + completion if think_prefilled else completion
  return sum(0.25 for tag in _TAGS if text.count(tag) == 1)
