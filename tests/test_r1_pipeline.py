"""experiments/tiny_r1.py at toy size (tests/tiny_r1_toy.py): every stage of the recipe in its
order, the report with its table and eight claims, and a run killed (SIGKILL) in a middle
stage that resumes to the same report as the uninterrupted one. The second test reuses (and
rewrites) the first's workdir, so they run in this order."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_r1_toy
from r1jax import stages
from r1jax.stages import pipeline

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def toy_r1(tmp_path_factory):
  work = tmp_path_factory.mktemp("toy_r1")
  c = tiny_r1_toy.get_config()
  return c, work, stages.run(c, str(work))


@pytest.mark.slow
def test_the_whole_recipe_runs_every_stage_and_reports_each_model_and_claim(toy_r1):
  c, work, out = toy_r1
  assert all((work / name / "done.json").is_file() for name in c.order)
  rep = json.loads((work / "report.json").read_text())
  assert out["report"]["claims_held"] == rep["claims_held"]
  models = [m[1] for m in c.report.models]
  assert list(rep["models"]) == models and len(models) == 9
  for name in models:
    g, m = rep["models"][name]["math"], rep["models"][name]["mixture"]
    assert g["questions"] == 8 and g["k"] == 2 and set(g["levels"]) == {"2", "3"}
    for key in ("pass@1", "cons@k", "format", "language", "mixed"):
      assert 0.0 <= g[key] <= 1.0, (name, key)
    assert m["general_prompts"] > 0 and m["unsafe_prompts"] > 0 and 0 <= m["safety"] <= 1
  assert [x["n"] for x in rep["claims"]] == list(range(1, 9))
  assert all(isinstance(x["holds"], bool) and x["rule"] and x["numbers"] for x in rep["claims"])
  # RL stages' curves: the step-0 eval and the last (every = 0), the worst drops.
  rl = [n for n in c.order if c[n].stage == "rl"]
  assert rl == ["zero", "reasoning", "reasoning_no_lang", "r1", "student_rl"]
  assert all([p["step"] for p in rep["curves"][n]] == [0, 2] for n in rl)
  # Each task of the held-out mixture is judged by the rewards routed to it.
  judged = {task: set(keys) for task, keys in pipeline.reward_means(work / "mix_r1").items()}
  assert judged == {"general": {"helpful", "safety", "format", "overlong"},
                    "unsafe": {"safety", "format", "overlong"}}
  assert set(rep["worst_drops"]) == set(rl)
  table = (work / "report.md").read_text()
  for label, _, _ in c.report.models:
    assert f"\n| {label} | " in table
  assert f"{rep['claims_held']} of 8 claims hold." in table
  assert table.count(" **") == 8 and all(Path(p).is_file() for p in rep["pngs"])
  # The chain: each stage started from the one the paper names.
  assert c.rs_sft.model.init_from == c.cold_start.model.init_from == "{workdir}/base/final"
  assert c.r1.model.init_from == "{workdir}/rs_sft/final"
  assert c.student_rl.model.init_from == c.student_distill.model.init_from == (
      "{workdir}/student_base/final")


def _readers(c, first: str) -> list[str]:
  """`first` and every later stage that reads its outputs, directly or through another."""
  out = [first]
  for name in c.order[c.order.index(first) + 1:]:
    text = c[name].to_json_best_effort()
    if any(f"{{workdir}}/{d}/" in text for d in out):
      out.append(name)
  return out


@pytest.mark.slow
def test_a_run_killed_in_a_middle_stage_resumes_to_the_same_report(toy_r1):
  """On the fixture's own workdir (after the test above read it), with all-scenario RL and
  every stage that reads its output removed: the same command is killed (SIGKILL) inside
  all-scenario RL, after its first checkpoint, and run again. Its report equals the
  uninterrupted one."""
  c, work, _ = toy_r1
  before = {name: (work / name).read_text() for name in ("report.json", "report.md")}
  removed = _readers(c, "r1")
  assert removed == ["r1", "distill_data", "student_distill", "eval_r1", "mix_r1",
                     "eval_student_distill", "mix_student_distill"]
  for name in removed:
    shutil.rmtree(work / name)
  for name in before:
    (work / name).unlink()
  cmd = [sys.executable, "-m", "r1jax.main", f"--config={TESTS}/tiny_r1_toy.py",
         f"--workdir={work}"]
  proc = subprocess.Popen(cmd, cwd=TESTS.parent, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  first = work / "r1" / "checkpoints" / "1"  # all-scenario RL has saved step 1 of 2
  deadline = time.monotonic() + 600
  while not first.is_dir():
    assert proc.poll() is None, f"the run ended before the r1 stage's first checkpoint: {cmd}"
    assert time.monotonic() < deadline, "no r1 checkpoint within 10 minutes"
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)  # the process group: reward workers die with it
  proc.wait()
  assert not (work / "r1" / "done.json").exists()  # killed inside the stage
  stages.run(tiny_r1_toy.get_config(), str(work))  # the same command, run again
  assert json.loads((work / "r1" / "summary.json").read_text())["resumed_from"] == 1
  a, b = json.loads(before["report.json"]), json.loads((work / "report.json").read_text())
  for key in ("models", "claims", "curves", "reflect_tenths", "worst_drops", "claims_held"):
    assert b[key] == a[key], key
  assert (work / "report.md").read_text() == before["report.md"]
