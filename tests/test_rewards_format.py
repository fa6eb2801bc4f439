"""Format rewards: the strict R1-Zero template and the tag-count partial credit."""

import pytest

from r1jax.rewards import format as format_lib

GOOD = "<think>2 + 2 is 4</think>\n<answer>4</answer>"


@pytest.mark.parametrize("completion, strict, tags", [
    (GOOD, 1.0, 1.0),
    ("  " + GOOD + "\n\n", 1.0, 1.0),  # Surrounding whitespace is fine.
    ("<think>r</think><answer>4</answer> and also 5", 0.0, 1.0),  # Text after the answer.
    ("<think>r</think>So:<answer>4</answer>", 0.0, 1.0),  # Text between the blocks.
    ("Sure! <think>r</think><answer>4</answer>", 0.0, 1.0),  # Text before <think>.
    ("<think>r</think><answer>4</answer><answer>5</answer>", 0.0, 0.5),  # Two answers.
    ("<think>a</think><think>b</think><answer>4</answer>", 0.0, 0.5),
    ("<answer>4</answer><think>r</think>", 0.0, 1.0),  # Wrong order.
    ("<think> </think><answer>4</answer>", 0.0, 1.0),  # Empty reasoning.
    ("<think>r</think><answer> </answer>", 0.0, 1.0),  # Empty answer.
    ("<think>r</think><answer>4", 0.0, 0.75),  # Truncated.
    ("<think>r", 0.0, 0.25),
    ("4", 0.0, 0.0),
    ("", 0.0, 0.0),
])
def test_strict_and_tag_count(completion, strict, tags):
  assert format_lib.format_reward(completion) == strict
  assert format_lib.tag_count_reward(completion) == tags


def test_summary_form_without_answer_tags():
  assert format_lib.format_reward("<think>r</think>\nThe answer is 4.",
                                  require_answer_tag=False) == 1.0
  assert format_lib.format_reward("<think>r</think>  ", require_answer_tag=False) == 0.0
  assert format_lib.format_reward("<think>r</think>x<answer>4</answer>",
                                  require_answer_tag=False) == 0.0
  assert format_lib.format_reward("The answer is 4.", require_answer_tag=False) == 0.0


def test_prefilled_think_tag():
  """When the prompt ends with <think>, the completion starts inside the reasoning."""
  completion = "2 + 2 is 4</think><answer>4</answer>"
  assert format_lib.format_reward(completion, think_prefilled=True) == 1.0
  assert format_lib.format_reward(completion) == 0.0
  assert format_lib.format_reward("<think>" + completion, think_prefilled=True) == 0.0
  assert format_lib.tag_count_reward(completion, think_prefilled=True) == 1.0


def test_linear_time_on_huge_input():
  import time  # pylint: disable=g-import-not-at-top
  text = "<think>" * 200_000 + "</answer>" * 200_000
  start = time.monotonic()
  assert format_lib.format_reward(text) == 0.0 and format_lib.tag_count_reward(text) == 0.0
  assert time.monotonic() - start < 1.0
