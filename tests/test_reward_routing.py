"""All-scenario reward routing: per-task component sets, views, device rewards, NaN masking."""

import jax
import numpy as np
import pytest

from r1jax.rewards import compose, registry


class Recorder:
  """A device reward that records what it saw and when, and scores len(text)."""

  def __init__(self, log, name, nan_for=()):
    self.log, self.name, self.nan_for = log, name, set(nan_for)

  def __call__(self, texts, **_):
    return self.launch(texts).result()

  def launch(self, texts, prompt=None, **_):
    self.log.append((self.name, "launch", list(texts), list(prompt or [])))
    outer = self

    class Pending:
      def result(self):
        outer.log.append((outer.name, "result"))
        return [float("nan") if t in outer.nan_for else float(len(t)) for t in texts]
    return Pending()


def _inline_logger(log):
  def fn(text):
    log.append(("rule", "run"))
    return 1.0
  return fn


SPEC = {
    "default_task": "math",
    "by_task": {"math": {"accuracy": 1.0, "format": 0.5, "safety": 2.0},
                "general": {"helpful": 1.0, "safety": 1.0}},
    "components": [{"name": "accuracy"}, {"name": "format"},
                   {"name": "helpful_t", "key": "helpful", "fields": {"prompt": "question"}},
                   {"name": "safety_t", "key": "safety", "fields": {"prompt": "question"}}],
}
REASONING, SUMMARY = "secret plan 12", " The answer is \\boxed{12}."
RESPONSE = f"<think>{REASONING}</think>{SUMMARY}"


@pytest.fixture()
def log():
  events = []
  registry.register("helpful_t", Recorder(events, "helpful"), inputs=("prompt",),
                    kind="device", view="summary", overwrite=True)
  registry.register("safety_t", Recorder(events, "safety", nan_for={"NaN please"}),
                    inputs=("prompt",), kind="device", view="full", overwrite=True)
  return events


def test_each_task_gets_exactly_its_components_and_weights(log):
  samples = [{"task": "math", "gold": "12", "question": "q0", "completion": RESPONSE},
             {"task": "general", "gold": "", "question": "q1", "completion": RESPONSE}]
  with compose.RewardScorer(SPEC) as scorer:
    out = scorer.score(samples)
  c = out.components
  assert c["accuracy"][0] == 1.0 and np.isnan(c["accuracy"][1])
  assert c["format"][0] == 0.0 and np.isnan(c["format"][1])  # no <answer> tags
  assert np.isnan(c["helpful"][0]) and c["helpful"][1] == len(SUMMARY)
  assert c["safety"].tolist() == [len(RESPONSE)] * 2
  assert out.total_N.tolist() == [1.0 + 0.0 + 2.0 * len(RESPONSE),
                                  len(SUMMARY) + 1.0 * len(RESPONSE)]
  m = out.metrics()
  assert m["reward/general/helpful"] == len(SUMMARY) and "reward/math/helpful" not in m
  assert m["reward/math/samples"] == 1 and m["reward/general/total"] == out.total_N[1]


def test_each_reward_model_sees_its_view(log):
  """Helpfulness judges the summary after </think> only, safety the whole response."""
  samples = [{"task": "general", "gold": "", "question": "q", "completion": RESPONSE}]
  with compose.RewardScorer(SPEC) as scorer:
    scorer.score(samples)
  seen = {name: texts for name, what, *rest in log if what == "launch" for texts in rest[:1]}
  assert seen["helpful"] == [SUMMARY] and REASONING not in seen["helpful"][0]
  assert seen["safety"] == [RESPONSE]
  prompts = {name: rest[1] for name, what, *rest in log if what == "launch"}
  assert prompts == {"helpful": ["q"], "safety": ["q"]}


def test_language_target_per_row_or_per_run():
  """The target language is a row field when the component maps one, else the run's kwarg;
  the score is the share of chain-of-thought words in it (the summary does not count)."""
  cot = "<think>first 3 + 4 = 7 然后 7 - 2 = 5</think> The answer is \\boxed{5}. 答案"
  per_row = {"components": [{"name": "language", "fields": {"lang": "language"}}]}
  per_run = {"components": [{"name": "language", "kwargs": {"lang": "zh"}}]}
  rows = [{"completion": cot, "language": "en"}, {"completion": cot, "language": "zh"}]
  with compose.RewardScorer(per_row) as scorer:
    got = scorer.score(rows).components["language"]
  # CoT words: "first" (en), 然, 后 (zh, one per Han character): en 1/3, zh 2/3.
  np.testing.assert_allclose(got, [1 / 3, 2 / 3], rtol=1e-6)
  with compose.RewardScorer(per_run) as scorer:
    got = scorer.score([{"completion": cot}]).components["language"]
  np.testing.assert_allclose(got, [2 / 3], rtol=1e-6)
  with compose.RewardScorer(per_row) as scorer:  # an unknown language: a failure, counted
    out = scorer.score([{"completion": cot, "language": "fr"}])
  assert out.failed["language"].tolist() == [True] and out.components["language"][0] == 0.0


def test_device_rewards_launch_at_submit_and_are_collected_after_host_rewards(log):
  registry.register("rule_t", _inline_logger(log), kind="inline", overwrite=True)
  spec = {"default_task": "general", "components": [
      {"name": "safety_t", "key": "safety", "fields": {"prompt": "question"}},
      {"name": "rule_t"}]}
  with compose.RewardScorer(spec) as scorer:
    pending = scorer.submit([{"question": "q", "completion": "hi"}])
    assert [e[:2] for e in log] == [("safety", "launch")]  # dispatched, not waited on
    pending.result()
  assert [e[:2] for e in log] == [("safety", "launch"), ("rule", "run"), ("safety", "result")]


def test_non_finite_reward_model_scores_are_failures_not_rewards(log):
  samples = [{"task": "general", "gold": "", "question": "q", "completion": c}
             for c in ("fine", "NaN please", "also fine")]
  with compose.RewardScorer(SPEC) as scorer:
    out = scorer.score(samples)
  assert out.failed["safety"].tolist() == [False, True, False]
  assert np.isfinite(out.total_N).all() and out.components["safety"][1] == 0.0  # fallback
  assert out.metrics()["reward/safety_failures"] == 1


def test_routing_errors_before_work(log):
  with compose.RewardScorer(SPEC) as scorer:
    with pytest.raises(ValueError, match=r"tasks \{'code': 2\}.*no reward components"):
      scorer.check_tasks(["math", "code", "general", "code"], "prompts.jsonl")
    scorer.check_tasks(["math", "general"])
  bad = {**SPEC, "by_task": {"math": {"acuracy": 1.0}}}
  with pytest.raises(ValueError, match="not component keys"):
    compose.parse_spec(bad)
  weighted = {**SPEC, "components": [{"name": "accuracy", "weight": 2.0}, *SPEC["components"][1:]]}
  with pytest.raises(ValueError, match="set its tasks and weights there"):
    compose.parse_spec(weighted)
  unused = {**SPEC, "by_task": {"math": {"accuracy": 1.0, "format": 1.0, "safety": 1.0}}}
  with pytest.raises(ValueError, match="'helpful' judges no task"):
    compose.parse_spec(unused)
  with pytest.raises(TypeError, match="launch"):
    registry.register("no_launch", lambda texts: [0.0], kind="device")


def test_mixture_far_from_the_configured_weights_fails():
  from r1jax.stages.rl import check_mixture
  tasks = ["math"] * 9 + ["general"]
  check_mixture(tasks, {"math": 0.88, "general": 0.12}, "mix.jsonl")  # within 0.05
  with pytest.raises(ValueError, match=r"mix.jsonl: task shares \{'general': 0.1, 'math': 0.9"):
    check_mixture(tasks, {"math": 0.5, "general": 0.5}, "mix.jsonl")
  # tiny_r1's R1 declared 0.4 / 0.35 / 0.25 on a 0.5 / 0.25 / 0.25 file, and a check that
  # only warned past 0.1 of a share let it train on the file's mix unnoticed
  tasks = ["math"] * 400 + ["general"] * 200 + ["unsafe"] * 200
  with pytest.raises(ValueError, match=r"'general': \(0.25, 0.35\)"):
    check_mixture(tasks, {"math": 0.4, "general": 0.35, "unsafe": 0.25}, "rl_mix.jsonl")
  check_mixture(tasks, {"math": 0.5, "general": 0.25, "unsafe": 0.25}, "rl_mix.jsonl")


def test_failed_samples_leave_the_baseline_and_the_loss():
  from r1jax.train import advantages
  r = np.array([1.0, 0.0, 99.0, 1.0, 5.0, 5.0], np.float32)
  bad = np.array([False, False, True, False, True, True])
  filled = advantages.fill_failed(r, bad, 3)
  assert filled.tolist() == [1.0, 0.0, 0.5, 1.0, 1.0, 1.0]


# ------------------------------------------------------- reward models declared in a config


@pytest.fixture(scope="module")
def rm_world(tmp_path_factory):
  """A tiny RL world and a saved (random-head) reward model that shares its tokenizer."""
  import jax
  import tiny_world
  from r1jax.core.config import model_config, model_group
  from r1jax.rewards import reward_model as rm
  root = tmp_path_factory.mktemp("rm_world")
  world = tiny_world.make_world(root)
  cfg = model_config(model_group(**tiny_world.MODEL))
  params = rm.init_rm(cfg, jax.random.key(0))
  params["head"] = {"w": jax.random.normal(jax.random.key(1), (cfg.hidden,)),
                    "b": jax.numpy.zeros(())}
  rm.save_rm(root / "rm", params, cfg)
  return world, str(root / "rm")


def _declared(world, path, **over):
  return {"name": "safety_rm", "path": path, "tokenizer": world["tokenizer"],
          "template": "plain", "view": "full", "max_len": 48, "batch_size": 8, **over}


def test_declared_reward_models_load_once_and_score_like_the_model(rm_world):
  from r1jax.core.tokenizer import load_tokenizer
  from r1jax.rewards import reward_model as rm
  world, path = rm_world
  spec = {"default_task": "math", "models": [_declared(world, path)],
          "components": [{"name": "safety_rm", "fields": {"prompt": "question"}}]}
  compose.parse_spec(spec)  # validation alone needs no weights
  with pytest.raises(ValueError, match="load them first"):
    compose.RewardScorer(spec)
  models = rm.load_models(spec["models"])
  samples = [{"question": "Compute 1 + 2", "completion": c} for c in ("3", "<think>x</think> 4")]
  with compose.RewardScorer(spec, models=models) as scorer:
    got = scorer.score(samples).components["safety_rm"]
  cfg, params = rm.load_rm(path)
  direct = rm.RewardModel(params, cfg, load_tokenizer(world["tokenizer"]), template="plain",
                          max_len=48, batch_size=8)
  np.testing.assert_allclose(got, direct([s["completion"] for s in samples],
                                         [s["question"] for s in samples]), atol=1e-5)


def test_declared_reward_model_bad_input(rm_world):
  from r1jax.rewards import reward_model as rm
  world, path = rm_world
  with pytest.raises(ValueError, match="disagrees with the declared template"):
    rm.load_models([_declared(world, path, template="chatml")])
  with pytest.raises(ValueError, match="unknown keys"):
    rm.load_models([_declared(world, path, temperature=1.0)])
  with pytest.raises(ValueError, match="'none', 'running', 'validation' or {mean, std}"):
    rm.load_models([_declared(world, path, norm="zscore")])
  with pytest.raises(ValueError, match="norm must be"):
    rm.load_models([_declared(world, path, norm={"mean": 0.0})])
  with pytest.raises(FileNotFoundError, match="not an r1jax params checkpoint"):
    rm.load_models([_declared(world, world["rl_train"])])


@pytest.mark.slow
def test_rl_with_a_declared_reward_model_logs_it(rm_world, tmp_path, monkeypatch):
  """…with the reward model on devices of its own (`mesh.reward_devices`)."""
  import tiny_world
  from r1jax import stages
  from r1jax.core.metrics import read_metrics
  from r1jax.stages import rl as rl_stage
  world, path = rm_world
  meshes = []
  load = rl_stage.load_models
  monkeypatch.setattr(rl_stage, "load_models",
                      lambda specs, mesh: meshes.append(mesh) or load(specs, mesh))
  c = tiny_world.rl_test_config(world, steps=2)
  c.mesh.reward_devices = 2
  c.rewards.models = [_declared(world, path, norm="running")]
  c.rewards.components = [{"name": "accuracy", "weight": 1.0, "tasks": ["math"]},
                          {"name": "safety_rm", "weight": 0.5,
                           "fields": {"prompt": "question"}}]
  c.ckpt.every = 0
  stages.run(c, str(tmp_path))
  m = read_metrics(tmp_path / "metrics.jsonl")[-1]
  assert np.isfinite(m["reward/safety_rm"]) and m["reward/safety_rm_failures"] == 0
  assert m["reward/device_s"] > 0 and m["reward/masked_samples"] == 0
  assert list(meshes[0].devices.flat) == jax.devices()[-2:]  # the policy had the other 6


def test_per_component_norm_with_task_weights_is_refused():
  import tiny_world
  from r1jax.stages import rl
  c = tiny_world.rl_test_config({"tokenizer": "t", "rl_train": "r"})
  c.rewards.components = [{"name": "accuracy"}, {"name": "format"}]
  c.rewards.by_task = {"math": {"accuracy": 1.0, "format": 0.5}}
  rl.validate(c)
  c.grpo.reward_norm = "per_component"
  with pytest.raises(ValueError, match="use 'sum'"):
    rl.validate(c)
