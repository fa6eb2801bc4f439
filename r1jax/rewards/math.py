"""Math answer extraction (\\boxed{}, <answer>, ####) and equivalence checking via math-verify.

Extraction is deliberately strict: only an explicit final-answer form counts, never "the last
number in the text", because loose extraction is what reward hacking feeds on. Equivalence is
decided by math-verify (latex2sympy + sympy). Its signal-based timeouts only work in a main
thread and cannot interrupt C code (huge integer powers), so the trainer runs `accuracy_reward`
in a `pool.RewardPool` worker with a hard timeout (the registry's "accuracy" reward).
"""

from __future__ import annotations

import functools
import logging
import re
import threading

from r1jax.data.answers import boxed_contents, strip_wrappers

# An answer longer than this is not a final answer; refusing it early also bounds parser work.
MAX_ANSWER_CHARS = 1000
# math-verify's own (soft, signal-based) timeouts, used only in a main thread.
SOFT_TIMEOUT_S = 3
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_THINK_CLOSE = "</think>"


def answer_region(completion: str) -> str:
  """The part of a completion that may hold the final answer: after the last </think> if any."""
  k = completion.rfind(_THINK_CLOSE)
  return completion if k < 0 else completion[k + len(_THINK_CLOSE):]


def answer_tag_content(text: str) -> str | None:
  """Content of the last closed <answer>...</answer>, or None."""
  start = text.rfind("<answer>")
  if start < 0:
    return None
  end = text.find("</answer>", start)
  return None if end < 0 else text[start + len("<answer>"):end]


def extract_answer(completion: str) -> str | None:
  """The final answer: <answer> (its last \\boxed or $…$ if any), else last \\boxed, else #### N."""
  region = answer_region(completion)
  tagged = answer_tag_content(region)
  if tagged is not None:
    boxed = boxed_contents(tagged)
    if boxed:
      return strip_wrappers(boxed[-1])
    spans = re.findall(r"\$([^$]+)\$", tagged)
    return strip_wrappers(spans[-1] if spans else tagged)
  boxed = boxed_contents(region)
  if boxed:
    return strip_wrappers(boxed[-1])
  found = _GSM8K_RE.findall(region)
  return strip_wrappers(found[-1]) if found else None


def gold_answer(gold: str | int | float) -> str:
  """The reference answer: a number, a LaTeX answer, or a solution ending in \\boxed{} / #### N."""
  if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
    raise TypeError(f"gold must be str or number, got {type(gold).__name__}")
  if not isinstance(gold, str):
    return repr(gold)
  boxed = boxed_contents(gold)
  if boxed:
    return strip_wrappers(boxed[-1])
  found = _GSM8K_RE.findall(gold)
  return strip_wrappers(found[-1] if found else gold)


@functools.lru_cache(maxsize=1)
def _math_verify():
  """Imports math-verify lazily: it pulls in sympy (~1 s), which cheap callers should not pay."""
  import math_verify  # pylint: disable=g-import-not-at-top
  # It logs every timeout with the whole input; we count failures ourselves.
  for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
    logging.getLogger(name).setLevel(logging.ERROR)
  config = [math_verify.LatexExtractionConfig(boxed_match_priority=0),
            math_verify.ExprExtractionConfig()]
  return math_verify, config


def _parse(answer: str, soft_timeout: int | None) -> list:
  mv, config = _math_verify()
  # Wrapping in \boxed{} makes math-verify parse exactly this answer, not search the text for one.
  return mv.parse("\\boxed{" + answer + "}", extraction_config=config,
                  parsing_timeout=soft_timeout)


def answers_equivalent(pred: str, gold: str) -> bool:
  """True when two extracted answers are mathematically equivalent (math-verify, in-process).

  Not protected against hangs in C code: call it inside a pool worker.
  """
  pred, gold = pred.strip(), gold.strip()
  if not pred or not gold or len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
    return False
  soft = SOFT_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
  mv, _ = _math_verify()
  gold_parsed, pred_parsed = _parse(gold, soft), _parse(pred, soft)
  if not gold_parsed or not pred_parsed:
    return False
  return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=soft))


def accuracy_reward(completion: str, gold: str | int | float) -> float:
  """1.0 if the completion's final answer equals gold mathematically, else 0.0.

  In-process: run it in a pool worker for a hard timeout, as the registry's "accuracy" does.
  """
  pred = extract_answer(completion)
  if pred is None:
    return 0.0
  gold = gold_answer(gold)
  if "".join(pred.split()) == "".join(gold.split()) and gold.strip():
    return 1.0  # the same answer, as evaluation counts it, whatever math-verify can parse
  return 1.0 if answers_equivalent(pred, gold) else 0.0

