"""A config's `eval` group made concrete: its benchmarks, an engine to sample them, reports.

The `rl` stage runs the suite before its first update and every `eval.every` steps; the `eval`
stage runs it once. Both read the same fields, sample with the same engine settings and write
WORKDIR/eval/…/<benchmark>.json and .completions.jsonl, so their numbers compare directly.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from r1jax.core.config import ModelConfig
from r1jax.core.storage import Path
from r1jax.core.tokenizer import Tokenizer
from r1jax.data.rows import check_bad_share, check_unique_ids, load_rows
from r1jax.evaluation.evaluate import benchmark_name, evaluate, summary_metrics
from r1jax.evaluation.report import Report
from r1jax.generation.engine import Engine
from r1jax.rewards import pool as pool_lib
from r1jax.rewards.format import format_reward


def format_rate(report: Report) -> float:
  """Share of a report's completions that satisfy the strict R1-Zero format."""
  texts = [t for q in (report.completions or []) for t in q]
  return float(np.mean([format_reward(t) for t in texts])) if texts else float("nan")


def benchmark_key(seed: int, name: str) -> jax.Array:
  """A benchmark's sampling key: depends on its name, not on which others run beside it."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) >> 1)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One benchmark file's usable rows."""

  name: str  # benchmark_name(path): math500/test.jsonl -> math500
  path: str
  rows: list[dict]
  skipped: int  # malformed rows in the file


@dataclasses.dataclass(frozen=True)
class EvalSuite:
  """Benchmarks plus the sampling protocol (R1: k samples, T 0.6, top-p 0.95)."""

  sets: tuple[EvalSet, ...]
  engine: Engine
  k: int
  template: str
  system: str | None
  max_prompt_tokens: int
  batch_size: int

  def run(self, params, key_of: Callable[[str], jax.Array], pool: pool_lib.RewardPool,
          out_dir: Path | None = None, progress: bool = False,
          settings: dict | None = None) -> list[Report]:
    """One report per benchmark (`settings` added to each); written to out_dir (process 0
    only) when given."""
    reports = []
    for s in self.sets:
      report = evaluate(params, self.engine, s.rows, key=key_of(s.name), k=self.k,
                        template=self.template, system=self.system,
                        max_prompt_tokens=self.max_prompt_tokens, batch_size=self.batch_size,
                        benchmark=s.name, pool=pool, progress=progress)
      report.skipped += s.skipped
      report.settings.update(path=s.path, **(settings or {}))
      if out_dir is not None and jax.process_index() == 0:
        report.to_json(Path(out_dir) / f"{s.name}.json")
        report.save_completions(Path(out_dir) / f"{s.name}.completions.jsonl")
      reports.append(report)
    return reports


def metrics(reports: Sequence[Report]) -> dict[str, float]:
  """eval/<benchmark>/{pass@1, cons@k, …, format} for the metrics log."""
  out: dict[str, float] = {}
  for report in reports:
    out.update(summary_metrics(report))
    out[f"eval/{report.benchmark}/format"] = format_rate(report)
  return out


def load_sets(e: ml_collections.ConfigDict, max_bad_share: float = 1.0
              ) -> tuple[EvalSet, ...]:
  """Each benchmark of e.benchmarks (first e.limit rows); names must be distinct, and more
  than `max_bad_share` of a file's rows unusable stops (DataError)."""
  paths = [p.strip() for p in str(e.benchmarks).split(",") if p.strip()]
  names = [benchmark_name(p) for p in paths]
  if len(set(names)) != len(names):
    raise ValueError(f"config.eval.benchmarks={e.benchmarks!r} must name files with distinct "
                     f"names (got {names})")
  out = []
  for path, name in zip(paths, names):
    rows, bad = load_rows(path, e.get("adapter", "auto"), limit=e.limit or None)
    check_bad_share(path, len(rows), bad, max_bad_share)
    check_unique_ids(rows, path)
    out.append(EvalSet(name, path, rows, len(bad)))
  return tuple(out)


def make_suite(e: ml_collections.ConfigDict, cfg: ModelConfig, mesh: Mesh | None,
               tokenizer: Tokenizer, sets: tuple[EvalSet, ...] | None = None) -> EvalSuite:
  """The suite for eval group `e` (benchmarks loaded unless `sets` is given)."""
  if e.max_prompt_tokens + e.max_new_tokens > cfg.max_position and (sets or e.benchmarks):
    raise ValueError(f"eval: max_prompt_tokens {e.max_prompt_tokens} + max_new_tokens "
                     f"{e.max_new_tokens} exceeds the model's max_position {cfg.max_position}")
  engine = Engine(cfg, mesh, tokenizer, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                  max_new_tokens=e.max_new_tokens, max_prompt_len=e.max_prompt_tokens,
                  stop=tuple(e.stop))
  return EvalSuite(load_sets(e) if sets is None else sets, engine, e.k, e.template,
                   e.get("system") or None, e.max_prompt_tokens, e.batch_size)
