"""The miniature all-scenario world (data/scenarios.py) and the pipeline's reward report."""

import json
import random
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from r1jax.data import scenarios, synthetic
from r1jax.data.rows import load_rows
from r1jax.rewards import format as format_lib
from r1jax.rewards import language
from r1jax.stages import pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  out = tmp_path_factory.mktemp("scenarios")
  paths = scenarios.write_scenarios(out, seed=3, sft_math=200, sft_general=100, sft_unsafe=100,
                                    pairs=300, eval_pairs=60, rl_math=40, rl_general=20,
                                    rl_unsafe=30, held_out_math=16)
  return {k: [json.loads(l) for l in open(p)] for k, p in paths.items()} | {"paths": paths}


def test_held_out_prompts_are_never_trained_on(world):
  train = {r["question"] for r in world["rl_mix"]} | {r["prompt"] for r in world["sft"]}
  train |= {r["prompt"] for k in ("helpful_train", "safety_train") for r in world[k]}
  held = {r["question"] for r in world["held_out_mix"]}
  held |= {r["prompt"] for k in ("helpful_eval", "safety_eval") for r in world[k]}
  assert held and train and not held & train
  assert {r["task"] for r in world["held_out_mix"]} == {"math", "general", "unsafe"}


def test_rl_mixture_counts_and_rows_load(world):
  tasks = [r["task"] for r in world["rl_mix"]]
  assert (tasks.count("math"), tasks.count("general"), tasks.count("unsafe")) == (40, 20, 30)
  rows, bad = load_rows(world["paths"]["rl_mix"])
  assert not bad and len(rows) == 90
  assert {r["gold"] for r in rows if r["task"] != "math"} == {""}
  for r in world["rl_mix"]:  # golds are the chains' values, computed here left to right
    if r["task"] == "math":
      tokens = r["question"].split()[1:]
      value = int(tokens[0])
      for op, n in zip(tokens[1::2], tokens[2::2]):
        value += int(n) if op == "+" else -int(n)
      assert r["answer"] == str(value)


def test_preference_pairs_differ_in_what_each_model_judges(world):
  for row in world["helpful_train"]:  # the summary view, in the policy's format
    assert row["chosen"].startswith(" <answer> ") and row["chosen"].endswith(" </answer>")
    topic = next(t for t in scenarios.THINGS if row["prompt"].endswith(t))
    assert topic in row["chosen"] and topic not in row["rejected"]
  harms = [h.split(" {t}")[0] for h in scenarios._HARMS]
  for row in world["safety_train"]:  # whole responses; the harm may sit in the reasoning only
    assert row["chosen"].startswith(" <think> ") and row["chosen"].count(" </think>") == 1
    assert not any(f" {h} " in row["chosen"].split("</think>")[1] for h in harms)
    if row["chosen"].endswith(f"{scenarios.REFUSAL} </answer>"):
      continue
    assert row["rejected"].split("</think>")[1] == row["chosen"].split("</think>")[1]
    assert any(f" {h} " in row["rejected"].split("</think>")[0] for h in harms)


def test_sft_rows_mix_languages_and_quality_in_the_stated_shares():
  rng = random.Random(0)
  rows = scenarios.sft_rows(rng, synthetic.problems("train", 2000, 0), math=1000, general=1000,
                            unsafe=1000)
  math = [r for r in rows if r["prompt"].split()[0] in ("Compute", "What", "Calculate",
                                                        "Evaluate")]
  consistency = [language.language_consistency_reward(r["completion"]) for r in math]
  assert set(consistency) == {0.0, 1.0}  # connectives are all English or all Chinese
  assert abs(np.mean(np.equal(consistency, 0.0)) - 0.25) < 0.05
  refused = [r for r in rows if scenarios.REFUSAL in r["completion"]]
  assert abs(len(refused) / 1000 - 0.3) < 0.05
  for r in rows:  # r1_zero's assistant turn adds the leading space
    assert r["completion"].startswith("<think> ") and r["completion"].count(" </think>") == 1
  formatted = np.mean([format_lib.format_reward(" " + r["completion"]) for r in rows])
  assert 0.9 < formatted < 1.0  # an empty summary is one kind of unhelpful answer


def _samples(folder, rows):
  folder.mkdir(parents=True)
  (folder / "samples-h00000.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_reward_report_means_by_task_over_prompts(tmp_path):
  row = lambda pid, task, **r: {"id": pid, "task": task, "rewards": r}
  _samples(tmp_path / "start", [
      row("a", "math", accuracy=1.0, helpful=None), row("a", "math", accuracy=0.0, helpful=None),
      row("b", "math", accuracy=1.0, helpful=None), row("b", "math", accuracy=1.0, helpful=None),
      row("g", "general", accuracy=None, helpful=-1.0)])
  _samples(tmp_path / "final", [
      row("a", "math", accuracy=1.0, helpful=None), row("b", "math", accuracy=1.0, helpful=None),
      row("g", "general", accuracy=None, helpful=2.0)])
  means = pipeline.reward_means(tmp_path / "start")
  assert set(means) == {"math", "general"} and set(means["math"]) == {"accuracy"}
  # Per-prompt means 0.5 and 1.0: the mean and s.e. are over prompts, in float64.
  per_prompt = np.array([0.5, 1.0])
  assert means["math"]["accuracy"] == {
      "mean": 0.75, "se": float(np.std(per_prompt, ddof=1) / np.sqrt(2)), "prompts": 2}
  rm_dir = tmp_path / "rm" / "reward_model"
  rm_dir.mkdir(parents=True)
  (rm_dir / "norm.json").write_text(json.dumps(
      {"mean": 0.0, "std": 1.0, "responses": 128, "pair_accuracy": 0.875}))
  config = ml_collections.ConfigDict(dict(report=dict(rewards=("start", "final"),
                                                      reward_models=("rm",))))
  out, lines = pipeline.compare_rewards(config, tmp_path)
  assert out["means"]["final"]["general"]["helpful"]["mean"] == 2.0
  table = "\n".join(lines)
  assert "| general | helpful | -1.000 ± nan | 2.000 ± nan (+3.000) |" in table
  assert "| math | accuracy | 0.750 ± 0.250 | 1.000 ± 0.000 (+0.250) |" in table
  assert "| rm | 87.5 | 64 |" in table


def test_scenario_data_is_written_once_and_other_settings_are_refused(tmp_path):
  s = ml_collections.ConfigDict(dict(sft_math=20, sft_general=5, sft_unsafe=5, pairs=10,
                                     eval_pairs=10, rl_math=5, rl_general=5, rl_unsafe=5,
                                     held_out_math=4))
  first = pipeline.prepare_scenarios(s, tmp_path, seed=1)
  stamp = (tmp_path / "sft.jsonl").stat().st_mtime_ns
  assert pipeline.prepare_scenarios(s, tmp_path, seed=1) == first
  assert (tmp_path / "sft.jsonl").stat().st_mtime_ns == stamp  # not rewritten
  s.pairs = 11
  with pytest.raises(ValueError, match="generated with other settings.*pairs"):
    pipeline.prepare_scenarios(s, tmp_path, seed=1)


def test_readable_world_draws_its_arithmetic_from_the_world_and_writes_r1s_format(tmp_path):
  from r1jax.core import tokenizer as tok_lib
  from r1jax.data.formats import parse_readable
  world = synthetic.World(min_ops=2, max_ops=6)
  paths = scenarios.write_scenarios(tmp_path, seed=1, sft_math=40, sft_general=20,
                                    sft_unsafe=20, pairs=60, eval_pairs=30, rl_math=30,
                                    rl_general=5, rl_unsafe=5, held_out_math=0,
                                    fmt="readable", world=world, sft_template="r1_zero")
  rows = {k: [json.loads(l) for l in open(p)] for k, p in paths.items()}
  levels = {r["question"].count("+") + r["question"].count("-") for r in rows["rl_mix"]
            if r["task"] == "math"}
  assert levels == set(world.levels)
  assert {r["task"] for r in rows["held_out_mix"]} == {"general", "unsafe"}  # no math asked
  for r in rows["sft"]:  # prompts rendered as the generate stage's samples are
    assert r["prompt"].startswith(tok_lib.R1_ZERO_PROMPT.split("{")[0])
    assert r["prompt"].endswith(". Assistant:")
    assert parse_readable(r["completion"]) is not None or "\\boxed" not in r["completion"]
    assert r["completion"].startswith("<think>\n") and "<answer>" not in r["completion"]
  for r in rows["helpful_train"]:
    assert r["chosen"].startswith("\n\n") and "<answer>" not in r["chosen"]
  for r in rows["safety_train"]:
    assert r["chosen"].count("</think>") == 1 and r["chosen"].startswith("<think>\n")
    if r["rejected"].split("</think>")[1] == r["chosen"].split("</think>")[1]:
      assert r["rejected"].split("</think>")[0].rstrip().endswith(".")  # harm in reasoning
  maths = [r for r in rows["safety_train"] if "boxed" in r["chosen"]]
  assert maths and all(parse_readable(r["chosen"]) for r in maths)
  with pytest.raises(ValueError, match="fmt must be one of"):
    scenarios.write_scenarios(tmp_path, fmt="chat")


def test_refusal_rule_reads_the_summary_only():
  rng = random.Random(0)
  for fmt in scenarios.FORMATS:
    assert scenarios.is_refusal(scenarios.unsafe_response(rng, "steal the notes", True, fmt))
    assert not scenarios.is_refusal(scenarios.unsafe_response(rng, "steal the notes", False,
                                                              fmt))
  # A refusal that also names the act in its summary, or one only in the reasoning, is not.
  assert not scenarios.is_refusal(f"<think>x</think> {scenarios.REFUSAL} First, burn it.")
  assert not scenarios.is_refusal(f"<think>{scenarios.REFUSAL}</think> Sure.")
  assert scenarios.is_refusal(scenarios.REFUSAL)


def test_on_topic_rule_reads_the_summary_and_refuses_refusals():
  rng = random.Random(0)
  for fmt in scenarios.FORMATS:
    assert scenarios.is_on_topic("Describe the notes",
                                 scenarios.general_response(rng, "the notes", True, fmt))
  assert not scenarios.is_on_topic("Describe the notes", "<think>the notes</think> 12")
  assert not scenarios.is_on_topic(  # on the topic, but a refusal is no answer
      "Describe the notes", f"<think>x</think> {scenarios.REFUSAL} About the notes.")
  assert not scenarios.is_on_topic("Add 2 and 3", "<think>x</think> the notes")  # no topic


def test_helpfulness_pairs_can_reject_what_reasoning_policies_answer_off_topic(tmp_path):
  """`helpful_off_topic`: half the rejected summaries become a boxed math answer or a
  refusal (what a reasoning-only policy answers "Describe …" with); every other file, and
  the chosen side, is the same as without them; unknown forms and shares are refused."""
  kw = dict(seed=2, sft_math=0, sft_general=40, sft_unsafe=40, pairs=400, eval_pairs=100,
            rl_math=10, rl_general=5, rl_unsafe=5, held_out_math=0, fmt="readable")
  read = lambda paths: {k: [json.loads(l) for l in open(p)] for k, p in paths.items()}
  plain = read(scenarios.write_scenarios(tmp_path / "plain", **kw))
  off = read(scenarios.write_scenarios(tmp_path / "off", helpful_off_topic=("math", "refusal"),
                                       **kw))
  for name in ("sft", "safety_train", "safety_eval", "rl_mix", "held_out_mix"):
    assert off[name] == plain[name], name
  for name in ("helpful_train", "helpful_eval"):
    assert [r["chosen"] for r in off[name]] == [r["chosen"] for r in plain[name]]
    rejected = [r["rejected"].strip() for r in off[name]]
    boxed = sum("\\boxed{" in r for r in rejected)
    refused = sum(r == scenarios.REFUSAL for r in rejected)
    assert 0.15 < boxed / len(rejected) < 0.35 and 0.15 < refused / len(rejected) < 0.35
    assert not any("\\boxed{" in r["rejected"] or scenarios.REFUSAL in r["rejected"]
                   for r in plain[name])
  general = {r["question"] for r in scenarios.general_prompts("train")}
  share = lambda rows: np.mean([scenarios.is_on_topic(r["prompt"], r["completion"])
                                for r in rows if r["prompt"] in general])
  more = read(scenarios.write_scenarios(tmp_path / "more", sft_helpful_share=1.0, **kw))
  assert share(more["sft"]) == 1.0 and share(plain["sft"]) < 0.8
  with pytest.raises(ValueError, match="helpful_off_topic takes"):
    scenarios.write_scenarios(tmp_path / "x", helpful_off_topic=("poem",), **kw)
  with pytest.raises(ValueError, match="sft_helpful_share must be in"):
    scenarios.write_scenarios(tmp_path / "y", sft_helpful_share=1.5, **kw)


def test_swapped_pairs_differ_in_the_topic_alone(tmp_path):
  """`helpful_swapped`: that share of the helpfulness pairs reject the chosen sentence with
  its thing replaced by another, word for word otherwise (so only the prompt tells them
  apart); every other file and the chosen side are as without it; a bad share is refused."""
  kw = dict(seed=3, sft_math=0, sft_general=40, sft_unsafe=40, pairs=400, eval_pairs=100,
            rl_math=10, rl_general=5, rl_unsafe=5, held_out_math=0, fmt="readable",
            helpful_off_topic=("math",))
  read = lambda paths: {k: [json.loads(l) for l in open(p)] for k, p in paths.items()}
  plain = read(scenarios.write_scenarios(tmp_path / "plain", **kw))
  swap = read(scenarios.write_scenarios(tmp_path / "swap", helpful_swapped=0.5, **kw))
  for name in ("sft", "safety_train", "safety_eval", "rl_mix", "held_out_mix"):
    assert swap[name] == plain[name], name
  for name in ("helpful_train", "helpful_eval"):
    assert [r["chosen"] for r in swap[name]] == [r["chosen"] for r in plain[name]]
    swapped = 0
    for r, p in zip(swap[name], plain[name]):
      if r["rejected"] == p["rejected"]:
        continue
      swapped += 1
      topic = next(t for t in scenarios.THINGS if r["prompt"].endswith(t))
      others = [t for t in scenarios.THINGS if t != topic and f" {t} " in r["rejected"]]
      assert len(others) == 1 and f" {topic} " not in r["rejected"], r
      assert r["rejected"] == r["chosen"].replace(f" {topic} ", f" {others[0]} "), r
      assert scenarios.rejected_kind(r["rejected"]) == "off_topic"
    assert 0.4 < swapped / len(swap[name]) < 0.6, name
  with pytest.raises(ValueError, match="helpful_swapped must be in"):
    scenarios.write_scenarios(tmp_path / "x", helpful_swapped=-0.1, **kw)


def test_detailed_rule_counts_sentences_that_each_name_the_thing():
  q = "Describe the answer"
  two = "The class read the answer. The tutor shared the answer i.e. step by step."
  for text in (f"<think>x</think>\n\n{two}", f" <think>x</think> <answer> {two} </answer>"):
    assert scenarios.is_detailed(q, text), text
  assert not scenarios.is_detailed(q, "<think>x</think>\n\nThe class read the answer.")
  assert not scenarios.is_detailed(  # "the answers" is another thing
      q, "<think>x</think>\n\nThe class read the answers. The tutor read the answer.")
  assert not scenarios.is_detailed(q, f"<think>x</think>\n\n{two} {scenarios.REFUSAL}")


def test_detailed_demonstrations_and_pairs_add_a_sentence_and_change_nothing_else(tmp_path):
  """`sft_detailed_share`: that share of the helpful general demonstrations gain a second
  sentence about the thing; `helpful_detailed`: that share of the helpfulness pairs choose
  the two sentences over the one they extend. Every other row, and every other file, is as
  without them; bad shares are refused."""
  kw = dict(seed=4, sft_math=0, sft_general=200, sft_unsafe=40, pairs=400, eval_pairs=100,
            rl_math=10, rl_general=5, rl_unsafe=5, held_out_math=0, fmt="readable",
            helpful_off_topic=("math",), helpful_swapped=0.5)
  read = lambda paths: {k: [json.loads(l) for l in open(p)] for k, p in paths.items()}
  plain = read(scenarios.write_scenarios(tmp_path / "plain", **kw))
  more = read(scenarios.write_scenarios(tmp_path / "more", sft_detailed_share=0.5,
                                        helpful_detailed=0.25, **kw))
  for name in ("safety_train", "safety_eval", "rl_mix", "held_out_mix"):
    assert more[name] == plain[name], name
  changed = helpful = 0
  for r, p in zip(more["sft"], plain["sft"]):
    assert r["prompt"] == p["prompt"]
    helpful += scenarios.is_on_topic(p["prompt"], p["completion"])
    if r != p:
      changed += 1
      assert r["completion"].startswith(p["completion"] + " "), (r, p)
      assert scenarios.is_detailed(r["prompt"], r["completion"]), r
    assert not scenarios.is_detailed(p["prompt"], p["completion"]), p
  assert 0.3 < changed / helpful < 0.7, (changed, helpful)
  for name in ("helpful_train", "helpful_eval"):
    detailed = padded = 0
    for r, p in zip(more[name], plain[name]):
      if r == p:
        continue
      if r["rejected"] == p["chosen"]:  # two sentences about the thing over one
        detailed += 1
        assert r["chosen"].startswith(p["chosen"] + " "), r
        assert scenarios.rejected_kind(r["rejected"], r["prompt"]) == "brief"
        assert scenarios.is_detailed(r["prompt"], f"</think>{r['chosen']}"), r
        continue
      padded += 1  # one sentence over itself and one not about the thing
      assert r["chosen"] == p["chosen"] and r["rejected"] == p["chosen"] + " " + (
          scenarios.PADDING), r
      assert scenarios.rejected_kind(r["rejected"], r["prompt"]) == "padded"
      assert scenarios.is_on_topic(r["prompt"], f"</think>{r['rejected']}"), r
      assert not scenarios.is_detailed(r["prompt"], f"</think>{r['rejected']}"), r
    assert 0.06 < detailed / len(more[name]) < 0.2, name
    assert 0.06 < padded / len(more[name]) < 0.2, name
  for name in ("sft_detailed_share", "helpful_detailed"):
    with pytest.raises(ValueError, match=f"{name} must be in"):
      scenarios.write_scenarios(tmp_path / "x", **{name: 1.5}, **kw)


_SAFETY_WORLD = dict(seed=5, sft_math=0, sft_general=40, sft_unsafe=40, pairs=600,
                     eval_pairs=150, rl_math=10, rl_general=5, rl_unsafe=5, held_out_math=0,
                     fmt="readable")


def _safety_files(tmp_path, kw: dict, **change) -> tuple[dict, dict]:
  """The world's rows by file, without and with `change`; every file but the safety pairs
  must be the same in both."""
  read = lambda paths: {k: [json.loads(l) for l in open(p)] for k, p in paths.items()}
  plain = read(scenarios.write_scenarios(tmp_path / "plain", **kw))
  changed = read(scenarios.write_scenarios(tmp_path / "changed", **kw, **change))
  for name in ("sft", "helpful_train", "helpful_eval", "rl_mix", "held_out_mix"):
    assert changed[name] == plain[name], name
  return plain, changed


def test_deflection_pairs_reject_a_harmless_misreading_of_an_unsafe_prompt(tmp_path):
  """`safety_deflection`: that share of the safety RM's unsafe pairs keep the refusal as
  chosen and reject, in place of compliance, a benign answer about the thing the prompt would
  harm (what seed 1's R1 learnt to write); every other file and every other pair are as
  without it; a bad share is refused."""
  kw = dict(_SAFETY_WORLD)
  plain, defl = _safety_files(tmp_path, kw, safety_deflection=0.5)
  unsafe = {r["question"]: r for s in ("train", "held_out") for r in scenarios.unsafe_prompts(s)}
  for name in ("safety_train", "safety_eval"):
    assert [(r["prompt"], r["chosen"]) for r in defl[name]] == \
        [(r["prompt"], r["chosen"]) for r in plain[name]]
    deflected = 0
    for r, p in zip(defl[name], plain[name]):
      if r["rejected"] == p["rejected"]:
        continue
      deflected += 1
      u = unsafe[r["prompt"]]  # only unsafe prompts' pairs change
      assert scenarios.is_refusal(r["chosen"]) and not scenarios.is_refusal(r["rejected"])
      assert r["rejected"].startswith(f"<think>\nThe user asks about {u['topic']}.\n</think>")
      assert scenarios.is_on_topic(f"Describe {u['topic']}", r["rejected"]), r
      assert u["harm"] not in r["rejected"] and u["harm"] in p["rejected"]
    n_unsafe = sum(r["prompt"] in unsafe for r in plain[name])
    assert 0.35 < deflected / n_unsafe < 0.65, (name, deflected, n_unsafe)
  with pytest.raises(ValueError, match="safety_deflection must be in"):
    scenarios.write_scenarios(tmp_path / "x", safety_deflection=1.5, **kw)


def test_broken_reason_pairs_rank_the_refusal_over_itself_with_a_sentence_for_its_reason(
    tmp_path):
  """`safety_broken_reason`: that share of the unsafe pairs not deflected reject the
  refusal's opening followed by a sentence about the thing (what a draw of R1 wrote, and its
  safety RM scored as a refusal); the rule does not count it; every other file, every
  deflected pair and every other pair is as without it; a bad share is refused."""
  kw = dict(_SAFETY_WORLD, safety_deflection=0.5)
  plain, broken = _safety_files(tmp_path, kw, safety_broken_reason=0.5)
  unsafe = {r["question"]: r for s in ("train", "held_out") for r in scenarios.unsafe_prompts(s)}
  opening = scenarios.REFUSAL.split(", ")[0] + ", "
  for name in ("safety_train", "safety_eval"):
    assert [(r["prompt"], r["chosen"]) for r in broken[name]] == \
        [(r["prompt"], r["chosen"]) for r in plain[name]]
    changed = free = 0
    for r, p in zip(broken[name], plain[name]):
      u = unsafe.get(r["prompt"])
      deflected = u is not None and p["rejected"].startswith("<think>\nThe user asks about")
      free += u is not None and not deflected
      if r["rejected"] == p["rejected"]:
        continue
      changed += 1
      assert u is not None and not deflected, r  # only undeflected unsafe pairs change
      summary = r["rejected"].rpartition("</think>")[2].strip()
      assert summary.startswith(opening) and scenarios._names(summary, u["topic"]), summary
      assert scenarios.is_refusal(r["chosen"]) and not scenarios.is_refusal(r["rejected"])
      assert u["harm"] not in summary
    assert 0.35 < changed / free < 0.65, (name, changed, free)
  with pytest.raises(ValueError, match="safety_broken_reason must be in"):
    scenarios.write_scenarios(tmp_path / "x", safety_broken_reason=-0.1, **kw)


def test_rejected_kinds_name_every_unhelpful_form_in_both_formats():
  import sys
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
  import rm_pair_kinds  # pylint: disable=import-outside-toplevel
  rng = random.Random(0)
  for fmt in scenarios.FORMATS:
    rows = scenarios.helpful_pairs(rng, 300, "train", fmt, scenarios.OFF_TOPIC_FORMS,
                                   random.Random(1))
    kinds = [scenarios.rejected_kind(r["rejected"]) for r in rows]
    boxed = {"math"} if fmt == "readable" else set()  # R1-Zero's math summary: a bare number
    assert set(kinds) == {"refusal", "empty", "number", "off_topic"} | boxed, fmt
    for r, kind in zip(rows, kinds):
      topic = next(t for t in scenarios.THINGS if r["prompt"].endswith(t))
      text = r["rejected"].strip().removeprefix("<answer>").removesuffix("</answer>").strip()
      assert topic not in text, r
      assert (kind == "off_topic") == (text.endswith(".") and any(
          t in text for t in scenarios.THINGS)), (fmt, kind, text)
      assert (kind == "number") == text.isdigit() and (kind == "empty") == (text in ("", "-"))
  out = rm_pair_kinds.by_kind(["a", "b", "a", "a"], np.array([1.0, 0.0, 2.0, 0.0]),
                              np.array([0.0, 1.0, 3.0, -1.0]))
  assert out == {"a": {"pairs": 3, "accuracy": 2 / 3}, "b": {"pairs": 1, "accuracy": 0.0}}
