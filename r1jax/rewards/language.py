"""Language-consistency reward: the share of chain-of-thought words in the target language.

R1 adds it to stop language mixing. Words are counted per script: a run of Latin letters is
one English word; each Han character is one Chinese word (Chinese has no spaces, so splitting
on whitespace would score a Chinese CoT as one giant word or zero). Math ($…$, \\(…\\), \\[…\\],
LaTeX commands), code (fenced or inline), numbers, URLs and single-letter variables are
neutral: they count for no language, so a formula-heavy CoT is not punished.

One Han character is one word, so Chinese weighs about double in a mixed CoT: a Chinese word
is mostly two characters ("然后", "then", counts 2 against 1). R1 measures the share of target-
language words the same way; the synthetic world's mixed solutions (data/synthetic.py World)
are scored as written, and the report states the reward, not a share of meaning.
"""

from __future__ import annotations

import re

from r1jax.rewards import format as format_lib

LANGS = ("en", "zh")
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_LATIN = "A-Za-z\u00c0-\u024f"
# Delimited neutral spans: (opener, closer). An unclosed ``` runs to the end (truncated code);
# other unclosed openers are plain text.
_SPANS = (("```", "```"), ("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("`", "`"), ("$", "$"))
_COMMAND_OR_URL_RE = re.compile(r"\\[A-Za-z]+|https?://\S+")
_WORD_RE = re.compile(
    rf"(?P<zh>[{_HAN}])"
    rf"|(?P<en>[{_LATIN}]+(?:'[{_LATIN}]+)*)"
    rf"|(?P<other>[^\W\d_{_LATIN}{_HAN}]+)")
# Single Latin letters are variables (x, n) except these English words.
_ONE_LETTER_WORDS = {"a", "A", "I"}


def reasoning_text(completion: str) -> str:
  """The chain of thought: inside <think>…</think>, after an unclosed <think>, else everything."""
  start = completion.find(format_lib.THINK_OPEN)
  start = 0 if start < 0 else start + len(format_lib.THINK_OPEN)
  end = completion.find(format_lib.THINK_CLOSE, start)
  return completion[start:] if end < 0 else completion[start:end]


def strip_neutral(text: str) -> str:
  """Replaces code, math, LaTeX commands and URLs with spaces, in linear time.

  A hand-written scan rather than one regex: lazy `.*?` patterns go quadratic on adversarial
  input such as thousands of unclosed `\\[`, and this runs inline in the trainer.
  """
  out, pos, n = [], 0, len(text)
  next_at = {opener: text.find(opener) for opener, _ in _SPANS}
  while pos < n:
    for opener in next_at:  # Refresh stale positions; each find only moves forward.
      if 0 <= next_at[opener] < pos:
        next_at[opener] = text.find(opener, pos)
    found = [(at, -len(o), o) for o, at in next_at.items() if at >= 0]
    if not found:
      break
    at, _, opener = min(found)  # Earliest opener; the longest one wins a tie ("$$" over "$").
    closer = dict(_SPANS)[opener]
    end = text.find(closer, at + len(opener))
    if end < 0:
      if opener == "```":
        out.append(text[pos:at])
        pos = n
        break
      next_at[opener] = -1  # No closer anywhere after: this opener is plain text from now on.
      continue
    out.append(text[pos:at])
    out.append(" ")
    pos = end + len(closer)
  out.append(text[pos:])
  return _COMMAND_OR_URL_RE.sub(" ", "".join(out))


def word_counts(text: str) -> dict[str, int]:
  """Counts words per language ("en", "zh", "other") after removing neutral spans."""
  counts = {"en": 0, "zh": 0, "other": 0}
  for m in _WORD_RE.finditer(strip_neutral(text)):
    lang = m.lastgroup
    if lang == "en" and len(m.group()) == 1 and m.group() not in _ONE_LETTER_WORDS:
      continue
    counts[lang] += 1
  return counts


def language_consistency_reward(completion: str, lang: str = "en",
                                whole_completion: bool = False) -> float:
  """Fraction of the CoT's words in `lang` ("en" or "zh"); 1.0 when it has no words at all.

  A CoT of only formulas has nothing to mix, so it scores 1.0 rather than being punished.
  whole_completion=True scores the full response instead of the reasoning only.
  """
  if lang not in LANGS:
    raise ValueError(f"unsupported language {lang!r}; expected one of {LANGS}")
  counts = word_counts(completion if whole_completion else reasoning_text(completion))
  total = sum(counts.values())
  return 1.0 if total == 0 else counts[lang] / total
