"""Evaluation: k samples per question, pass@1 / pass@k / cons@k, per-level and per-subject rows.

1. Generate (`evaluate`): render each question with a template, sample k completions per question
   (R1's protocol: temperature 0.6, top-p 0.95) with the KV-cache Sampler, detokenise.
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
3. Report (r1jax/eval_report.py): JSON (summary, breakdowns, per-question answers) and a
   markdown table.

`grade_file` grades a jsonl of completions made elsewhere (e.g. vLLM) against a benchmark, by row
id: `python -m r1jax.evaluate --benchmark=B.jsonl --completions=C.jsonl --out=DIR`. `run` is the
`eval` stage of `python -m r1jax.main` (config.eval names the benchmarks and sampling settings).
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from r1jax import datasets
from r1jax.eval_report import BREAKDOWN_FIELDS, QuestionResult, Report, markdown_table
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
                      max_vote_answers: int = 8, lengths: Sequence[Sequence[int]] | None = None,
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
    questions = _grade(rows, completions_per_row, pool, timeout_s, max_vote_answers)
  finally:
    if owned:
      pool.close()
  for i, q in enumerate(questions):
    if lengths is not None:
      q.lengths = [int(x) for x in lengths[i]]
    if truncated is not None:
      q.truncated = [bool(x) for x in truncated[i]]
  return Report(benchmark, questions, dict(settings or {}))


def _grade(rows, completions_per_row, pool, timeout_s, max_vote) -> list[QuestionResult]:
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
      out[p] = bool(o.value) and o.ok
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


# -------------------------------------------------------------------------------- generation

SUMMARY_KEYS = ("pass@1", "cons@k", "pass@k", "extracted", "mean_tokens", "truncated")


def evaluate(params, cfg, tokenizer, rows: Sequence[dict], *, sampler, key, k: int = 4,
             temperature: float = 0.6, top_p: float = 0.95, top_k: int = 0,
             max_new_tokens: int = 256, stop: Sequence[str] = ("</answer>",),
             template: str = "r1_zero", system: str | None = None,
             max_prompt_tokens: int | None = None, batch_size: int = 32, benchmark: str = "",
             pool: pool_lib.RewardPool | None = None, progress: bool = True) -> Report:
  """Samples k completions per row (load_rows schema) and grades them; deterministic per key."""
  from r1jax import data as data_lib, sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  if k < 1 or batch_size < 1:
    raise ValueError(f"need k >= 1 and batch_size >= 1, got k={k}, batch_size={batch_size}")
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model only {cfg.vocab_size}")
  for i, row in enumerate(rows):  # Before sampling, not after minutes of it.
    if row.get("task", "math") != "math":
      raise ValueError(f"row {row.get('id', i)} is a {row['task']!r} task; only math is graded")
  sp = sampler_lib.SamplingParams(
      temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
      eos_id=tokenizer.eos_id, stop_ids=sampler_lib.stop_token_ids(tokenizer, stop),
      pad_id=tokenizer.pad_id)
  settings = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
              "max_new_tokens": max_new_tokens, "k": k, "template": template, "stop": list(stop)}
  # A prompt the sampler would refuse is skipped like one over max_prompt_tokens, not raised.
  limits = [x for x in (getattr(sampler, "max_prompt_len", None), max_prompt_tokens) if x]
  items, bad = data_lib.prepare_prompts(rows, tokenizer, template, min(limits, default=None),
                                        system, source=benchmark or "rows")
  if not items:
    log.warning("%s: no usable prompts (%d skipped)", benchmark or "rows", len(bad))
    return Report(benchmark, [], settings, skipped=len(bad), completions=[])
  t0 = time.perf_counter()
  rollouts = sampler.generate_many(params, [it["prompt_ids"] for it in items], sp, key,
                                   batch_size=min(batch_size, len(items)), group=k,
                                   progress=progress)
  cat = lambda field: np.concatenate([np.asarray(getattr(r, field)) for r in rollouts])
  tokens_NxT, mask_NxT = cat("tokens"), cat("mask")
  texts = [tokenizer.decode(tokenizer.strip_specials(t[m])) for t, m in zip(tokens_NxT, mask_NxT)]
  lengths_N = mask_NxT.sum(-1)
  by_row = lambda xs: [list(xs[i * k:(i + 1) * k]) for i in range(len(items))]
  t1 = time.perf_counter()
  report = score_completions(items, by_row(texts), benchmark=benchmark, pool=pool,
                             lengths=by_row(lengths_N), settings=settings,
                             truncated=by_row(cat("stop_reason") == sampler_lib.STOP_LENGTH))
  log.info("%s: %d completions (%d tokens) sampled in %.1fs, graded in %.1fs", benchmark,
           len(texts), int(lengths_N.sum()), t1 - t0, time.perf_counter() - t1)
  report.skipped, report.completions = len(bad), by_row(texts)
  return report


def summary_metrics(report: Report, prefix: str | None = None) -> dict[str, float]:
  """Flat scalars for the metrics log: `<prefix>/pass@1`, … (prefix: eval/<benchmark>)."""
  s = report.summary()
  prefix = f"eval/{report.benchmark or 'unnamed'}" if prefix is None else prefix
  return {f"{prefix}/{name}": float(s[name]) for name in SUMMARY_KEYS if name in s}


# ------------------------------------------------------------------------- external completions


def benchmark_name(path: str | Path) -> str:
  """math500/test.jsonl -> 'math500'; aime_2025.jsonl -> 'aime_2025'."""
  path = Path(path)
  return path.parent.name if path.stem == "test" and path.parent.name else path.stem


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
  """Grades a jsonl of {"id", "completions"} (or {"id", "completion"}) lines against a benchmark."""
  rows, bad_rows = datasets.load_rows(benchmark_path, adapter)
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


# ------------------------------------------------------------------------------------- stage


def run(config, workdir: str | Path) -> dict[str, Any]:
  """The `eval` stage: k samples per question on each of config.eval.benchmarks, reported."""
  import jax  # pylint: disable=g-import-not-at-top
  from r1jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from r1jax import sampler as sampler_lib, sharding  # pylint: disable=g-import-not-at-top
  from r1jax.stage_configs import tokenizer_path  # pylint: disable=g-import-not-at-top
  from r1jax.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  e = config.eval
  paths = [p.strip() for p in str(e.benchmarks).split(",") if p.strip()]
  names = [benchmark_name(p) for p in paths]
  if not paths or len(set(names)) != len(names):
    raise ValueError(f"config.eval.benchmarks={e.benchmarks!r} must name files with distinct "
                     f"names (got {names})")
  # Everything that can fail on bad input fails here, before the model is loaded.
  tok = load_tokenizer(tokenizer_path(config))
  sampler_lib.stop_token_ids(tok, e.stop)
  loaded = [datasets.load_rows(p, e.get("adapter", "auto"), limit=e.limit or None)
            for p in paths]
  mesh = sharding.make_mesh(config.mesh.shape)
  cfg, params = ckpt_lib.load_model(config.model, mesh, seed=config.seed)
  smp = sampler_lib.Sampler(cfg, mesh, max_prompt_len=e.max_prompt_tokens)
  out_dir, lead = Path(workdir) / "eval", jax.process_index() == 0
  reports, metrics = [], {}
  with pool_lib.RewardPool(num_workers=min(4, os.cpu_count() or 1)) as pool:
    for path, name, (rows, bad) in zip(paths, names, loaded):
      # A benchmark's samples depend on its name, not on which others run beside it.
      key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()) >> 1)
      report = evaluate(params, cfg, tok, rows, sampler=smp, key=key, k=e.k,
                        temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                        max_new_tokens=e.max_new_tokens, stop=tuple(e.stop),
                        template=e.template, system=e.get("system") or None,
                        max_prompt_tokens=e.max_prompt_tokens, batch_size=e.batch_size,
                        benchmark=name, pool=pool, progress=lead)
      report.skipped += len(bad)
      report.settings.update(path=path, seed=config.seed)
      if lead:
        report.to_json(out_dir / f"{name}.json")
        report.save_completions(out_dir / f"{name}.completions.jsonl")
      reports.append(report)
      metrics.update(summary_metrics(report))
  table = markdown_table(reports)
  if lead:
    (out_dir / "report.md").write_text(table)
    print(table, flush=True)
  return {"stage": "eval", **metrics}


# --------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str]) -> None:
  """Grades completion files against benchmarks; writes OUT/<name>.json and OUT/report.md."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
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


if __name__ == "__main__":
  # Flags exist only when run as a script: importing this module defines none.
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("benchmark", None, "Benchmark file(s) (jsonl/parquet), comma-separated.")
  flags.DEFINE_string("completions", None, "Completion jsonl file(s), one per benchmark, of "
                      '{"id", "completions": [str]} (or {"id", "completion": str}) lines.')
  flags.DEFINE_string("out", None, "Folder for <benchmark>.json and report.md.")
  flags.DEFINE_string("adapter", "auto", "Benchmark row format: auto, math, gsm8k, generic, ….")
  flags.DEFINE_integer("workers", 0, "Grading processes (0: min(4, CPUs)).")
  flags.DEFINE_float("timeout_s", 10.0, "Hard time limit of one equivalence check.")
  flags.mark_flags_as_required(["benchmark", "completions", "out"])
  app.run(main)
