"""How final answers are written: balanced \\boxed{} contents and wrappers around an answer.

Plain text functions, shared by the row adapters (a MATH solution's gold is its last boxed
expression, data/rows.py) and the graders (rewards/math.py extracts a completion's answer the
same way), so gold and prediction are always read alike.
"""

from __future__ import annotations

import re

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # An escape (\{, \}, \\) or a brace.


def brace_matches(text: str) -> dict[int, int]:
  """Maps each '{' index to its matching '}' index in one O(n) pass; escaped braces are skipped."""
  match, stack = {}, []
  for m in _BRACE_RE.finditer(text):  # Visits only braces and escapes, not every character.
    c = m.group()
    if c == "{":
      stack.append(m.start())
    elif c == "}" and stack:
      match[stack.pop()] = m.start()
  return match


def boxed_contents(text: str) -> list[str]:
  """Contents of every balanced \\boxed{...} / \\fbox{...} (and `\\boxed 5`), in text order."""
  out, match = [], None
  for m in _BOXED_RE.finditer(text):
    j = m.end()
    while j < len(text) and text[j] == " ":
      j += 1
    if j < len(text) and text[j] == "{":
      match = brace_matches(text) if match is None else match
      if j in match:
        out.append(text[j + 1:match[j]])
    elif j > m.end():  # "\boxed 5": the argument is the next whitespace-delimited token.
      token = re.match(r"[^\s$]+", text[j:])
      if token:
        out.append(token.group(0))
  return out


def strip_wrappers(answer: str) -> str:
  """Removes wrappers around a whole answer: markdown bold/italic/code, $…$, \\(…\\), final period.

  Markdown bold is stripped deliberately (an <answer>**5**</answer> means 5) but only when it
  wraps the entire answer, so Python-style powers such as x**2 are left intact.
  """
  prev = None
  s = answer.strip()
  while s != prev:
    prev = s
    for left, right in (("**", "**"), ("__", "__"), ("`", "`"), ("$$", "$$"), ("$", "$"),
                        ("\\(", "\\)"), ("\\[", "\\]"), ("*", "*")):
      if len(s) >= len(left) + len(right) + 1 and s.startswith(left) and s.endswith(right):
        s = s[len(left):len(s) - len(right)].strip()
    s = s.rstrip(".").strip()
  return s
