"""The tiny_zero pipeline end to end at toy size: data → base → rl → report, then a re-run."""

import json

import pytest

from r1jax import stages
from r1jax.core.config import config_from_file
from r1jax.stages import pipeline
from tiny_world import MODEL

REPO_EXPERIMENTS = pipeline.__file__.rsplit("/r1jax/", 1)[0] + "/experiments"


def _tiny_zero(arg=None):
  return config_from_file(f"{REPO_EXPERIMENTS}/tiny_zero.py", arg)


def _toy(c):
  c.unlock()
  c.synthetic.update(corpus_docs=1500, train_problems=64, held_out_problems=8)
  c.synthetic.vocab_size = 400
  shape = {**MODEL, "vocab_size": 400, "max_position": 512}
  for stage in (c.base, c.rl):
    stage.model.update(shape)
    stage.tensorboard = False
  c.base.steps, c.base.data.batch, c.base.data.seq_len = 4, 4, 128
  c.base.opt.update(total_steps=4, warmup_steps=1)
  c.rl.steps, c.rl.data.batch = 2, 4
  c.rl.grpo.group_size = 2
  c.rl.sampler.max_new_tokens = 8
  c.rl.data.max_prompt_tokens = c.rl.eval.max_prompt_tokens = 200
  c.rl.eval.update(k=2, max_new_tokens=8, batch_size=8)
  c.lock()
  return c


@pytest.fixture(scope="module")
def toy_zero(tmp_path_factory):
  """One toy tiny_zero pipeline run, which its test re-runs."""
  workdir = tmp_path_factory.mktemp("toy_zero")
  c = _toy(_tiny_zero())
  return c, workdir, stages.run(c, str(workdir))


def test_last_number_accuracy_ignores_the_format():
  from r1jax.evaluation.report import QuestionResult, Report
  q = lambda gold: QuestionResult(gold, gold, [], [], None, 0, False, {})
  rep = Report("b", [q("5"), q("12")])
  rep.completions = [["2 + 3 = 5. The answer is 5.", "<answer> 4 </answer>"],
                     ["#### 12", "nothing"]]
  assert pipeline.last_number_accuracy(rep) == 0.5


def test_experiment_configs_resolve_workdir(tmp_path):
  c = _tiny_zero()
  assert c.stage == "pipeline" and "{workdir}" in c.rl.model.init_from
  rl = pipeline.resolve(c.rl, tmp_path)
  assert rl.model.init_from == f"{tmp_path}/base/final"
  assert rl.eval.benchmarks == f"{tmp_path}/data/held_out.jsonl"


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_reruns_resume(toy_zero):
  c, workdir, out = toy_zero
  report = json.loads((workdir / "report.json").read_text())
  for label in ("base", "rl"):
    s = report["held_out"][label]
    assert s["questions"] == 8 and s["k"] == 2
    assert 0.0 <= s["pass@1"] <= 1.0 and 0.0 <= s["format"] <= 1.0
    assert 0.0 <= s["last_number_acc"] <= 1.0
  assert report["base_step"] == "step_000000" and report["final_step"] == "step_000002"
  gain = 100 * (report["held_out"]["rl"]["pass@1"] - report["held_out"]["base"]["pass@1"])
  assert out["held_out"]["rl"]["points_over_base"] == pytest.approx(gain)
  table = (workdir / "report.md").read_text()
  assert "### held_out" in table and "\n| base | " in table and "\n| rl | " in table
  assert any(p.endswith("reward.png") for p in out["curves"])
  base_final = workdir / "base" / "final" / "model.json"
  stamp = base_final.stat().st_mtime_ns
  again = stages.run(c, str(workdir))  # every stage done: nothing is retrained
  assert base_final.stat().st_mtime_ns == stamp
  assert again["held_out"] == out["held_out"]
  # Changed settings are refused, naming the fields, never reported under the old results.
  more = _toy(_tiny_zero())
  more.unlock()
  more.rl.steps, more.rl.opt.lr = 3, 1e-3
  with pytest.raises(ValueError, match=r"rl\.opt\.lr: 0\.0002 -> 0\.001; rl\.steps: 2 -> 3.*"
                                       r"allow_changes=rl\.opt\.lr,rl\.steps"):
    stages.run(more, str(workdir))
  assert json.loads((workdir / "rl" / "config.json").read_text())["steps"] == 2
  assert json.loads((workdir / "config.json").read_text())["rl"]["steps"] == 2  # not rewritten
  # Allowed: the rl stage resumes from its last checkpoint and trains on to the new end.
  more.rl.opt.lr = c.rl.opt.lr
  more.allow_changes = "rl.steps"
  longer = stages.run(more, str(workdir))
  assert longer["final_step"] == "step_000003" and base_final.stat().st_mtime_ns == stamp
  assert json.loads((workdir / "rl" / "summary.json").read_text())["resumed_from"] == 2


def test_a_bad_later_stage_value_fails_before_the_first_stage(tmp_path):
  c = _toy(_tiny_zero())
  c.unlock()
  c.rl.grpo.loss_mode = "bogus"
  with pytest.raises(ValueError, match="grpo.loss_mode='bogus'"):
    stages.run(c, str(tmp_path))
  assert not (tmp_path / "data").exists() and not (tmp_path / "base").exists()
  c.rl.grpo.loss_mode = "bnpo"
  c.rl.rewards.components = [{"name": "acuracy", "weight": 1.0}]
  with pytest.raises(ValueError, match="acuracy"):
    stages.run(c, str(tmp_path))
  c.rl.rewards.components = [{"name": "accuracy", "weight": 1.0}]
  c.rl.eval.benchmarks = str(tmp_path / "no_such_benchmark.jsonl")
  with pytest.raises(FileNotFoundError, match="rl.eval.benchmarks: .*no_such_benchmark"):
    stages.run(c, str(tmp_path))
  assert not (tmp_path / "data").exists() and not (tmp_path / "config.json").exists()


def test_settings_added_by_a_later_version_are_not_changes():
  old, new = {"a": 1, "g": {"x": 1}}, {"a": 1, "g": {"x": 1, "y": 0}, "h": {"z": 0}}
  assert pipeline.config_changes(old, new, added_ok=True) == []
  assert pipeline.config_changes(old, new) == ["g.y: None -> 0", "h: None -> {'z': 0}"]
  # A changed or a removed field still is one.
  assert pipeline.config_changes(old, {"a": 2}, added_ok=True) == ["a: 1 -> 2", "g: {'x': 1} -> None"]
  # JSON has no tuples: a tuple setting read back from a run's record is the same setting.
  assert pipeline.config_changes({"t": ["a", ["b"]]}, {"t": ("a", ("b",))}) == []
  assert pipeline.config_changes({"t": ["a"]}, {"t": ("b",)}) == ["t: ['a'] -> ('b',)"]
