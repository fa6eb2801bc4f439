"""Grading completions made elsewhere (e.g. vLLM) against a benchmark, matched by row id.

`python -m r1jax.evaluation --benchmark=B.jsonl --completions=C.jsonl --out=DIR` (see
__main__.py) runs `grade_file` with the same answer extraction, verifier and aggregates as
the trainer's own evaluation.
"""

from __future__ import annotations

import logging

from r1jax.core.storage import Path
from r1jax.data import rows as datasets
from r1jax.evaluation.evaluate import benchmark_name, score_completions
from r1jax.evaluation.report import Report
from r1jax.rewards import pool as pool_lib

log = logging.getLogger(__name__)


def read_completions(path: str | Path) -> tuple[dict[str, list[str]], list[int]]:
  """id -> texts (lines of one id accumulate in file order), and the malformed lines skipped."""
  out: dict[str, list[str]] = {}
  malformed = []
  for line, record in datasets.read_records(path):
    try:
      if isinstance(record, datasets.RowError):
        raise record
      rid, texts = record.get("id"), record.get("completions", [record.get("completion")])
      if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise datasets.RowError("bad_id", f"'id' must be a str or int, got {rid!r}"[:120])
      if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise datasets.RowError("bad_completions", "need 'completions': [str] or 'completion': str")
    except datasets.RowError as e:
      malformed.append(line)
      datasets.log_bad_row(path, datasets.BadRow(line, e.reason, e.detail))
      continue
    out.setdefault(str(rid), []).extend(texts)
  return out, malformed


def grade_file(benchmark_path: str | Path, completions_path: str | Path, *,
               adapter: str = "auto", workers: int | None = None, timeout_s: float = 10.0,
               pool: pool_lib.RewardPool | None = None) -> Report:
  """Grades a jsonl of {"id", "completions"} (or {"id", "completion"}) lines against a benchmark.

  Rows without completions are listed in `missing_ids` and count as wrong in the headline;
  a benchmark with repeated ids is refused.
  """
  rows, bad_rows = datasets.load_rows(benchmark_path, adapter)
  datasets.check_unique_ids(rows, benchmark_path)
  by_id, malformed = read_completions(completions_path)
  name, known = benchmark_name(benchmark_path), {r["id"] for r in rows}
  graded = [r for r in rows if by_id.get(r["id"])]
  settings = {"completions": str(completions_path)}
  report = (score_completions(graded, [by_id[r["id"]] for r in graded], benchmark=name,
                              pool=pool, workers=workers, timeout_s=timeout_s, settings=settings)
            if graded else Report(name, [], settings))
  report.missing_ids = [r["id"] for r in rows if not by_id.get(r["id"])]
  report.unmatched_ids = [i for i in by_id if i not in known]
  report.skipped, report.malformed_lines = len(bad_rows), malformed
  if report.missing_ids or report.unmatched_ids or malformed:
    log.warning("%s: %d rows without completions, %d unknown ids, %d malformed lines", name,
                len(report.missing_ids), len(report.unmatched_ids), len(malformed))
  return report
