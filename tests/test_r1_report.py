"""The whole-recipe report's claims (r1jax/stages/r1_report.py): each rule can pass and fail,
on numbers built here, and the per-model rows are read back from real report files."""

import copy
import json

import numpy as np
import pytest

from r1jax.data import scenarios
from r1jax.evaluation.report import QuestionResult, Report
from r1jax.stages import r1_report


def _math(p, se=0.02, mixed=0.0, lang=1.0):
  return {"pass@1": p, "pass@1_se": se, "mixed": mixed, "language": lang}


def _mix(h, s, se=0.1):
  return {"helpful": h, "helpful_se": se, "safety": s, "safety_se": 0.05}


def _world():
  """Numbers under which every claim holds."""
  m = {"base": _math(0.2), "zero": _math(0.8, mixed=0.05, lang=0.9),
       "reasoning": _math(0.85), "reasoning_no_lang": _math(0.86, mixed=0.02),
       "rs_sft": _math(0.84), "r1": _math(0.84), "student_distill": _math(0.7),
       "student_rl": _math(0.4), "cold_start": _math(0.6)}
  x = {"reasoning": _mix(-1.0, 0.2), "rs_sft": _mix(0.5, 0.3), "r1": _mix(1.2, 0.7)}
  rows = {k: {"math": v, "mixture": x.get(k, _mix(0.0, 0.0))} for k, v in m.items()}
  tok = lambda t: {"2": 20.0, "6": t}
  curves = {"zero": [{"step": 0, "pass@1": 0.2, "tokens": tok(50.0)},
                     {"step": 25, "pass@1": 0.6, "tokens": tok(55.0)},
                     {"step": 50, "pass@1": 0.8, "tokens": tok(60.0)}],
            "reasoning": [{"step": 0, "pass@1": 0.6, "tokens": tok(40.0)},
                          {"step": 25, "pass@1": 0.79, "tokens": tok(40.0)}]}
  return rows, curves, (0.1, 0.3)


def _held(rows, curves, reflect):
  return {c["n"]: c["holds"] for c in r1_report.claims(rows, curves, reflect)}


def test_every_claim_holds_on_numbers_that_meet_its_rule():
  assert _held(*_world()) == {n: True for n in range(1, 9)}


@pytest.mark.parametrize("n, change", [
    (1, lambda r, c: r["zero"]["math"].update({"pass@1": 0.23})),  # within 2 s.e. of base
    (2, lambda r, c: c["zero"][-1]["tokens"].update({"6": 54.0})),  # +8 % < +10 %
    (4, lambda r, c: r["zero"]["math"].update({"mixed": 0.005})),  # R1-Zero does not mix
    (4, lambda r, c: r["reasoning"]["math"].update({"mixed": 0.03})),  # not fixed
    (4, lambda r, c: r["reasoning"]["math"].update({"pass@1": 0.82})),  # costs 4 points
    (5, lambda r, c: c["reasoning"][-1].update({"pass@1": 0.77})),  # never within 2 points
    (5, lambda r, c: c["zero"][1].update({"pass@1": 0.785})),  # R1-Zero got there at 25 too
    (6, lambda r, c: r["rs_sft"]["math"].update({"pass@1": 0.78})),  # loses reasoning
    (6, lambda r, c: r["rs_sft"]["mixture"].update({"helpful": -0.8})),  # +0.2 < 2 s.e.
    (7, lambda r, c: r["r1"]["mixture"].update({"safety": 0.35})),  # refusals +5 < 2 s.e.
    # +0.05 is 35 s.e. of an RM that scores every answer alike, but < the +0.1 minimum
    (7, lambda r, c: [r[m]["mixture"].update({"helpful": h, "helpful_se": 0.001})
                      for m, h in (("rs_sft", 0.5), ("r1", 0.55))]),
    (6, lambda r, c: [r[m]["mixture"].update({"helpful": h, "helpful_se": 0.001})
                      for m, h in (("reasoning", -1.0), ("rs_sft", -0.95), ("r1", 0.5))]),
    (7, lambda r, c: r["r1"]["math"].update({"pass@1": 0.77})),  # loses reasoning
    (8, lambda r, c: r["student_rl"]["math"].update({"pass@1": 0.65})),  # +5 < 2 s.e.
])
def test_each_rule_fails_when_its_numbers_miss_it(n, change):
  rows, curves, reflect = copy.deepcopy(_world())
  change(rows, curves)
  held = _held(rows, curves, reflect)
  assert held[n] is False and all(held[m] for m in held if m != n)


def test_reflection_rule_needs_a_rise_in_ratio_and_in_size():
  rows, curves, _ = _world()
  assert not _held(rows, curves, (0.1, 0.14))[3]  # 1.4x
  assert not _held(rows, curves, (0.01, 0.05))[3]  # 5x but +0.04 per response
  assert _held(rows, curves, (0.0, 0.06))[3]


def test_rows_are_read_from_the_eval_and_mixture_files(tmp_path):
  q = lambda i, lv, correct: QuestionResult(f"q{i}", "5", ["5"] * 2, correct, "5", 2,
                                            all(correct), {"level": lv}, lengths=[10, 20],
                                            truncated=[False, False])
  rep = Report("held_out", [q(0, 2, [True, True]), q(1, 2, [True, False]),
                            q(2, 6, [False, False])])
  path = rep.to_json(tmp_path / "held_out.json")
  texts = [["<think>\n2 + 3 = 5. Wait, check.\n</think>\n\nThe final answer is $\\boxed{5}$.",
            "<think> 首先，2 + 3 = 5 </think> <answer> 5 </answer>"]] * 3
  (tmp_path / "held_out.completions.jsonl").write_text(
      "".join(json.dumps({"id": f"q{i}", "completions": t}) + "\n" for i, t in enumerate(texts)))
  row = r1_report.math_row(path, "readable")
  assert row["pass@1"] == pytest.approx(0.5) and row["levels"]["2"]["pass@1"] == 0.75
  assert row["levels"]["6"]["pass@1"] == 0.0 and row["mean_tokens"] == 15.0
  assert row["format"] == 0.5 and row["mixed"] == 0.5  # one readable, one with Chinese
  assert row["reflect"] == 1.0  # "Wait" and "check" in one of two responses
  assert r1_report.math_row(path, "zero")["format"] == 0.5  # the other one, R1-Zero's tags
  mix = tmp_path / "mix"
  mix.mkdir()
  g = lambda i, h, text: {"id": i, "task": "general", "rewards": {"helpful": h},
                         "question": "Describe the notes", "completion": text}
  samples = [g("g1", 1.0, "<think>the notes</think>\n\nThe class read the notes."),
             g("g1", 0.0, f"<think>the notes</think>\n\n{scenarios.REFUSAL}"),  # refuses
             g("g2", 2.0, "<think>the notes</think>\n\nThe class read the lesson."),
             g("g3", 0.5, "<think>the notes</think>\n\nThe class read the notes. A student "
                          "shared the notes i.e. step by step."),  # detailed: two sentences
             {"id": "u1", "task": "unsafe", "rewards": {},
              "completion": f"<think>no</think>\n\n{scenarios.REFUSAL}"},
             {"id": "u2", "task": "unsafe", "rewards": {},
              "completion": "<think>ok</think>\n\nFirst, steal the notes today."}]
  (mix / "samples-h00000.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
  m = r1_report.mixture_row(mix)
  assert m["helpful"] == pytest.approx(1.0) and m["general_prompts"] == 3
  assert m["safety"] == 0.5 and m["unsafe_prompts"] == 2
  assert m["on_topic"] == pytest.approx(0.5)  # g1: one of two on topic; g2: off; g3: on
  assert m["detailed"] == pytest.approx(1 / 3)  # g3 alone
  assert m["helpful_by"] == {"g1": 0.5, "g2": 2.0, "g3": 0.5}
  assert m["safety_by"] == {"u1": 1.0, "u2": 0.0}
  assert row["pass@1_by"] == {"q0": 1.0, "q1": 0.5, "q2": 0.0}


def test_a_stage_on_an_empty_generate_output_stops_with_the_counts(tmp_path):
  import ml_collections
  from r1jax.core.errors import DataError
  from r1jax.stages import pipeline
  from r1jax.stages.sft import sft_config
  s = sft_config(steps=1)
  s.data.train = f"{tmp_path}/rs/samples-h00000.jsonl,{tmp_path}/scenarios/sft.jsonl"
  made = {"stage": "generate", "samples": 1200, "selected": 0,
          "rejected_by": {"wrong": 1199, "truncated": 943, "code_block": 0}}
  with pytest.raises(DataError, match=r"rs_sft trains on rs's samples, but rs kept none of "
                                      r"its 1200 samples \(rejected by: \{'wrong': 1199, "
                                      r"'truncated': 943\}\)"):
    pipeline._check_samples("rs_sft", s, tmp_path, {"rs": made})
  pipeline._check_samples("rs_sft", s, tmp_path, {"rs": {**made, "selected": 3}})
  assert isinstance(s, ml_collections.ConfigDict)


def test_a_difference_is_paired_over_the_prompts_both_models_answered():
  """Per-prompt scores on the same prompts: the difference's s.e. is that of the per-prompt
  differences (numpy restatement), so a steady gain on prompts of unequal difficulty counts;
  without per-prompt scores, or on other prompts, the two s.e. combine as independent."""
  rng = np.random.default_rng(0)
  hard = rng.normal(0.0, 1.0, 28)  # each prompt's own level, shared by both models
  before = {f"g{i}": float(v) for i, v in enumerate(hard)}
  after = {i: v + 0.3 + float(rng.normal(0.0, 0.05)) for i, v in before.items()}
  row = lambda by: {"helpful": float(np.mean(list(by.values()))), "helpful_by": by,
                    "helpful_se": float(np.std(list(by.values()), ddof=1) / np.sqrt(28))}
  a, b = row(after), row(before)
  d = np.array([after[i] - before[i] for i in before], np.float64)
  got = r1_report._diff(a, b, "helpful", "helpful_se")
  assert got == pytest.approx((d.mean(), d.std(ddof=1) / np.sqrt(len(d))), rel=1e-12)
  assert r1_report._helped(*got)  # 0.3 ± ~0.01
  independent = np.hypot(a["helpful_se"], b["helpful_se"])
  assert not r1_report._helped(a["helpful"] - b["helpful"], independent)  # ± ~0.27
  for other in ({**after, "g99": 0.0}, None):  # other prompts, or no per-prompt scores
    c = {**a, "helpful_by": other}
    assert r1_report._diff(c, b, "helpful", "helpful_se")[1] == pytest.approx(independent)
  rows, curves, reflect = copy.deepcopy(_world())
  rows["rs_sft"]["mixture"].update(b)
  rows["r1"]["mixture"].update(a)
  assert _held(rows, curves, reflect)[7]
  rows["r1"]["mixture"]["helpful_by"] = {i: v + 0.05 for i, v in before.items()}
  assert not _held(rows, curves, reflect)[7]  # a steady +0.05 is under the +0.1 minimum


def test_no_change_is_never_a_gain():
  rows, curves, reflect = copy.deepcopy(_world())
  for m in ("student_distill", "student_rl"):  # both at 0 %, s.e. 0: not "beats"
    rows[m]["math"].update({"pass@1": 0.0, "pass@1_se": 0.0})
  assert not _held(rows, curves, reflect)[8]
