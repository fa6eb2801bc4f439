"""Evaluation results: per-question records, pass@1 / pass@k / cons@k aggregates, and reports.

`Report` holds one benchmark's graded questions and writes its JSON and completions;
`markdown_table` puts several reports side by side. `r1jax.evaluate` produces them (by
sampling, or by grading external completions) and the pipeline's report compares them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import numpy as np

from r1jax.core.storage import Path

BREAKDOWN_FIELDS = ("level", "subject", "source")  # meta fields that get their own rows


@dataclasses.dataclass
class QuestionResult:
  """One question's k samples, graded."""

  id: str
  gold: str  # the reference answer as compared
  answers: list[str | None]  # extracted final answer per sample (None: no answer form found)
  correct: list[bool]  # per sample
  majority: str | None  # the winning group's most frequent answer
  majority_votes: int
  majority_correct: bool
  meta: dict  # the BREAKDOWN_FIELDS present in the row's meta
  grading_errors: int = 0  # checks that timed out or crashed (counted as not equivalent)
  lengths: list[int] | None = None  # completion tokens per sample (generation only)
  truncated: list[bool] | None = None  # sample hit max_new_tokens (generation only)

  @property
  def n(self) -> int:
    return len(self.answers)


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
  if not 0 < k <= n:
    raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def aggregate(questions: Sequence[QuestionResult], missing: int = 0) -> dict[str, Any]:
  """Summary numbers of a set of graded questions (k = the fewest samples any question has).

  `missing` benchmark rows had no completions at all: they count as wrong in pass@1, pass@k
  and cons@k (and in `questions`), so a partial file can never raise the headline.
  """
  if not questions:
    return {"questions": missing, "graded": 0, "missing": missing,
            **({"pass@1": 0.0, "pass@k": 0.0, "cons@k": 0.0} if missing else {})}
  k = min(q.n for q in questions)
  zeros = [0.0] * missing
  per_q = np.array([np.mean(q.correct) for q in questions] + zeros)
  out = {"questions": len(per_q), "graded": len(questions), "missing": missing,
         "samples": sum(q.n for q in questions), "k": k,
         "pass@1": float(per_q.mean()),
         "pass@1_stderr": float(per_q.std(ddof=1) / math.sqrt(len(per_q))) if len(per_q) > 1
         else 0.0,
         "pass@k": float(np.mean([pass_at_k(q.n, sum(q.correct), k) for q in questions]
                                 + zeros)),
         "cons@k": float(np.mean([q.majority_correct for q in questions] + zeros)),
         "extracted": float(np.mean([a is not None for q in questions for a in q.answers])),
         "grading_errors": sum(q.grading_errors for q in questions)}
  if any(q.n != k for q in questions):
    out["max_samples"] = max(q.n for q in questions)
  if all(q.lengths is not None for q in questions):
    out["mean_tokens"] = float(np.mean([x for q in questions for x in q.lengths]))
    out["truncated"] = float(np.mean([x for q in questions for x in q.truncated]))
  return out


def _sort_key(value: str):
  try:
    return (0, float(value), "")
  except ValueError:
    return (1, 0.0, value)


@dataclasses.dataclass
class Report:
  """A graded benchmark: per-question results plus what could not be matched."""

  benchmark: str
  questions: list[QuestionResult]
  settings: dict = dataclasses.field(default_factory=dict)  # sampling / source facts
  missing_ids: list[str] = dataclasses.field(default_factory=list)  # rows with no completions
  unmatched_ids: list[str] = dataclasses.field(default_factory=list)  # completions, no row
  skipped: int = 0  # benchmark rows that could not be used (bad rows, prompts too long)
  malformed_lines: list[int] = dataclasses.field(default_factory=list)  # unreadable completions
  completions: list[list[str]] | None = None  # raw texts (generation); not in the JSON

  def summary(self) -> dict[str, Any]:
    """The headline: rows without completions (missing_ids) count as wrong."""
    return aggregate(self.questions, missing=len(self.missing_ids))

  def breakdown(self) -> dict[str, dict[str, dict[str, Any]]]:
    """field -> value -> summary, for each BREAKDOWN_FIELD with at least two values."""
    out = {}
    for field in BREAKDOWN_FIELDS:
      groups: dict[str, list[QuestionResult]] = {}
      for q in self.questions:
        if field in q.meta:
          groups.setdefault(str(q.meta[field]), []).append(q)
      if len(groups) >= 2:
        out[field] = {v: aggregate(groups[v]) for v in sorted(groups, key=_sort_key)}
    return out

  def to_dict(self) -> dict[str, Any]:
    return {"benchmark": self.benchmark, "settings": self.settings, "summary": self.summary(),
            "breakdown": self.breakdown(), "missing_ids": self.missing_ids,
            "unmatched_ids": self.unmatched_ids, "skipped": self.skipped,
            "malformed_lines": self.malformed_lines,
            "questions": [dataclasses.asdict(q) for q in self.questions]}

  def to_json(self, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
    return path

  @classmethod
  def from_json(cls, path: str | Path) -> Report:
    d = json.loads(Path(path).read_text())
    return cls(d["benchmark"], [QuestionResult(**q) for q in d["questions"]], d["settings"],
               d["missing_ids"], d["unmatched_ids"], d["skipped"], d.get("malformed_lines", []))

  def save_completions(self, path: str | Path) -> Path:
    """Writes {"id", "completions"} lines: the format grade_file reads back."""
    if self.completions is None:
      raise ValueError("this report holds no completions")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
      for q, texts in zip(self.questions, self.completions):
        f.write(json.dumps({"id": q.id, "completions": texts}) + "\n")
    return path


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def markdown_table(reports: Sequence[Report]) -> str:
  """One table: a row per benchmark, then its per-level / per-subject rows; notes below."""
  lines = ["| benchmark | subset | questions | k | pass@1 (%) | pass@k (%) | cons@k (%) | "
           "answered (%) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  notes = []

  def row(name, subset, s):
    if not s.get("graded", s["questions"]):  # nothing graded: all wrong if rows were missing
      zero = f" {_pct(0.0)} |" if s["questions"] else " |"
      lines.append(f"| {name} | {subset} | {s['questions']} | |{zero * 3} |")
      return
    lines.append(f"| {name} | {subset} | {s['questions']} | {s['k']} | {_pct(s['pass@1'])} ± "
                 f"{_pct(s['pass@1_stderr'])} | {_pct(s['pass@k'])} | {_pct(s['cons@k'])} | "
                 f"{_pct(s['extracted'])} |")

  for r in reports:
    s = r.summary()
    row(r.benchmark, "all", s)
    for field, groups in r.breakdown().items():
      for value, g in groups.items():
        row(r.benchmark, f"{field} {value}", g)
    facts = [f"{len(r.missing_ids)} rows without completions (counted as wrong)"
             if r.missing_ids else "",
             f"{len(r.unmatched_ids)} completion ids not in the benchmark"
             if r.unmatched_ids else "",
             f"{r.skipped} rows skipped" if r.skipped else "",
             f"{len(r.malformed_lines)} malformed completion lines" if r.malformed_lines else "",
             f"{s.get('grading_errors')} grading checks failed" if s.get("grading_errors") else "",
             f"samples per question vary ({s['k']}–{s['max_samples']})"
             if "max_samples" in s else "",
             f"mean {s['mean_tokens']:.0f} tokens, {_pct(s['truncated'])}% truncated"
             if "mean_tokens" in s else ""]
    settings = ", ".join(f"{k}={v}" for k, v in r.settings.items()
                         if k in ("temperature", "top_p", "max_new_tokens", "template"))
    facts = [f for f in facts + [settings] if f]
    if facts:
      notes.append(f"- {r.benchmark}: " + "; ".join(facts))
  return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
