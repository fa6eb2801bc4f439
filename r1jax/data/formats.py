"""R1's readable response format, stated once as data, and the cold-start conversion into it.

R1-Zero answers `<think>R</think> <answer>A</answer>`. R1's cold-start data is written in a
"readable format": the reasoning, then a summary that states the result, final answer boxed.
`READABLE` is that format; every stage that writes or checks it (the cold-start builder, the
`readable` filter of rejection sampling, the SFT data that follows) uses it, so the format
lives here only:

  <think>
  {reasoning}
  </think>

  {summary}            summary = READABLE.summary, with {answer} boxed: \\boxed{12}

Plain text functions, no model or grader: the conversion reads the answer the same way the
graders do (data/answers.py).
"""

from __future__ import annotations

import dataclasses
import re

from r1jax.data.answers import boxed_contents, strip_wrappers


@dataclasses.dataclass(frozen=True)
class ReadableFormat:
  """A response = reasoning inside think tags, then a non-empty summary with a boxed answer."""

  think_open: str = "<think>"
  think_close: str = "</think>"
  response: str = "{think_open}\n{reasoning}\n{think_close}\n\n{summary}"
  summary: str = "The final answer is $\\boxed{{{answer}}}$."
  max_summary_chars: int = 2000  # a "summary" longer than this is a second essay, not one

  def render(self, reasoning: str, summary: str) -> str:
    return self.response.format(think_open=self.think_open, reasoning=reasoning.strip(),
                                think_close=self.think_close, summary=summary.strip())


READABLE = ReadableFormat()

_ZERO_RE = re.compile(r"\s*<think>(?P<r>.*?)</think>\s*<answer>(?P<a>.*?)</answer>\s*\Z",
                      re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def parse_readable(text: str, fmt: ReadableFormat = READABLE) -> tuple[str, str] | None:
  """(reasoning, summary) when `text` is in the readable format, else None.

  Readable: the think tags once each, in order, nothing but whitespace before the reasoning,
  non-empty reasoning, a non-empty summary of at most `max_summary_chars` holding a \\boxed{}
  answer, and no R1-Zero answer tags anywhere.
  """
  if text.count(fmt.think_open) != 1 or text.count(fmt.think_close) != 1:
    return None
  if "<answer>" in text or "</answer>" in text:
    return None
  head, _, rest = text.partition(fmt.think_open)
  if head.strip():
    return None
  reasoning, _, summary = rest.partition(fmt.think_close)
  reasoning, summary = reasoning.strip(), summary.strip()
  if not reasoning or not summary or len(summary) > fmt.max_summary_chars:
    return None
  if not boxed_contents(summary):
    return None
  return reasoning, summary


def zero_to_readable(text: str, fmt: ReadableFormat = READABLE) -> str | None:
  """An R1-Zero `<think>R</think> <answer>A</answer>` response in the readable format.

  The summary states A's final answer (its last \\boxed{} if it has one, else A without
  wrappers) boxed. None when the input is not cleanly in the R1-Zero format (a tag missing or
  repeated, text after </answer>, empty reasoning or answer): such outputs are dropped, not
  repaired, as the paper's cold-start filtering does.
  """
  m = _ZERO_RE.match(text)
  if m is None or any(m.group("r").count(t) or m.group("a").count(t) for t in _TAGS):
    return None
  reasoning, answer = m.group("r").strip(), m.group("a").strip()
  boxed = boxed_contents(answer)
  final = strip_wrappers(boxed[-1] if boxed else answer)
  if not reasoning or not final or "\n" in final:
    return None
  return fmt.render(reasoning, fmt.summary.format(answer=final))
