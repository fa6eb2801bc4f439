"""Evaluation: pass@k / cons@k, MATH-500 gold grading, grade_file's bad input, the CLI,
generation with a tiny random model, and the `eval` stage end to end."""

import json
import math
import subprocess
import sys

import jax
import ml_collections
import pytest

from r1jax.core import tokenizer as tok_lib
from r1jax.core.config import ModelConfig, model_group
from r1jax.core.model import init_params
from r1jax.data import rows as datasets
from r1jax.evaluation import evaluate as ev
from r1jax.evaluation import report as er
from r1jax.evaluation.external import grade_file
from r1jax.generation import sampler as sampler_lib
from r1jax.generation.engine import Engine
from r1jax.rewards import math as math_lib
from r1jax.rewards import pool as pool_lib
from r1jax.stages import eval as eval_stage

TINY = dict(hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64)
VOCAB = 512


@pytest.fixture(scope="module")
def pool():
  with pool_lib.RewardPool(num_workers=2) as p:
    yield p


def write_jsonl(path, records) -> str:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


# ------------------------------------------------------------------------------ pass@k, cons@k


def test_pass_at_k_matches_binomial_formula():
  for n in range(1, 21):
    for c in range(n + 1):
      for k in range(1, n + 1):
        want = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert er.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)
  assert er.pass_at_k(64, 1, 1) == pytest.approx(1 / 64)
  for n, k in ((4, 0), (4, 5)):
    with pytest.raises(ValueError, match="0 < k <= n"):
      er.pass_at_k(n, 1, k)


def test_aggregate_known_values():
  q = lambda correct: er.QuestionResult("q", "1", ["1"] * len(correct), correct, "1", 1, False, {})
  s = er.aggregate([q([True, False, False, False]), q([True, True, True, True])])
  assert s["questions"] == 2 and s["samples"] == 8 and s["k"] == 4
  assert s["pass@1"] == pytest.approx(0.625)
  assert s["pass@1_stderr"] == pytest.approx(0.375)  # std([.25, 1], ddof=1) / sqrt(2)
  assert s["pass@k"] == 1.0 and "max_samples" not in s
  assert er.aggregate([])["questions"] == 0


def test_cons_votes_by_equivalence_with_earliest_tie_break(pool):
  boxed = lambda *xs: [f"<think>..</think> \\boxed{{{x}}}" for x in xs]
  cases = {  # id: (gold, completions, majority, votes, majority_correct, correct)
      "wrong_forms_win": ("3", ["<answer>1/2</answer>"] + boxed("0.5", "\\frac{1}{2}", "3", "3"),
                          "1/2", 3, False, [False, False, False, True, True]),
      "right_forms_win": ("\\frac{1}{2}", boxed("0.5", "7") + ["<answer>1/2</answer>"]
                          + boxed("7", "\\dfrac{1}{2}"), "0.5", 3, True,
                          [True, False, True, False, True]),
      "tie_wrong_first": ("5", boxed("4", "5", "5", "4"), "4", 2, False, None),
      "tie_right_first": ("5", boxed("5", "4", "4", "5"), "5", 2, True, None),
      "tie_two_wrong": ("1", boxed("9", "8", "8", "9"), "9", 2, False, None),
      "nothing_extracted": ("5", ["I do not know", "the answer is 5", "<answer>5"], None, 0,
                            False, [False] * 3),
  }
  rows = [{"id": i, "gold": g, "task": "math", "meta": {}} for i, (g, *_) in cases.items()]
  report = ev.score_completions(rows, [c[1] for c in cases.values()], pool=pool)
  for q, (gold, texts, majority, votes, right, correct) in zip(report.questions, cases.values()):
    assert (q.majority, q.majority_votes, q.majority_correct) == (majority, votes, right), q.id
    if correct is not None:
      assert q.correct == correct, q.id
    assert q.grading_errors == 0
  assert report.questions[-1].answers == [None] * 3
  s = report.summary()
  assert s["cons@k"] == pytest.approx(2 / 6)
  assert s["extracted"] == pytest.approx(22 / 25)
  assert s["k"] == 3 and s["max_samples"] == 5


# -------------------------------------------------------------------------- MATH-500 grading


@pytest.fixture(scope="module")
def math500_reports(shared_data, tmp_path_factory):
  """grade_file (default RewardPool) on MATH-500's own solutions, and on each next row's."""
  path = shared_data / "math500" / "test.jsonl"
  rows = [json.loads(line) for line in path.open()]
  tmp = tmp_path_factory.mktemp("math500")
  gold = write_jsonl(tmp / "gold.jsonl",
                     [{"id": r["unique_id"], "completions": [r["solution"]]} for r in rows])
  shifted = write_jsonl(tmp / "shifted.jsonl", [
      {"id": r["unique_id"], "completion": rows[(i + 1) % len(rows)]["solution"]}
      for i, r in enumerate(rows)])
  return grade_file(path, gold), grade_file(path, shifted)


@pytest.mark.slow
def test_acceptance_math500_gold_solutions_pass_and_neighbours_fail(math500_reports):
  gold, shifted = math500_reports
  for r in (gold, shifted):
    s = r.summary()
    assert s["questions"] == 500 and s["k"] == 1 and s["extracted"] == 1.0
    assert not r.missing_ids and not r.unmatched_ids and not r.malformed_lines and not r.skipped
    assert s["grading_errors"] == 0
  assert gold.summary()["pass@1"] >= 0.99
  assert shifted.summary()["pass@1"] <= 0.01


def test_math500_breakdown_and_report_files(math500_reports, tmp_path):
  gold = math500_reports[0]
  b = gold.breakdown()
  assert list(b["level"]) == ["1", "2", "3", "4", "5"]
  assert len(b["subject"]) == 7 and "Number Theory" in b["subject"]
  for field in ("level", "subject"):
    assert sum(g["questions"] for g in b[field].values()) == 500
  table = er.markdown_table([gold])
  assert "| math500 | all | 500 | 1 |" in table and "| math500 | level 5 |" in table
  assert "| math500 | subject Precalculus |" in table
  back = er.Report.from_json(gold.to_json(tmp_path / "m.json"))
  assert back.to_dict() == gold.to_dict()
  metrics = ev.summary_metrics(gold)
  assert set(metrics) == {f"eval/math500/{k}" for k in ("pass@1", "cons@k", "pass@k", "extracted")}
  assert metrics["eval/math500/pass@1"] == gold.summary()["pass@1"]
  assert set(ev.summary_metrics(gold, prefix="heldout")) == {
      f"heldout/{k}" for k in ("pass@1", "cons@k", "pass@k", "extracted")}


# ---------------------------------------------------------------------------- grade_file input


def test_grade_file_bad_input_is_counted_not_fatal(tmp_path, pool):
  bench = write_jsonl(tmp_path / "bench.jsonl", [
      {"id": 7, "question": "1+2?", "answer": "3"},
      {"id": "b", "question": "half?", "answer": "1/2"},
      {"id": "c", "question": "no completions for me", "answer": "9"},
      {"id": "d", "question": "no answer field"},  # a bad benchmark row: skipped
  ])
  comps = write_jsonl(tmp_path / "c.jsonl", [
      {"id": 7, "completions": ["\\boxed{3}", "\\boxed{4}"]},  # int id matches row id "7"
      {"id": "b", "completion": "<answer>0.5</answer>"},
      "{not json",  # line 3
      "",  # blank: not a row
      {"id": "b", "completion": "\\boxed{2}"},  # accumulates with line 2
      "[1, 2]",  # line 6: not an object
      {"completions": ["\\boxed{3}"]},  # line 7: no id
      {"id": "b", "completions": "\\boxed{1}"},  # line 8: not a list
      {"id": "zzz", "completions": ["\\boxed{1}"]},  # unknown id
      {"id": "c", "completions": []},  # nothing to grade
  ])
  r = grade_file(bench, comps, pool=pool)
  assert r.benchmark == "bench"
  assert [q.id for q in r.questions] == ["7", "b"]
  assert r.questions[0].correct == [True, False]
  assert r.questions[1].answers == ["0.5", "2"] and r.questions[1].correct == [True, False]
  assert r.malformed_lines == [3, 6, 7, 8]
  assert r.missing_ids == ["c"] and r.unmatched_ids == ["zzz"] and r.skipped == 1
  table = er.markdown_table([r])
  assert "4 malformed completion lines" in table and "1 rows without completions" in table
  # The row without completions counts as wrong: (1/2 + 1/2 + 0) / 3, not the graded 1/2.
  s = r.summary()
  assert s["questions"] == 3 and s["graded"] == 2 and s["missing"] == 1
  assert s["pass@1"] == pytest.approx(1 / 3) and s["cons@k"] == pytest.approx(2 / 3)
  assert er.Report.from_json(r.to_json(tmp_path / "r.json")).malformed_lines == [3, 6, 7, 8]
  empty = grade_file(bench, write_jsonl(tmp_path / "none.jsonl", ["oops"]), pool=pool)
  assert empty.questions == [] and empty.malformed_lines == [1] and len(empty.missing_ids) == 3
  assert empty.summary()["pass@1"] == 0.0 and empty.summary()["questions"] == 3
  assert "| bench | all | 3 | | 0.0 | 0.0 | 0.0 | |" in er.markdown_table([empty])


def test_grade_file_refuses_duplicate_benchmark_ids(tmp_path):
  bench = write_jsonl(tmp_path / "b.jsonl", [{"id": 1, "question": "q", "answer": "1"},
                                             {"id": 2, "question": "r", "answer": "2"},
                                             {"id": 1, "question": "q again", "answer": "1"}])
  comps = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "completion": "\\boxed{1}"}])
  with pytest.raises(ValueError, match=r"1 duplicate row ids \(first: \['1'\]\)"):
    grade_file(bench, comps)


def test_grade_file_missing_files(tmp_path):
  bench = write_jsonl(tmp_path / "b.jsonl", [{"id": 1, "question": "q", "answer": "1"}])
  with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
    grade_file(bench, tmp_path / "nowhere.jsonl")
  with pytest.raises(FileNotFoundError, match="no_bench.jsonl"):
    grade_file(tmp_path / "no_bench.jsonl", bench)


@pytest.mark.slow
def test_cli_writes_reports_and_defines_no_flags_on_import(tmp_path):
  from absl import flags
  assert "completions" not in flags.FLAGS and "benchmark" not in flags.FLAGS
  folder = tmp_path / "aime_mini"
  folder.mkdir()
  bench = write_jsonl(folder / "test.jsonl", [{"id": 1, "question": "q", "answer": "025"},
                                              {"id": 2, "question": "r", "answer": "7"}])
  comps = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "completions": ["\\boxed{25}"] * 2},
                                             {"id": 2, "completion": "\\boxed{8}"}])
  out = subprocess.run([sys.executable, "-m", "r1jax.evaluation", f"--benchmark={bench}",
                        f"--completions={comps}", f"--out={tmp_path / 'out'}", "--workers=1"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| aime_mini | all | 2 | 1 | 50.0 ± 50.0 |" in out.stdout
  assert (tmp_path / "out" / "report.md").read_text() in out.stdout
  report = er.Report.from_json(tmp_path / "out" / "aime_mini.json")
  assert [q.correct for q in report.questions] == [[True, True], [False]]
  bad = subprocess.run([sys.executable, "-m", "r1jax.evaluation", f"--benchmark={bench}"],
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "completions" in bad.stderr
  # Completions for another benchmark: nothing graded is an error, not a score of 0.
  other = write_jsonl(tmp_path / "other.jsonl", [{"id": "x9", "completion": "\\boxed{1}"}])
  none = subprocess.run([sys.executable, "-m", "r1jax.evaluation", f"--benchmark={bench}",
                         f"--completions={other}", f"--out={tmp_path / 'none'}", "--workers=1"],
                        capture_output=True, text=True, timeout=300)
  assert none.returncode == 1 and "nothing was graded for aime_mini" in none.stderr


# ---------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny(shared_data, tmp_path_factory):
  """(tokenizer path, tokenizer, ModelConfig, random params) of a tiny model."""
  rows = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").open()][:600]
  texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
  path = tok_lib.train_sentencepiece(texts, tmp_path_factory.mktemp("sp") / "sp", VOCAB)
  tok = tok_lib.load_tokenizer(path)
  cfg = ModelConfig(vocab_size=VOCAB, max_position=2048, **TINY)
  return path, tok, cfg, init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def gen_rows(shared_data):
  rows, _ = datasets.load_rows(shared_data / "math500" / "test.jsonl", limit=3)
  long_row = {"id": "long", "question": "word " * 3000, "gold": "1", "task": "math", "meta": {}}
  return rows[:2] + [long_row] + rows[2:]


def make_engine(cfg, tok, max_new_tokens=256, stop=("</answer>",)):
  """R1's evaluation protocol: temperature 0.6, top-p 0.95."""
  return Engine(cfg, None, tok, temperature=0.6, top_p=0.95, max_new_tokens=max_new_tokens,
                max_prompt_len=1024, stop=stop)


@pytest.fixture(scope="module")
def generated(tiny, gen_rows, pool):
  """Two evaluate() runs with the same key and one with another, on one engine."""
  _, tok, cfg, params = tiny
  engine = make_engine(cfg, tok, max_new_tokens=8)
  run = lambda seed: ev.evaluate(
      params, engine, gen_rows, key=jax.random.key(seed), k=3, batch_size=2,
      max_prompt_tokens=1000, benchmark="math500", pool=pool, progress=False)
  return run(0), run(0), run(1), engine.sampler


@pytest.mark.slow
def test_evaluate_samples_k_per_question(generated, gen_rows):
  report = generated[0]
  assert [q.id for q in report.questions] == [r["id"] for r in gen_rows if r["id"] != "long"]
  assert report.skipped == 1  # the long prompt
  assert report.settings == {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "max_new_tokens": 8,
                             "k": 3, "template": "r1_zero", "stop": ["</answer>"]}
  assert len(report.completions) == 3
  for q, texts in zip(report.questions, report.completions):
    assert q.n == 3 and len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert q.answers == [math_lib.extract_answer(t) for t in texts]
    assert all(1 <= n <= 8 for n in q.lengths)
    assert all(n == 8 for n, t in zip(q.lengths, q.truncated) if t)
  s = report.summary()
  assert 0 <= s["pass@1"] <= 1 and 0 <= s["cons@k"] <= 1 and 1 <= s["mean_tokens"] <= 8
  assert set(ev.summary_metrics(report)) == {
      f"eval/math500/{k}" for k in ("pass@1", "cons@k", "pass@k", "extracted", "mean_tokens",
                                    "truncated")}
  table = er.markdown_table([report])
  assert "mean " in table and "temperature=0.6" in table


def test_evaluate_is_deterministic_per_key(generated):
  first, again, other, smp = generated
  assert again.to_dict() == first.to_dict() and again.completions == first.completions
  assert other.completions != first.completions
  # Three calls, one batch shape: one prefill, and every program compiled once.
  assert [k[0] for k in smp._fns].count("prefill") == 1
  assert smp.compilations() == len(smp._fns)


def test_sample_many_batches_uneven_prompts_with_progress(tiny, capsys):
  """Batches whose longest prompts fall in different power-of-two widths (5 and 40 tokens) are
  sampled one by one and joined, padded to the widest, with a progress line per batch."""
  _, tok, cfg, params = tiny
  engine = make_engine(cfg, tok, max_new_tokens=3)
  prompts = [[5] * 5, [6] * 40, [7] * 3]
  out = engine.sample_many(params, prompts, jax.random.key(0), k=2, batch_size=1, progress=True)
  assert out.tokens.shape[0] == 6 and out.prompt_tokens.shape[0] == 3
  assert out.prompt_mask.sum(axis=1).tolist() == [5, 40, 3]
  assert "sampling: batch 3/3" in capsys.readouterr().err


def test_evaluate_input_errors(tiny, gen_rows):
  _, tok, cfg, params = tiny
  engine = make_engine(cfg, tok)
  call = lambda rows, **kw: ev.evaluate(params, engine, rows, key=jax.random.key(0),
                                        progress=False, **kw)
  # Multi-token stops are fine (this tokenizer falls back to bytes, so even a
  # snowman round-trips); an empty one could never match.
  assert len(sampler_lib.stop_token_ids(tok, ["answer is"])[0]) > 1
  assert len(sampler_lib.stop_token_ids(tok, ["\u2603"])[0]) == 3
  with pytest.raises(ValueError, match="round-trip"):
    make_engine(cfg, tok, stop=("</answer>", ""))
  with pytest.raises(ValueError, match="code"):
    call([{**gen_rows[0], "task": "code"}])
  with pytest.raises(ValueError, match="ids, the model only"):
    ev.evaluate(params, make_engine(cfg.replace(vocab_size=100), tok), gen_rows,
                key=jax.random.key(0))
  empty = call([r for r in gen_rows if r["id"] == "long"], max_prompt_tokens=1000)
  assert empty.questions == [] and empty.skipped == 1 and empty.completions == []
  assert engine.sampler.compilations() == 0  # nothing was sampled


# ----------------------------------------------------------------------------------- the stage


def stage_config(tok_path, benchmarks: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "eval"
  c.seed = 3
  c.max_bad_share = 0.01
  c.tokenizer = str(tok_path)
  c.model = model_group(vocab_size=VOCAB, max_position=2048, **TINY)
  c.mesh = ml_collections.ConfigDict({"shape": (2, 2, 2)})
  c.eval = ml_collections.ConfigDict(dict(
      benchmarks=benchmarks, k=2, temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=8,
      stop=("</answer>",), template="r1_zero", batch_size=4, limit=2, max_prompt_tokens=1000))
  c.lock()
  return c


@pytest.mark.slow
def test_eval_stage_end_to_end(tiny, shared_data, tmp_path, capsys):
  math500 = shared_data / "math500" / "test.jsonl"
  held_out = write_jsonl(tmp_path / "held_out.jsonl", [
      {"id": "h1", "question": "What is 2+2?", "answer": "4"},
      {"id": "h2", "question": "What is 3*3?", "answer": "9"},
      {"id": "h3", "question": "not reached: limit=2", "answer": "1"}])
  result = eval_stage.run(stage_config(tiny[0], f"{math500}, {held_out}"), tmp_path / "w")
  table = capsys.readouterr().out
  assert result["stage"] == "eval"
  for name in ("math500", "held_out"):
    assert 0 <= result[f"eval/{name}/pass@1"] <= 1 and f"eval/{name}/mean_tokens" in result
    assert f"| {name} | all | 2 | 2 |" in table
  out = tmp_path / "w" / "eval"
  assert sorted(p.name for p in out.iterdir()) == [
      "held_out.completions.jsonl", "held_out.json", "math500.completions.jsonl",
      "math500.json", "report.md"]
  assert (out / "report.md").read_text() in table
  report = er.Report.from_json(out / "math500.json")
  assert [q.n for q in report.questions] == [2, 2]
  assert report.settings["path"] == str(math500) and report.settings["k"] == 2
  # The saved completions grade back to the same verdicts; the other 498 rows are missing.
  again = grade_file(math500, out / "math500.completions.jsonl", workers=1)
  assert [q.correct for q in again.questions] == [q.correct for q in report.questions]
  assert len(again.missing_ids) == 498
  # A benchmark's samples depend neither on the others evaluated beside it nor on the order.
  eval_stage.run(stage_config(tiny[0], f"{held_out},{math500}"), tmp_path / "swapped")
  swapped = (tmp_path / "swapped" / "eval" / "math500.completions.jsonl").read_text()
  assert swapped == (out / "math500.completions.jsonl").read_text()


def test_a_benchmark_with_too_many_unusable_rows_is_refused(tmp_path, shared_data):
  """The eval stage's benchmarks go through max_bad_share like every other input: the real
  AIME file with 2 broken lines appended (2 of 32 rows) loads at 10 %, stops at 1 %."""
  from r1jax.core.config import eval_group
  from r1jax.core.errors import DataError
  from r1jax.evaluation.suite import load_sets
  path = tmp_path / "aime24.jsonl"
  path.write_text((shared_data / "aime24" / "test.jsonl").read_text() + "{oops\n[1]\n")
  e = eval_group(benchmarks=str(path))
  assert load_sets(e, 0.1)[0].skipped == 2
  with pytest.raises(DataError, match=r"2 of 32 rows are unusable .* the first is row 31: "
                                      r"malformed_json"):
    load_sets(e, 0.01)
