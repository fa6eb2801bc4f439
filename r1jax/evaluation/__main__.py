"""`python -m r1jax.evaluation`: grade completion files against benchmarks.

Writes OUT/<benchmark>.json and OUT/report.md (see evaluation/external.py). Rows without
completions count as wrong; the exit status is 1 when a benchmark had nothing to grade.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import app, flags

from r1jax.core.storage import Path
from r1jax.evaluation.external import grade_file
from r1jax.evaluation.report import markdown_table
from r1jax.rewards import pool as pool_lib

flags.DEFINE_string("benchmark", None, "Benchmark file(s) (jsonl/parquet), comma-separated.")
flags.DEFINE_string("completions", None, "Completion jsonl file(s), one per benchmark, of "
                    '{"id", "completions": [str]} (or {"id", "completion": str}) lines.')
flags.DEFINE_string("out", None, "Folder for <benchmark>.json and report.md.")
flags.DEFINE_string("adapter", "auto", "Benchmark row format: auto, math, gsm8k, generic, ….")
flags.DEFINE_integer("workers", 0, "Grading processes (0: min(4, CPUs)).")
flags.DEFINE_float("timeout_s", 10.0, "Hard time limit of one equivalence check.")
flags.mark_flags_as_required(["benchmark", "completions", "out"])


def main(argv: Sequence[str]) -> None:
  """Grades completion files against benchmarks; writes OUT/<name>.json and OUT/report.md."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  benchmarks, completions = f.benchmark.split(","), f.completions.split(",")
  if len(benchmarks) != len(completions):
    raise app.UsageError(f"{len(benchmarks)} benchmarks but {len(completions)} completion files")
  reports = []
  with pool_lib.RewardPool(num_workers=f.workers or min(4, os.cpu_count() or 1),
                           timeout_s=f.timeout_s) as pool:
    for b, c in zip(benchmarks, completions):
      reports.append(grade_file(b, c, adapter=f.adapter, timeout_s=f.timeout_s, pool=pool))
      reports[-1].to_json(Path(f.out) / f"{reports[-1].benchmark}.json")
  table = markdown_table(reports)
  (Path(f.out) / "report.md").write_text(table)
  print(table, flush=True)
  empty = [r.benchmark for r in reports if not r.questions]
  if empty:  # a typo'd or mismatched file must not look like a (zero) score
    sys.exit(f"nothing was graded for {', '.join(empty)}: no completion id matched a row")


if __name__ == "__main__":
  app.run(main)
