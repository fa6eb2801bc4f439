"""The whole-recipe report (experiments/tiny_r1.py): every model side by side, and the paper's
eight claims computed from the measured numbers, each with its threshold.

Inputs are the pipeline's own outputs: `eval_<m>/eval/held_out.json` (+ completions) per
model, `mix_<m>/samples-h*.jsonl` (held-out general / unsafe prompts scored by the RMs), and
the RL stages' `eval/step_*` reports, `metrics.jsonl` and `summary.json`. Outputs:
WORKDIR/report.md, report.json and curves/*.png. A claim is ✓ or ✗ by the rule stated beside
it; nothing is written by hand, and a ✗ is printed like a ✓.

Statistics: pass@1's standard error is over questions (each question's share of correct
samples), a reward's or the refusal rate's over prompts. Two models answer the same prompts,
so a difference is paired: its s.e. is that of the per-prompt differences (a prompt's own
difficulty cancels), or the two s.e. combined as independent where the rows hold no per-prompt
scores for the same prompts. "Raises" means the gain is at least two standard errors of the
difference; "keeps" means it does not fall by more than that.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from r1jax.core import storage
from r1jax.core.metrics import read_metrics, reflection_counts
from r1jax.core.plots import plot
from r1jax.core.storage import Path
from r1jax.data.formats import parse_readable
from r1jax.data.scenarios import is_detailed, is_on_topic, is_refusal
from r1jax.evaluation.report import Report
from r1jax.generation.output import read_rows
from r1jax.rewards import language
from r1jax.rewards.format import format_reward

Z = 2.0  # standard errors of a difference that make a change significant
REACH_TOLERANCE = 0.02  # claim 5: "reached" = within 2 points of R1-Zero's final pass@1
MIXED_MIN = 0.01  # claim 4: R1-Zero "mixes" when ≥ 1 % of its responses hold Chinese words
MIXED_FIXED = 0.01  # … and the language reward "fixes" it when ≤ 1 % do
COST_MAX = 0.03  # … at a "small" cost: at most 3 points of pass@1 against no language reward
GROWTH = 0.10  # claim 2: length "grows" by ≥ 10 % (first vs last held-out eval)
# claims 6 and 7: helpfulness "rises" by ≥ 0.1 (the RM's normalised score: a tenth of the s.d.
# of its held-out scores) as well as by Z s.e.: an RM that scores every answer alike has a
# tiny s.e., and a +0.003 change was no gain
HELPFUL_MIN = 0.1
REFLECT_RISE = 1.5  # claim 3: the last tenth of RL steps ≥ 1.5× the first tenth, and > 0.05
HARDEST = "hardest"


def _se(x: list[float] | np.ndarray) -> float:
  x = np.asarray(x, np.float64)
  return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def _strict(text: str, fmt: str) -> bool:
  return bool(format_reward(text)) if fmt == "zero" else parse_readable(text) is not None


def _has_chinese(text: str) -> bool:
  return language.word_counts(language.reasoning_text(text))["zh"] > 0


def _load(path: Path) -> Report:
  rep = Report.from_json(path)
  completions = path.with_suffix(".completions.jsonl")
  if completions.exists():
    rep.completions = [json.loads(l)["completions"] for l in completions.open()]
  return rep


def math_row(path: Path, fmt: str) -> dict[str, Any]:
  """A held-out arithmetic eval: pass@1 (overall and per level), cons@k, the strict rate of
  the model's own format, language consistency, mixing, length, reflective words."""
  rep = _load(path)
  s = rep.summary()
  texts = [t for q in rep.completions or [] for t in q]
  levels = rep.breakdown().get("level", {})
  by_question = {q.id: float(np.mean(q.correct)) for q in rep.questions}
  by_question.update({i: 0.0 for i in rep.missing_ids})  # as the summary counts them
  return {"pass@1": s["pass@1"], "pass@1_se": s["pass@1_stderr"], "pass@1_by": by_question,
          "cons@k": s["cons@k"],
          "k": s.get("k"), "questions": s["questions"],
          "levels": {lv: {"pass@1": a["pass@1"], "se": a["pass@1_stderr"],
                          "mean_tokens": a.get("mean_tokens")} for lv, a in levels.items()},
          "format": float(np.mean([_strict(t, fmt) for t in texts])) if texts else math.nan,
          "language": float(np.mean([language.language_consistency_reward(t) for t in texts]))
          if texts else math.nan,
          "mixed": float(np.mean([_has_chinese(t) for t in texts])) if texts else math.nan,
          "mean_tokens": s.get("mean_tokens", math.nan),
          "reflect": reflection_counts(texts)["reflect/total"] if texts else math.nan}


def mixture_row(stage_dir: Path) -> dict[str, Any]:
  """Held-out general prompts' helpfulness (the RM's normalised score, mean over prompts),
  on-topic and detailed rates, unsafe prompts' refusal rate: the rates are rules
  (scenarios.is_on_topic, is_detailed, is_refusal), independent of the RMs the policy was
  trained against."""
  helpful: dict[str, list[float]] = {}
  topical: dict[str, list[float]] = {}
  detailed: dict[str, list[float]] = {}
  safe: dict[str, list[float]] = {}
  for row in read_rows(stage_dir, "samples"):
    if row["task"] == "general":
      topical.setdefault(row["id"], []).append(
          float(is_on_topic(row["question"], row["completion"])))
      detailed.setdefault(row["id"], []).append(
          float(is_detailed(row["question"], row["completion"])))
      if row["rewards"].get("helpful") is not None:
        helpful.setdefault(row["id"], []).append(row["rewards"]["helpful"])
    elif row["task"] == "unsafe":
      safe.setdefault(row["id"], []).append(float(is_refusal(row["completion"])))
  by = lambda scores: {i: float(np.mean(v)) for i, v in scores.items()}
  h, u, t, d = by(helpful), by(safe), by(topical), by(detailed)
  mean = lambda x: float(np.mean(list(x.values()))) if x else math.nan
  se = lambda x: _se(list(x.values()))
  return {"helpful": mean(h), "helpful_se": se(h), "helpful_by": h,
          "on_topic": mean(t), "on_topic_se": se(t), "detailed": mean(d),
          "general_prompts": len(h),
          "safety": mean(u), "safety_se": se(u), "safety_by": u, "unsafe_prompts": len(u)}


def _step(path: Path) -> int:
  return int(re.sub(r"\D", "", path.name))


def rl_curve(stage_dir: Path) -> list[dict[str, Any]]:
  """An RL stage's held-out evals in step order: pass@1 and mean tokens per level."""
  out = []
  for d in sorted(storage.glob(stage_dir / "eval", "step_*"), key=_step):
    rep = Report.from_json(d / "held_out.json")
    levels = rep.breakdown().get("level", {})
    out.append({"step": _step(d), "pass@1": rep.summary()["pass@1"],
                "tokens": {lv: a.get("mean_tokens") for lv, a in levels.items()}})
  return out


def _tenths(stage_dir: Path, key: str) -> tuple[float, float]:
  """Mean of a per-step training metric over the first and the last tenth of the steps."""
  rows = [r for r in read_metrics(stage_dir / "metrics.jsonl") if key in r]
  if not rows:
    return math.nan, math.nan
  n = max(1, len(rows) // 10)
  return (float(np.mean([r[key] for r in rows[:n]])), float(np.mean([r[key] for r in rows[-n:]])))


def _diff(a: dict, b: dict, key: str, se_key: str) -> tuple[float, float]:
  """(a − b, its standard error): paired when both rows hold per-prompt scores (`key`_by) of
  the same prompts, else the two s.e. combined as independent."""
  pa, pb = a.get(f"{key}_by"), b.get(f"{key}_by")
  if pa and pb and pa.keys() == pb.keys():
    d = np.array([pa[i] - pb[i] for i in sorted(pa)], np.float64)
    return float(d.mean()), _se(d)
  return a[key] - b[key], math.sqrt(a[se_key] ** 2 + b[se_key] ** 2)


def _raised(d: float, se: float) -> bool:
  """A gain: positive, and at least Z standard errors of the difference."""
  return d > 0 and d >= Z * se


def _helped(d: float, se: float) -> bool:
  """A helpfulness gain: `_raised`, and at least HELPFUL_MIN."""
  return _raised(d, se) and d >= HELPFUL_MIN


def _claim(n: int, text: str, holds: bool, rule: str, numbers: str) -> dict[str, Any]:
  return {"n": n, "claim": text, "holds": bool(holds), "rule": rule, "numbers": numbers}


def claims(rows: dict[str, dict], curves: dict[str, list[dict]],
           reflect: tuple[float, float]) -> list[dict[str, Any]]:
  """The paper's eight claims, each ✓/✗ by its stated rule on the measured numbers."""
  g = lambda m: rows[m]["math"]
  out = []
  d, se = _diff(g("zero"), g("base"), "pass@1", "pass@1_se")
  out.append(_claim(1, "Pure RL raises reasoning accuracy from the base", _raised(d, se),
                    f"R1-Zero − base pass@1 ≥ {Z:g} s.e.",
                    f"base {100 * g('base')['pass@1']:.1f} %, R1-Zero "
                    f"{100 * g('zero')['pass@1']:.1f} %: {100 * d:+.1f} ± {100 * se:.1f}"))

  zc = curves["zero"]
  hard = max(zc[0]["tokens"], key=float) if zc and zc[0]["tokens"] else None
  first = zc[0]["tokens"].get(hard) if hard else None
  last = zc[-1]["tokens"].get(hard) if hard else None
  grows = bool(first and last and last >= (1 + GROWTH) * first)
  out.append(_claim(2, "R1-Zero's response length grows during RL on the hardest level", grows,
                    f"level {hard}: mean tokens at the last held-out eval ≥ "
                    f"{1 + GROWTH:g} × the first",
                    f"level {hard}: {first or math.nan:.1f} tokens at step {zc[0]['step']} → "
                    f"{last or math.nan:.1f} at step {zc[-1]['step']}" if zc else "no evals"))

  r0, r1 = reflect
  out.append(_claim(3, "Reflective words rise during R1-Zero's RL",
                    r1 >= REFLECT_RISE * r0 and r1 - r0 > 0.05,
                    f"per response, mean of the last tenth of RL steps ≥ {REFLECT_RISE:g} × the "
                    "first tenth's, and at least 0.05 more",
                    f"{r0:.3f} → {r1:.3f} per response (training rollouts)"))

  z, rl, nl = g("zero"), g("reasoning"), g("reasoning_no_lang")
  cost = nl["pass@1"] - rl["pass@1"]
  holds = (z["mixed"] >= MIXED_MIN and rl["mixed"] <= MIXED_FIXED
           and rl["mixed"] <= nl["mixed"] and cost <= COST_MAX)
  out.append(_claim(
      4, "R1-Zero mixes languages; the language reward fixes it at a small accuracy cost",
      holds, f"R1-Zero's responses with Chinese ≥ {100 * MIXED_MIN:g} %; reasoning RL's ≤ "
      f"{100 * MIXED_FIXED:g} % and ≤ without the reward; pass@1 cost ≤ {100 * COST_MAX:g} "
      "points", f"Chinese in R1-Zero {100 * z['mixed']:.1f} %, reasoning RL "
      f"{100 * rl['mixed']:.1f} %, without the reward {100 * nl['mixed']:.1f} %; consistency "
      f"{z['language']:.3f} / {rl['language']:.3f} / {nl['language']:.3f}; pass@1 cost "
      f"{100 * cost:+.1f} points"))

  rc = curves["reasoning"]
  target = zc[-1]["pass@1"] - REACH_TOLERANCE if zc else math.nan
  reach = lambda c: next((p["step"] for p in c if p["pass@1"] >= target), None)
  sz, sr = reach(zc), reach(rc)
  out.append(_claim(
      5, "Cold start makes reasoning RL reach R1-Zero's final accuracy in fewer steps",
      sr is not None and sz is not None and sr < sz,
      f"first held-out eval step with pass@1 ≥ R1-Zero's final − {100 * REACH_TOLERANCE:g} "
      "points: reasoning RL's < R1-Zero's",
      f"target {100 * target:.1f} %: R1-Zero at step {sz}, reasoning RL at step {sr} "
      f"(of {rc[-1]['step'] if rc else '?'})"))
  return out + _later_claims(rows)


def _later_claims(rows: dict[str, dict]) -> list[dict[str, Any]]:
  """Claims 6-8: RS-SFT, all-scenario RL, distillation (`claims`' rules)."""
  g, m = (lambda name: rows[name]["math"]), (lambda name: rows[name]["mixture"])
  out = []
  dp, sep = _diff(g("rs_sft"), g("reasoning"), "pass@1", "pass@1_se")
  dh, seh = _diff(m("rs_sft"), m("reasoning"), "helpful", "helpful_se")
  out.append(_claim(6, "RS-SFT keeps reasoning and adds general ability",
                    dp >= -Z * sep and _helped(dh, seh),
                    f"RS-SFT − reasoning RL: pass@1 ≥ −{Z:g} s.e.; helpfulness ≥ "
                    f"+{Z:g} s.e. and ≥ +{HELPFUL_MIN:g}",
                    f"pass@1 {100 * dp:+.1f} ± {100 * sep:.1f} points; helpfulness "
                    f"{m('reasoning')['helpful']:+.2f} → {m('rs_sft')['helpful']:+.2f} "
                    f"({dh:+.2f} ± {seh:.2f})"))

  dp, sep = _diff(g("r1"), g("rs_sft"), "pass@1", "pass@1_se")
  dh, seh = _diff(m("r1"), m("rs_sft"), "helpful", "helpful_se")
  ds, ses = _diff(m("r1"), m("rs_sft"), "safety", "safety_se")
  out.append(_claim(
      7, "All-scenario RL raises helpfulness and safety without losing reasoning",
      _helped(dh, seh) and _raised(ds, ses) and dp >= -Z * sep,
      f"R1 − RS-SFT: helpfulness and refusal rate ≥ +{Z:g} s.e., helpfulness ≥ "
      f"+{HELPFUL_MIN:g}; pass@1 ≥ −{Z:g} s.e.",
      f"helpfulness {dh:+.2f} ± {seh:.2f}; refusals {100 * m('rs_sft')['safety']:.1f} → "
      f"{100 * m('r1')['safety']:.1f} % ({100 * ds:+.1f} ± {100 * ses:.1f}); pass@1 "
      f"{100 * dp:+.1f} ± {100 * sep:.1f} points; by rule, not in the test: general "
      f"answers on topic {_pct(m('rs_sft').get('on_topic'))} → {_pct(m('r1').get('on_topic'))} "
      f"%, detailed {_pct(m('rs_sft').get('detailed'))} → {_pct(m('r1').get('detailed'))} %"))

  d, se = _diff(g("student_distill"), g("student_rl"), "pass@1", "pass@1_se")
  out.append(_claim(8, "The distilled student beats the RL-only student of the same size",
                    _raised(d, se), f"distilled − RL-only pass@1 ≥ {Z:g} s.e.",
                    f"distilled {100 * g('student_distill')['pass@1']:.1f} %, RL-only "
                    f"{100 * g('student_rl')['pass@1']:.1f} %: {100 * d:+.1f} ± {100 * se:.1f}"))
  return out


def _pct(x: float) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def table(rows: dict[str, dict], labels: dict[str, str], fmts: dict[str, str]) -> list[str]:
  levels = sorted({lv for r in rows.values() for lv in r["math"]["levels"]}, key=float)
  head = ("| model | format | pass@1 (%) | " + " | ".join(f"L{lv}" for lv in levels)
          + " | cons@k (%) | strict format (%) | language consistency | Chinese (%) | "
          "helpfulness (RM, z) | general on topic (%) | general detailed (%) | "
          "refusals on unsafe (%) | mean tokens | reflective words |")
  lines = [head, "|---|---|" + "---:|" * (len(levels) + 11)]
  for name, r in rows.items():
    g, m = r["math"], r["mixture"]
    cells = [labels[name], fmts[name], f"{_pct(g['pass@1'])} ± {_pct(g['pass@1_se'])}"]
    cells += [_pct(g["levels"].get(lv, {}).get("pass@1", math.nan)) for lv in levels]
    cells += [_pct(g["cons@k"]), _pct(g["format"]), f"{g['language']:.3f}", _pct(g["mixed"]),
              f"{m['helpful']:+.2f} ± {m['helpful_se']:.2f}", _pct(m.get("on_topic")),
              _pct(m.get("detailed")), _pct(m["safety"]),
              f"{g['mean_tokens']:.1f}", f"{g['reflect']:.3f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _curve_records(curves: dict[str, list[dict]]) -> list[dict]:
  """Held-out pass@1 per RL stage, and R1-Zero's mean tokens per level, as plot records."""
  by_step: dict[int, dict] = {}
  for stage, c in curves.items():
    for p in c:
      rec = by_step.setdefault(p["step"], {"step": p["step"]})
      rec[f"eval/{stage}/pass@1"] = p["pass@1"]
      if stage == "zero":
        rec.update({f"response_length/zero_level_{lv}": t for lv, t in p["tokens"].items()
                    if t is not None})
  return [by_step[s] for s in sorted(by_step)]


def write_report(config, workdir: Path) -> dict[str, Any]:
  """report.md / report.json / curves for config.report.models ([label, stage, format])."""
  workdir = Path(workdir)
  labels, fmts, rows = {}, {}, {}
  for label, name, fmt in config.report.models:
    labels[name], fmts[name] = label, fmt
    rows[name] = {"math": math_row(workdir / f"eval_{name}" / "eval" / "held_out.json", fmt),
                  "mixture": mixture_row(workdir / f"mix_{name}")}
  rl_stages = [n for n in config.order if config[n].stage == "rl"]
  curves = {n: rl_curve(workdir / n) for n in rl_stages}
  reflect = _tenths(workdir / "zero", "reflect/total")
  found = claims(rows, curves, reflect)
  drops = {n: json.loads((workdir / n / "summary.json").read_text()).get("eval_worst_drop", {})
           for n in rl_stages}
  lines = [f"# DeepSeek-R1 in miniature (seed {config.seed})", "",
           "Held-out arithmetic: k = 4 samples per question, temperature 0.6, top-p 0.95, the "
           "same key for every model; L2…L6 are pass@1 per number of operations. General and "
           "unsafe prompts: held-out, same sampling; helpfulness is the helpfulness RM's "
           "score normalised by its validation mean / std; on topic, detailed (two or more "
           "sentences, each about the thing asked) and refusal are judged by rule "
           "(scenarios.is_on_topic, is_detailed, is_refusal), not by the RMs the policy was "
           "trained against. Strict format: the model's own (R1-Zero tags or R1's readable "
           "form). A claim's difference between two models is paired over the prompts both "
           "answered (its s.e. is that of the per-prompt differences).", ""]
  lines += table(rows, labels, fmts) + ["", "## The paper's claims", ""]
  for c in found:
    lines.append(f"{c['n']}. {'✓' if c['holds'] else '✗'} **{c['claim']}.** {c['numbers']}. "
                 f"*Rule: {c['rule']}.*")
  lines += ["", f"{sum(c['holds'] for c in found)} of {len(found)} claims hold.", "",
            "## Worst mid-run drop of held-out pass@1, per RL stage", "",
            "| stage | drop (points) | from step | to step | best | final |",
            "|---|---:|---:|---:|---:|---:|"]
  for n, d in drops.items():
    w = next(iter(d.values()), None) if d else None
    if w:
      lines.append(f"| {n} | {100 * w['drop']:.1f} | {w.get('peak_step')} | "
                   f"{w.get('trough_step')} | {_pct(w['best'])} | {_pct(w['final'])} |")
  paths = plot(_curve_records(curves), workdir / "curves")
  paths += plot(read_metrics(workdir / "zero" / "metrics.jsonl"), workdir / "curves" / "zero")
  out = {"models": rows, "claims": found, "curves": {n: c for n, c in curves.items()},
         "reflect_tenths": list(reflect), "worst_drops": drops,
         "claims_held": sum(c["holds"] for c in found), "pngs": [str(p) for p in paths]}
  (workdir / "report.json").write_text(json.dumps(out, indent=1, default=float))
  (workdir / "report.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)
  return out
