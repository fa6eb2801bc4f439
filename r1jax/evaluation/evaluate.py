"""Evaluation: k samples per question, pass@1 / pass@k / cons@k, per-level and per-subject rows.

1. Generate (`evaluate`): render each question with a template, sample k completions per question
   (R1's protocol: temperature 0.6, top-p 0.95) with the generation engine, detokenised.
2. Score (`score_completions`, pure host code): extract each final answer (strict forms only, as
   the accuracy reward does), check it against the gold with math-verify in RewardPool workers
   (hard timeouts), then aggregate:
     pass@1 = mean over questions of the fraction of correct samples;
     pass@k = the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021);
     cons@k = is the majority answer correct. Votes go to answers grouped by mathematical
       equivalence, not by string: every correct answer is one group (they all equal the gold);
       wrong answers are grouped pairwise by math-verify (the `max_vote_answers` most frequent
       distinct ones; rarer ones group by string only). Ties go to the group whose first sample
       comes earliest, so the vote is deterministic.
3. Report (evaluation/report.py): JSON (summary, breakdowns, per-question answers) and a
   markdown table.

evaluation/external.py grades completions made elsewhere (`python -m r1jax.evaluation`);
evaluation/suite.py runs a config's benchmarks for the `rl` and `eval` stages.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Sequence

import jax

from r1jax.core import multihost
from r1jax.core.storage import Path
from r1jax.core.weights import check_vocab
from r1jax.data.pipeline import prepare_prompts
from r1jax.evaluation.report import BREAKDOWN_FIELDS, QuestionResult, Report
from r1jax.generation.engine import Engine
from r1jax.rewards import math as math_lib
from r1jax.rewards import pool as pool_lib

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------- scoring


def _key(answer: str) -> str:
  """Answers that differ only in whitespace are the same vote (and need no math check)."""
  return "".join(answer.split())


def score_completions(rows: Sequence[dict], completions_per_row: Sequence[Sequence[str]], *,
                      benchmark: str = "", pool: pool_lib.RewardPool | None = None,
                      workers: int | None = None, timeout_s: float = 10.0,
                      lengths: Sequence[Sequence[int]] | None = None,
                      truncated: Sequence[Sequence[bool]] | None = None,
                      settings: dict | None = None) -> Report:
  """Grades k completions per row (rows: {"id", "gold", "meta", "task"}) into a Report."""
  if len(rows) != len(completions_per_row):
    raise ValueError(f"{len(rows)} rows but {len(completions_per_row)} completion lists")
  for i, (row, texts) in enumerate(zip(rows, completions_per_row)):
    if row.get("task", "math") != "math":
      raise ValueError(f"row {row.get('id', i)} is a {row['task']!r} task; only math is graded")
    if not texts:
      raise ValueError(f"row {row.get('id', i)} has no completions")
  owned = pool is None
  if owned:
    pool = pool_lib.RewardPool(num_workers=workers or min(4, os.cpu_count() or 1),
                               timeout_s=timeout_s)
  try:
    questions = _grade(rows, completions_per_row, pool, timeout_s)
  finally:
    if owned:
      pool.close()
  for i, q in enumerate(questions):
    if lengths is not None:
      q.lengths = [int(x) for x in lengths[i]]
    if truncated is not None:
      q.truncated = [bool(x) for x in truncated[i]]
  return Report(benchmark, questions, dict(settings or {}))


def _grade(rows, completions_per_row, pool, timeout_s, max_vote=8) -> list[QuestionResult]:
  golds = [math_lib.gold_answer(r["gold"]) for r in rows]
  answers = [[math_lib.extract_answer(t) for t in texts] for texts in completions_per_row]
  # Per question: answer key -> [first raw string, votes, first sample index].
  uniq: list[dict[str, list]] = []
  for ans in answers:
    u: dict[str, list] = {}
    for i, a in enumerate(ans):
      if a is not None:
        u.setdefault(_key(a), [a, 0, i])[1] += 1
    uniq.append(u)
  errors = [0] * len(rows)

  def check(pairs: dict) -> dict:
    """(q, ...) -> (pred, gold) pairs checked in the pool; a failure counts as not equivalent."""
    futures = {p: pool.submit(math_lib.answers_equivalent, a, b, timeout_s=timeout_s,
                              fallback=False) for p, (a, b) in pairs.items()}
    out = {}
    for p, f in futures.items():
      o = f.result()
      out[p] = bool(o.value_or_raise()) and o.ok  # a broken pool raises: no silent zeros
      errors[p[0]] += not o.ok
    return out

  # 1. Correctness of each distinct answer (identical strings need no check).
  todo = {(q, k): (v[0], golds[q]) for q, u in enumerate(uniq) for k, v in u.items()
          if k != _key(golds[q])}
  verdict = check(todo)
  right = [{k: verdict.get((q, k), True) for k in u} for q, u in enumerate(uniq)]
  # 2. Equivalence among wrong answers, only where a wrong group could tie or beat the right one.
  wrong, pairs = [], {}
  for q, u in enumerate(uniq):
    w = sorted((k for k in u if not right[q][k]), key=lambda k: (-u[k][1], u[k][2]))
    wrong.append(w)
    c_votes = sum(u[k][1] for k in u if right[q][k])
    if len(w) >= 2 and sum(u[k][1] for k in w) >= c_votes:
      top = w[:max_vote]
      pairs.update({(q, a, b): (u[b][0], u[a][0]) for i, a in enumerate(top) for b in top[i + 1:]})
  same = check(pairs)
  out = []
  for q, (row, u) in enumerate(zip(rows, uniq)):
    groups = []  # [votes, first index, representative key, is correct]
    good = [k for k in u if right[q][k]]
    if good:
      rep = min(good, key=lambda k: (-u[k][1], u[k][2]))
      groups.append([sum(u[k][1] for k in good), min(u[k][2] for k in good), rep, True])
    wrong_groups = []
    for k in wrong[q]:  # most voted first, so a group's representative is its top answer
      g = next((g for g in wrong_groups if same.get((q, g[2], k))), None)
      if g is None:
        wrong_groups.append([u[k][1], u[k][2], k, False])
      else:
        g[0], g[1] = g[0] + u[k][1], min(g[1], u[k][2])
    groups += wrong_groups
    best = min(groups, key=lambda g: (-g[0], g[1])) if groups else None
    meta = row.get("meta") or {}
    out.append(QuestionResult(
        id=str(row.get("id", q)), gold=golds[q], answers=answers[q],
        correct=[a is not None and right[q][_key(a)] for a in answers[q]],
        majority=u[best[2]][0] if best else None, majority_votes=best[0] if best else 0,
        majority_correct=bool(best and best[3]),
        meta={f: meta[f] for f in BREAKDOWN_FIELDS if f in meta}, grading_errors=errors[q]))
  return out


# ------------------------------------------------------------------------------- sampling

SUMMARY_KEYS = ("pass@1", "cons@k", "pass@k", "extracted", "mean_tokens", "truncated")


def evaluate(params, engine: Engine, rows: Sequence[dict], *, key, k: int = 4,
             template: str = "r1_zero", system: str | None = None,
             max_prompt_tokens: int | None = None, batch_size: int = 32, benchmark: str = "",
             pool: pool_lib.RewardPool | None = None, progress: bool = True) -> Report:
  """Samples k completions per row (load_rows schema) with `engine` and grades them.

  Deterministic per key. The engine fixes temperature, top-p/k, the budget and stops.
  """
  if k < 1 or batch_size < 1:
    raise ValueError(f"need k >= 1 and batch_size >= 1, got k={k}, batch_size={batch_size}")
  check_vocab(engine.tokenizer, engine.sampler.cfg)
  for i, row in enumerate(rows):  # Before sampling, not after minutes of it.
    if row.get("task", "math") != "math":
      raise ValueError(f"row {row.get('id', i)} is a {row['task']!r} task; only math is graded")
  sp = engine.params
  settings = {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k,
              "max_new_tokens": sp.max_new_tokens, "k": k, "template": template,
              "stop": list(engine.stop)}
  # A prompt the sampler would refuse is skipped like one over max_prompt_tokens, not raised.
  limits = [x for x in (engine.max_prompt_len, max_prompt_tokens) if x]
  items, bad = prepare_prompts(rows, engine.tokenizer, template, min(limits, default=None),
                               system, source=benchmark or "rows")
  if not items:
    log.warning("%s: no usable prompts (%d skipped)", benchmark or "rows", len(bad))
    return Report(benchmark, [], settings, skipped=len(bad), completions=[])
  t0, batch = time.perf_counter(), min(batch_size, len(items))
  samples = engine.sample_many(params, [it["prompt_ids"] for it in items], key, k,
                               batch_size=batch, progress=progress)
  t1 = time.perf_counter()
  order = multihost.host_indices(len(items), batch)  # all of them in one process
  mine = [items[i] for i in order]
  texts = samples.by_prompt(samples.texts)
  report = (score_completions(mine, texts, benchmark=benchmark, pool=pool,
                              lengths=samples.by_prompt(samples.lengths), settings=settings,
                              truncated=samples.by_prompt(samples.truncated))
            if mine else Report(benchmark, [], dict(settings)))
  log.info("%s: %d completions (%d tokens) sampled in %.1fs, graded in %.1fs", benchmark,
           len(samples.texts), int(samples.lengths.sum()), t1 - t0, time.perf_counter() - t1)
  report.skipped, report.completions = len(bad), texts
  return _merged(report, order) if jax.process_count() > 1 else report


def _merged(report: Report, order: list[int]) -> Report:
  """Every process's graded share of a benchmark (`order`: its prompts' benchmark indices),
  joined in benchmark order, the same report on every process."""
  parts = multihost.gather_json({"order": order, "completions": report.completions,
                                 "questions": [dataclasses.asdict(q) for q in report.questions]})
  joined = sorted((i, QuestionResult(**q), c) for part in parts
                  for i, q, c in zip(part["order"], part["questions"], part["completions"]))
  return dataclasses.replace(report, questions=[q for _, q, _ in joined],
                             completions=[c for _, _, c in joined])


def summary_metrics(report: Report, prefix: str | None = None) -> dict[str, float]:
  """Flat scalars for the metrics log: `<prefix>/pass@1`, … (prefix: eval/<benchmark>)."""
  s = report.summary()
  prefix = f"eval/{report.benchmark or 'unnamed'}" if prefix is None else prefix
  return {f"{prefix}/{name}": float(s[name]) for name in SUMMARY_KEYS if name in s}


def benchmark_name(path: str | Path) -> str:
  """math500/test.jsonl -> 'math500'; aime_2025.jsonl -> 'aime_2025'."""
  path = Path(path)
  return path.parent.name if path.stem == "test" and path.parent.name else path.stem
