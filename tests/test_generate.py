"""The `generate` stage: rows, stats, resume after SIGKILL, bad input, grading parity with eval."""

import json
import signal
import time

import jax
import numpy as np
import pytest

import main_runs
import tiny_world
from r1jax import stages
from r1jax.core.config import model_config, model_group
from r1jax.core import model as model_lib
from r1jax.data import rows as rows_lib
from r1jax.data.pipeline import SFTPipeline
from r1jax.core.tokenizer import load_tokenizer
from r1jax.evaluation.evaluate import score_completions
from r1jax.generation.engine import Samples
from r1jax.generation.output import ShardWriter, read_rows
from r1jax.generation.sampler import STOP_EOS
from r1jax.rewards import filters as filters_lib
from r1jax.rewards import registry
from r1jax.rewards.compose import RewardScorer, reward_inputs
from r1jax.stages import generate as gen


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return tiny_world.make_world(tmp_path_factory.mktemp("world"))


def gen_config(world, **over):
  c = gen.generate_config()
  c.tokenizer = world["tokenizer"]
  c.model = model_group(**tiny_world.MODEL)
  c.data.update(prompts=world["rl_train"], template="plain", max_prompt_tokens=32, limit=16)
  c.sampler.update(max_new_tokens=10, temperature=1.0, top_p=1.0)
  c.k, c.batch_prompts = 2, 4
  c.rewards.num_workers = 1
  c.filters.update(verifier="", truncated=False)
  c.select.per_prompt = 1
  c.progress = False
  c.tensorboard = False
  for key, value in over.items():
    group, _, name = key.rpartition(".")
    (c[group] if group else c)[name] = value
  return c


@pytest.fixture(scope="module")
def plain_run(world, tmp_path_factory):
  """One uninterrupted run with the teacher's top-4 logprobs and every rejected sample."""
  out = tmp_path_factory.mktemp("gen")
  c = gen_config(world, **{"output.top_k_logprobs": 4, "output.rejected": True,
                           "filters.truncated": True, "select.per_prompt": 2})
  c.sampler.stop = tuple("0123456789+=")  # a random model stops early on these, or not
  return c, out, stages.run(c, str(out))


@pytest.mark.slow
def test_rows_stats_and_summary_agree(plain_run):
  c, out, summary = plain_run
  samples, stats = read_rows(out, "samples"), read_rows(out, "stats")
  rejected = read_rows(out, "rejected")
  assert summary["prompts"] == len(stats) == 16 and summary["samples"] == 32
  assert [s["index"] for s in stats] == list(range(16))
  n_rejected = sum(1 for s in stats for r in s["reasons"] if r)
  assert len(rejected) == n_rejected == summary["samples"] - summary["accepted"]
  assert summary["truncated"] == sum("truncated" in r for s in stats for r in s["reasons"])
  assert summary["selected"] == len(samples) == sum(s["selected"] for s in stats)
  for s in stats:
    assert s["selected"] == min(s["accepted"], 2) and s["pass_rate"] is None
    truncated = [stop == "length" for stop in s["stop"]]
    assert truncated == ["truncated" in r for r in s["reasons"]]
  for row in samples:
    assert row["stop"] != "length" and row["num_tokens"] == len(row["completion_ids"])
    assert row["prompt"] == row["question"]  # the plain template
  assert 0 < summary["truncated"] < summary["samples"]  # both kinds happened
  assert json.loads((out / "summary.json").read_text())["tokens"] == summary["tokens"] > 0


def test_samples_are_sft_ready(plain_run, world):
  _, out, _ = plain_run
  tok = load_tokenizer(world["tokenizer"])
  path = next(out.glob("samples-h*.jsonl"))
  for kd in (0, 4):
    pipe = SFTPipeline(path, tok, 2, 64, distill_top_k=kd, shuffle=False)
    docs = [pipe.encode((i, line)) for i, line in enumerate(path.read_bytes().splitlines(), 1)]
    assert docs and all("bad" not in d for d in docs)
  # KD targets line up with the sampled ids: target j's teacher record is at position j.
  row = json.loads(path.read_bytes().splitlines()[0])
  doc = SFTPipeline(path, tok, 2, 64, distill_top_k=4).encode((1, json.dumps(row)))
  p, n = len(row["prompt_ids"]), len(row["completion_ids"])
  np.testing.assert_array_equal(doc["ids"][p:p + n], row["completion_ids"])
  np.testing.assert_array_equal(doc["top_ids"][p:p + n], row["teacher"]["top_ids"])
  assert doc["teacher_mask"][p:p + n].all() and not doc["teacher_mask"][:p].any()
  assert doc["targets"][p:].all() and not doc["targets"][:p].any()


@pytest.mark.slow
def test_teacher_top_k_is_the_models_distribution(plain_run, world):
  """Stored top-k = the top-k of log_softmax(logits) of a teacher-forced forward pass."""
  c, out, _ = plain_run
  cfg = model_config(c.model)
  params = model_lib.init_params(cfg, jax.random.key(c.seed))
  for row in read_rows(out, "samples")[:3]:
    ids = np.asarray(row["prompt_ids"] + row["completion_ids"])[None]
    logits = model_lib.forward(params, ids, cfg)[0]
    lsm = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
    p = len(row["prompt_ids"])
    for t in range(len(row["completion_ids"])):
      want = np.sort(lsm[p - 1 + t])[::-1][:4]
      np.testing.assert_allclose(row["teacher"]["top_logprobs"][t], want, atol=2e-4)
      assert lsm[p - 1 + t][row["teacher"]["top_ids"][t][0]] == pytest.approx(want[0], abs=2e-4)


def test_rerun_of_a_finished_run_adds_nothing(plain_run):
  c, out, summary = plain_run
  before = {p.name: p.read_bytes() for p in out.glob("*-h*.jsonl")}
  again = stages.run(c, str(out))
  assert again["resumed"] and again["samples"] == summary["samples"]
  assert {p.name: p.read_bytes() for p in out.glob("*-h*.jsonl")} == before


def test_another_runs_folder_is_refused(plain_run, world, tmp_path):
  c, out, _ = plain_run
  other = gen_config(world, **{"output.top_k_logprobs": 4, "output.rejected": True,
                               "filters.truncated": True, "select.per_prompt": 1})
  other.sampler.stop = c.sampler.stop
  with pytest.raises(ValueError, match=r"another run.*select\.per_prompt: 2 -> 1"):
    stages.run(other, str(out))
  (tmp_path / "samples-h00000.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
  with pytest.raises(ValueError, match="no manifest.json"):
    stages.run(gen_config(world), str(tmp_path))


@pytest.mark.slow
def test_verifier_without_gold_fails_before_work(world, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Compute {i} + 1"}) + "\n"
                             for i in range(4)))
  c = gen_config(world, **{"data.prompts": str(prompts), "filters.verifier": "accuracy"})
  with pytest.raises(ValueError, match="needs a gold answer in every prompt row"):
    stages.run(c, str(tmp_path / "out"))
  assert not list((tmp_path / "out").glob("*.jsonl"))
  # With no verifier the same file is fine: nothing to verify against.
  ok = stages.run(gen_config(world, **{"data.prompts": str(prompts)}), str(tmp_path / "ok"))
  assert ok["prompts"] == 4


def _flaky(completion: str) -> float:
  if len(completion) % 3 == 0:
    raise RuntimeError("a reward bug")
  return 1.0


@pytest.mark.slow
def test_reward_crash_is_counted_as_a_rejection_and_the_run_goes_on(world, tmp_path):
  registry.register("flaky_test_reward", _flaky, kind="inline", overwrite=True)
  c = gen_config(world, **{"filters.verifier": "accuracy"})
  c.rewards.components = [{"name": "accuracy", "tasks": ["math"]},
                          {"name": "flaky_test_reward", "weight": 0.0}]
  summary = stages.run(c, str(tmp_path))
  stats = read_rows(tmp_path, "stats")
  crashed = sum("reward_error" in r for s in stats for r in s["reasons"])
  assert summary["prompts"] == 16 and summary["reward_error"] == crashed > 0


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_equals_an_uninterrupted_run(world, tmp_path):
  """One run stopped twice: killed (-9) after 3 committed batches, with a torn row left
  behind; resumed and stopped by SIGTERM (the batch in hand is committed, exit 75); resumed
  again to the end. Its rows are the uninterrupted run's, none twice."""
  c = gen_config(world, **{"data.limit": 24, "batch_prompts": 2, "output.rejected": True,
                           "select.per_prompt": 0, "sampler.max_new_tokens": 16})
  config = main_runs.config_file(c, tmp_path / "gen.py")
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  main_runs.finish(main_runs.start(f"--config={config}", f"--workdir={whole}"))
  proc = _started_and_committed(config, cut, 3)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (cut / "summary.json").exists()  # killed mid-run, not after it
  # A torn, uncommitted tail (a kill between the rows and their commit) is dropped too.
  with (cut / "samples-h00000.jsonl").open("a") as f:
    f.write('{"id": "torn", "prompt": "x", "completion"')
  proc = _started_and_committed(config, cut, 6)
  proc.send_signal(signal.SIGTERM)
  main_runs.finish(proc, returncode=75)
  assert not (cut / "summary.json").exists()
  main_runs.finish(main_runs.start(f"--config={config}", f"--workdir={cut}"))
  for name in ("samples", "stats", "rejected", "rl_prompts"):
    a = sorted(json.dumps(r, sort_keys=True) for r in read_rows(whole, name))
    b = sorted(json.dumps(r, sort_keys=True) for r in read_rows(cut, name))
    assert a == b, name
  ids = [(r["id"], r["sample"]) for r in read_rows(cut, "samples")]
  assert len(ids) == len(set(ids)) and len(read_rows(cut, "stats")) == 24


def _started_and_committed(config, workdir, batches: int):
  """`generate` started in a subprocess, once it has committed `batches` batches."""
  proc = main_runs.start(f"--config={config}", f"--workdir={workdir}")
  progress = workdir / "progress-h00000.jsonl"
  deadline = time.monotonic() + 300
  while not (progress.exists() and progress.read_text().count("\n") >= batches):
    assert proc.poll() is None and time.monotonic() < deadline
    time.sleep(0.01)
  return proc


def test_shard_writer_recovers_torn_commits(tmp_path):
  w = ShardWriter(tmp_path, 0, ["a"])
  w.commit(0, {"a": [{"x": 1}]}, {"counts": {}})
  with (tmp_path / "a-h00000.jsonl").open("a") as f:
    f.write('{"x": 2}\n{"x": 3')  # rows of a batch that never committed
  with (tmp_path / "progress-h00000.jsonl").open("a") as f:
    f.write('{"batch": 1, "si')  # its commit line, torn
  w2 = ShardWriter(tmp_path, 0, ["a"])
  assert w2.done == {0} and read_rows(tmp_path, "a") == [{"x": 1}]
  w2.commit(1, {"a": [{"x": 2}]}, {"counts": {}})
  assert read_rows(tmp_path, "a") == [{"x": 1}, {"x": 2}]
  assert ShardWriter(tmp_path, 0, ["a"]).done == {0, 1}
  # A data file shorter than its last commit was edited by hand: refused, not rewritten.
  data = tmp_path / "a-h00000.jsonl"
  data.write_bytes(data.read_bytes()[:-3])
  with pytest.raises(ValueError, match="shorter .* than its last commit"):
    ShardWriter(tmp_path, 0, ["a"])


# ------------------------------------------------------ grading: generate vs eval, real data


def _real_cases(shared_data):
  """MATH-500 and GSM8K rows with right, wrong and unanswered completions (k = 4 each)."""
  math_rows, _ = rows_lib.load_rows(shared_data / "math500" / "test.jsonl", limit=25)
  gsm_rows, _ = rows_lib.load_rows(shared_data / "gsm8k" / "test.jsonl", limit=15)
  rows, texts = [], []
  for r in math_rows + gsm_rows:
    solution = r["meta"].get("solution") or r["meta"].get("solution", "")
    gold = r["gold"]
    texts += [f"<think>{solution[:200]}</think> <answer>{gold}</answer>",
              f"<think>work</think> <answer>{gold}1</answer>",
              f"The result is \\boxed{{{gold}}}.", "I do not know."]
    rows.append(r)
  return rows, texts


def test_generate_and_eval_grade_the_same_completions_identically(shared_data):
  rows, texts = _real_cases(shared_data)
  k, n = 4, len(texts)
  items = [{**r, "index": i, "prompt": r["question"], "prompt_ids": [1]}
           for i, r in enumerate(rows)]
  samples = Samples(np.ones((len(rows), 1), np.int32), np.ones((len(rows), 1), bool),
                    np.ones((n, 2), np.int32), np.ones((n, 2), bool), np.zeros((n, 2), np.float32),
                    np.full(n, STOP_EOS, np.int32), tuple(texts), k)
  c = gen.generate_config()
  c.filters.update(verifier="accuracy", truncated=False)
  c.select.per_prompt = 0
  with RewardScorer(c.rewards) as scorer:
    graded = scorer.score(reward_inputs(items, texts, samples.lengths, k))
  out, _ = gen._finish_batch(c, items, samples, texts, [True] * n, graded,
                             filters_lib.Filters.from_config(c.filters), {})
  through_generate = [["wrong" not in r for r in s["reasons"]] for s in out["stats"]]
  report = score_completions(rows, [texts[i * k:(i + 1) * k] for i in range(len(rows))])
  through_eval = [q.correct for q in report.questions]
  assert through_generate == through_eval
  flat = [x for q in through_eval for x in q]
  assert 0.3 < np.mean(flat) < 0.7  # both right and wrong answers were really graded
  assert [s["pass_rate"] for s in out["stats"]] == [np.mean(q) for q in through_eval]


# ---------------------------------------------------------------- distillation: sft + chain


def test_logit_distillation_refuses_another_tokenizer_before_work(plain_run, world, tmp_path):
  from r1jax.core.tokenizer import train_sentencepiece
  from r1jax.data import synthetic
  texts = [t[::-1] for t in synthetic.tokenizer_texts(world["corpus"], limit=400)]
  other = train_sentencepiece(texts, tmp_path / "other", tiny_world.MODEL["vocab_size"])
  _, out, _ = plain_run
  c = tiny_world.sft_test_config(world, steps=2)
  c.tokenizer = str(other)
  c.data.update(train=str(next(out.glob("samples-h*.jsonl"))), batch=2, seq_len=64)
  c.distill.top_k = 4
  with pytest.raises(ValueError, match="teacher's vocabulary differs from the student's"):
    stages.run(c, str(tmp_path / "student"))
  assert not (tmp_path / "student" / "checkpoints").exists()
  c.tokenizer = world["tokenizer"]
  c.distill.top_k = 8  # more than the teacher stored
  with pytest.raises(ValueError, match="stores 4 teacher logprobs per token"):
    stages.run(c, str(tmp_path / "student2"))
  c.distill.top_k, c.data.train = 4, world["corpus"]  # text rows: no teacher at all
  with pytest.raises(ValueError, match="has no teacher logprobs"):
    stages.run(c, str(tmp_path / "student3"))


@pytest.mark.slow
def test_distillation_chain_runs_and_compares_evals(world, tmp_path):
  import ml_collections
  from r1jax.core.config import eval_group
  from r1jax.stages.eval import eval_config
  c = ml_collections.ConfigDict(dict(stage="pipeline", seed=0, allow_changes=""))
  c.traces = gen_config(world, **{"output.top_k_logprobs": 4, "filters.truncated": True})
  c.traces.sampler.stop = tuple("0123456789+=")
  kd = tiny_world.sft_test_config(world, steps=3)
  kd.data.update(train="{workdir}/traces/samples-h00000.jsonl", batch=2, seq_len=64)
  kd.distill.top_k = 4
  c.kd = kd
  for name, init in (("eval_teacher", ""), ("eval_kd", "{workdir}/kd/final")):
    e = eval_config()
    e.tokenizer, e.model, e.tensorboard = world["tokenizer"], model_group(**tiny_world.MODEL), False
    e.model.init_from = init
    e.eval = eval_group(benchmarks=world["held_out"], k=2, max_new_tokens=8, batch_size=8,
                        template="plain", max_prompt_tokens=32)
    c[name] = e
  c.order = ("traces", "kd", "eval_teacher", "eval_kd")
  c.report = ml_collections.ConfigDict(dict(reference="eval_teacher", base="eval_teacher"))
  out = stages.run(c, str(tmp_path))
  rows = json.loads((tmp_path / "report.json").read_text())["held_out"]
  assert set(rows) == {"eval_teacher", "eval_kd"}
  assert rows["eval_teacher"]["pass@1"] == 0.0  # a random teacher: no share to take
  assert np.isnan(rows["eval_teacher"]["of_reference"])
  assert all(0 <= r["format"] <= 1 and 0 <= r["last_number_acc"] <= 1 for r in rows.values())
  assert rows["eval_teacher"]["points_over_base"] == 0.0
  assert out["kd"]["kd_kl"] >= 0 and "| eval_kd |" in (tmp_path / "report.md").read_text()
  stamp = (tmp_path / "kd" / "final" / "model.json").stat().st_mtime_ns
  stages.run(c, str(tmp_path))  # every stage done: skipped
  assert (tmp_path / "kd" / "final" / "model.json").stat().st_mtime_ns == stamp


def test_pass_rate_picks_the_rl_prompts_and_readable_output(tmp_path):
  rows = [{"id": f"p{i}", "question": f"q{i}", "gold": str(i + 10), "task": "math",
           "meta": {}, "index": i, "prompt": f"q{i}", "prompt_ids": [1]} for i in range(3)]
  zero = lambda a: f"<think>working it out</think> <answer>{a}</answer>"
  texts = [zero(10), zero(10), zero(11), zero(99), zero(0), "no tags 12"]
  n, k = len(texts), 2
  samples = Samples(np.ones((3, 1), np.int32), np.ones((3, 1), bool), np.ones((n, 2), np.int32),
                    np.ones((n, 2), bool), np.zeros((n, 2), np.float32),
                    np.full(n, STOP_EOS, np.int32), tuple(texts), k)
  c = gen.generate_config()
  c.filters.update(verifier="accuracy", truncated=False, structure="readable")
  c.output.readable = True
  out_texts, converted = gen._texts(samples, readable=True)
  assert converted == [True] * 5 + [False]
  with RewardScorer(c.rewards) as scorer:
    graded = scorer.score(reward_inputs(rows, out_texts, samples.lengths, k))
  out, counts = gen._finish_batch(c, rows, samples, out_texts, converted, graded,
                                  filters_lib.Filters.from_config(c.filters), {})
  assert [s["pass_rate"] for s in out["stats"]] == [1.0, 0.5, 0.0]
  assert [r["id"] for r in out["rl_prompts"]] == ["p1"] and counts["signal_prompts"] == 1
  assert out["samples"][0]["rewards"] == {"accuracy": 1.0, "format": 0.0}
  assert [r["completion"] for r in out["samples"]] == [
      "<think>\nworking it out\n</think>\n\nThe final answer is $\\boxed{10}$.",
      "<think>\nworking it out\n</think>\n\nThe final answer is $\\boxed{11}$."]
  assert out["stats"][2]["reasons"] == [["wrong"], ["wrong", "unreadable"]]
  assert counts["unreadable"] == 1 and counts["wrong"] == 3 and counts["accepted"] == 3
  # The RL prompts file is a prompt file the rl stage reads.
  path = tmp_path / "rl_prompts.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in out["rl_prompts"]))
  loaded, bad = rows_lib.load_rows(path)
  assert not bad and [(r["id"], r["question"], r["gold"]) for r in loaded] == [("p1", "q1", "11")]


def test_a_task_the_verifier_does_not_judge_has_no_pass_rate():
  rows = [{"id": "g0", "question": "Say hi", "gold": "", "task": "general", "meta": {},
           "index": 0, "prompt": "Say hi", "prompt_ids": [1]}]
  texts = ["<think>greet</think> hi", "hello"]
  samples = Samples(np.ones((1, 1), np.int32), np.ones((1, 1), bool), np.ones((2, 2), np.int32),
                    np.ones((2, 2), bool), np.zeros((2, 2), np.float32),
                    np.full(2, STOP_EOS, np.int32), tuple(texts), 2)
  c = gen.generate_config()
  c.filters.truncated = False
  with RewardScorer(c.rewards) as scorer:
    graded = scorer.score(reward_inputs(rows, texts, samples.lengths, 2))
  out, counts = gen._finish_batch(c, rows, samples, texts, [True, True], graded,
                                  filters_lib.Filters.from_config(c.filters), {})
  assert out["stats"][0]["pass_rate"] is None and not out["rl_prompts"]
  assert counts["wrong"] == 0 and counts["accepted"] == 2
  assert out["samples"][0]["rewards"]["accuracy"] is None  # not applicable: JSON null


def test_readable_output_with_teacher_logprobs_is_refused():
  """output.readable rewrites the text, which the teacher's per-token log-probs describe."""
  c = gen.generate_config()
  c.output.update(readable=True, top_k_logprobs=4)
  with pytest.raises(ValueError, match="output.readable rewrites the text"):
    gen.validate(c)
  c.output.top_k_logprobs = 0
  gen.validate(c)


def test_readable_output_checked_for_r1_zero_tags_is_refused():
  """Conversion comes first, so a 'zero' structure filter would reject every sample (a
  cold-start run once kept none of 6,000 correct R1-Zero samples this way)."""
  c = gen.generate_config()
  c.output.readable = True
  c.filters.structure = "zero"
  with pytest.raises(ValueError, match="filters.structure='zero' would reject every sample"):
    gen.validate(c)
  c.filters.structure = "readable"
  gen.validate(c)


def test_several_processes_refuse_a_batch_they_cannot_split_or_reward_devices(world, tmp_path,
                                                                              monkeypatch):
  """With 2 processes: batch_prompts must split over them, and reward models on devices of
  their own are refused (the last devices are one process's, the forward needs every
  process's): clear errors, before any prompt is read or file written."""
  from r1jax.core import errors
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="batch_prompts=3 does not split over 2 processes"):
    gen.run(gen_config(world, batch_prompts=3), tmp_path / "a")
  c = gen_config(world)
  c.rewards.models = [{"name": "helpful", "path": "x", "tokenizer": world["tokenizer"]}]
  c.mesh.reward_devices = 2
  with pytest.raises(errors.ConfigError, match="generate: mesh.reward_devices gives"):
    gen.run(c, tmp_path / "b")
  assert not list(tmp_path.iterdir())
