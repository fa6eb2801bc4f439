"""Rejection-sampling filters: why a sampled response is not kept as SFT data, and selection.

R1's rejection sampling keeps only correct responses and drops chains of thought "with mixed
languages, long paragraphs, and code blocks". Here each of those, plus degenerate repetition,
truncation and a missing readable structure, is one named check (`REASONS`). A sample gets
every reason that applies, so each filter's count says what it alone rejects; a sample is
accepted when it has none. The verifier is a reward of the spec RL uses (its value must reach
`min_verifier`); a reward that crashed rejects the sample as "reward_error" instead of
stopping the run. Pure host functions on text and already-computed rewards.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Mapping, Sequence

import numpy as np

from r1jax.core.config import typed
from r1jax.data.formats import parse_readable
from r1jax.rewards import format as format_lib
from r1jax.rewards import language

REASONS = ("reward_error", "wrong", "mixed_language", "long_paragraph", "code_block",
           "repetition", "truncated", "unreadable")
STRUCTURES = ("", "zero", "readable")
SELECTIONS = ("first", "shortest", "random")
_PARAGRAPH_RE = re.compile(r"\n\s*\n")
_FENCE = "```"
# Repetition units: a Latin word, a number, or any other single non-space character (so a
# Chinese loop is caught character by character).
_UNIT_RE = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")


@dataclasses.dataclass(frozen=True)
class Filters:
  """Which checks run, with their thresholds (0 / '' / False switches one off)."""

  verifier: str = "accuracy"  # reward key that decides "wrong"; '' = no verifier
  min_verifier: float = 1.0  # a verifier value below this is "wrong"
  language: str = ""  # "en" / "zh": the chain of thought's language ('' = off)
  min_language: float = 0.95  # language-consistency score below this is "mixed_language"
  max_paragraph_chars: int = 0  # a paragraph (blank-line separated) longer is "long_paragraph"
  code_blocks: bool = False  # a fenced ``` block in a non-code task is "code_block"
  repetition_ngram: int = 0  # n: an n-unit sequence repeated …
  repetition_max: int = 4  # … this many times or more is "repetition"
  truncated: bool = True  # a response that hit the token budget is "truncated"
  structure: str = ""  # "zero": strict R1-Zero tags; "readable": data/formats.READABLE

  def __post_init__(self):
    if self.language and self.language not in language.LANGS:
      raise ValueError(f"filters.language must be '' or one of {language.LANGS}, "
                       f"got {self.language!r}")
    if self.structure not in STRUCTURES:
      raise ValueError(f"filters.structure must be one of {STRUCTURES}, got {self.structure!r}")
    if self.max_paragraph_chars < 0 or self.repetition_ngram < 0 or self.repetition_max < 2:
      raise ValueError("filters: max_paragraph_chars and repetition_ngram must be >= 0 and "
                       f"repetition_max >= 2, got {self.max_paragraph_chars}, "
                       f"{self.repetition_ngram}, {self.repetition_max}")

  @classmethod
  def from_config(cls, c: Mapping) -> Filters:
    return typed(cls, "filters", c)


def longest_paragraph(text: str) -> int:
  """Characters in the longest blank-line-separated paragraph (whitespace-trimmed)."""
  return max((len(p.strip()) for p in _PARAGRAPH_RE.split(text)), default=0)


def has_code_block(text: str) -> bool:
  """A fenced ``` block, closed or not (a truncated one counts)."""
  return _FENCE in text


def max_ngram_repeats(text: str, n: int) -> int:
  """How often the most frequent n-unit sequence occurs (units: see _UNIT_RE); 0 if too short."""
  units = _UNIT_RE.findall(text)
  if n < 1 or len(units) < n:
    return 0
  counts = collections.Counter(tuple(units[i:i + n]) for i in range(len(units) - n + 1))
  return max(counts.values())


def has_structure(text: str, structure: str) -> bool:
  """Whether a response has the required shape ('' accepts anything)."""
  if structure == "zero":
    return format_lib.format_reward(text) == 1.0
  if structure == "readable":
    return parse_readable(text) is not None
  return True


def reject_reasons(f: Filters, text: str, *, task: str = "math", truncated: bool = False,
                   rewards: Mapping[str, float] | None = None,
                   failed: Mapping[str, bool] | None = None) -> list[str]:
  """Every reason (in REASONS order) that rejects one response; [] = accepted.

  rewards / failed: this sample's reward values and crash flags by key (NaN where a reward
  does not apply to its task). A verifier that does not apply (another task) never rejects.
  """
  rewards, failed = dict(rewards or {}), dict(failed or {})
  out = []
  if any(failed.values()):
    out.append("reward_error")
  if f.verifier:
    if f.verifier not in rewards:
      raise KeyError(f"filters.verifier {f.verifier!r} is not a reward of the spec "
                     f"(have {sorted(rewards)})")
    value = rewards[f.verifier]
    if not failed.get(f.verifier) and not np.isnan(value) and value < f.min_verifier:
      out.append("wrong")
  if f.language and language.language_consistency_reward(text, f.language) < f.min_language:
    out.append("mixed_language")
  if f.max_paragraph_chars and longest_paragraph(
      language.reasoning_text(text)) > f.max_paragraph_chars:
    out.append("long_paragraph")
  if f.code_blocks and task != "code" and has_code_block(text):
    out.append("code_block")
  if f.repetition_ngram and max_ngram_repeats(text, f.repetition_ngram) >= f.repetition_max:
    out.append("repetition")
  if f.truncated and truncated:
    out.append("truncated")
  if not has_structure(text, f.structure):
    out.append("unreadable")
  return out


def select(accepted: Sequence[int], lengths: Sequence[int], m: int, how: str,
           rng: np.random.Generator) -> list[int]:
  """Up to m of the accepted sample indices (m = 0: all), in sample order.

  first: the earliest; shortest: the fewest tokens (ties: earliest); random: uniformly, from
  `rng` (seed it per prompt so a resumed run draws the same).
  """
  if how not in SELECTIONS:
    raise ValueError(f"selection must be one of {SELECTIONS}, got {how!r}")
  idx = list(accepted)
  if m <= 0 or len(idx) <= m:
    return idx
  if how == "first":
    return idx[:m]
  if how == "shortest":
    return sorted(sorted(idx, key=lambda i: (lengths[i], i))[:m])
  return sorted(int(i) for i in rng.choice(idx, size=m, replace=False))


def carries_signal(pass_rate: float, min_pass: float, max_pass: float) -> bool:
  """Whether an RL prompt is worth keeping: min_pass <= pass rate <= max_pass.

  With (min_pass, max_pass) just inside (0, 1), prompts the model always or never solves are
  dropped: every sample of their GRPO group gets the same reward, so zero advantage.
  """
  return min_pass <= pass_rate <= max_pass
