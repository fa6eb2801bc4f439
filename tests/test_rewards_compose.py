"""Reward spec parsing, task routing, weighted totals, failure isolation and the batch hook."""

import time

import ml_collections
import numpy as np
import pytest

from r1jax.rewards import compose
from r1jax.rewards import pool as pool_lib
from r1jax.rewards import registry

SPEC = {
    "components": [
        {"name": "accuracy", "tasks": ["math"], "fields": {"gold": "answer"}},
        {"name": "code", "tasks": ["code"], "fields": {"tests": "tests"}},
        {"name": "format", "weight": 0.5, "tasks": ["math", "code"]},
        {"name": "language", "key": "lang_en", "weight": 0.1, "kwargs": {"lang": "en"}},
    ],
}
SAMPLES = [
    {"task": "math", "completion": r"<think>easy</think><answer>\boxed{2}</answer>",
     "answer": "2"},
    {"task": "math", "completion": "<think>这是二</think><answer>3</answer>", "answer": "2"},
    {"task": "code", "completion": "<think>add one</think><answer>```python\n"
                                   "print(int(input()) + 1)\n```</answer>",
     "tests": [{"input": "1", "output": "2"}, {"input": "5", "output": "7"}]},
    {"task": "general", "completion": "no tags at all"},
]


# Module-level so that pool workers can unpickle them by name.
def _raising_reward(text):
  raise RuntimeError("reward bug")


def _hanging_reward(text):
  while True:
    pass


def _string_reward(text):
  return "1.0"


@pytest.fixture(scope="module")
def pool():
  with pool_lib.RewardPool(num_workers=2, timeout_s=20) as p:
    yield p


@pytest.fixture
def extra_rewards():
  """Registers test rewards and removes them afterwards (the registry is global)."""
  added = []

  def add(name, fn, **kw):
    registry.register(name, fn, **kw)
    added.append(name)

  yield add
  for name in added:
    registry.REGISTRY.pop(name, None)


def test_routing_weights_and_components(pool):
  scorer = compose.RewardScorer(SPEC, pool=pool)
  batch = scorer.score(SAMPLES)
  nan = np.nan
  np.testing.assert_array_equal(batch.components["accuracy"], [1, 0, nan, nan])
  np.testing.assert_allclose(batch.components["code"], [nan, nan, 0.5, nan])
  np.testing.assert_array_equal(batch.components["format"], [1, 1, 1, nan])
  np.testing.assert_array_equal(batch.components["lang_en"], [1, 0, 1, 1])
  np.testing.assert_allclose(batch.total_N, [1.6, 0.5, 1.1, 0.1], rtol=1e-6)
  assert not any(f.any() for f in batch.failed.values())
  assert batch.pool_cpu_s > 0 and batch.seconds > 0
  metrics = batch.metrics()
  assert metrics["reward/accuracy"] == 0.5 and metrics["reward/code"] == 0.5
  assert metrics["reward/format_failures"] == 0.0


def test_config_dict_spec_and_defaults(pool):
  cfg = ml_collections.ConfigDict({"task_field": "kind", "default_task": "math",
                                   "components": [dict(name="accuracy", fields=dict(gold="gt")),
                                                  dict(name="tag_count", weight=2.0)]})
  scorer = compose.RewardScorer(cfg, pool=pool)
  batch = scorer.score([{"completion": r"<think>a</think>\boxed{7}", "gt": 7}])
  assert batch.components["accuracy"][0] == 1.0 and batch.components["tag_count"][0] == 0.5
  assert batch.total_N[0] == pytest.approx(2.0)


@pytest.mark.parametrize("spec, match", [
    ({"components": [{"name": "acuracy"}]}, "unknown reward 'acuracy'"),
    ({"components": [{"name": "format", "wieght": 1}]}, "unknown keys"),
    ({"components": [{"name": "format"}], "timeout": 3}, "unknown reward spec keys"),
    ({"components": []}, "non-empty list"),
    ({"components": [{"name": "language", "kwargs": {"langg": "en"}}]}, "no arguments"),
    ({"components": [{"name": "format"}, {"name": "format"}]}, "unique"),
    ({"components": [{"name": "accuracy", "fields": {"gold": "a"}, "kwargs": {"gold": "1"}}]},
     "both"),
    ({"components": [{"name": "format", "view": "middle"}]}, "view"),
    ({"components": ["format"]}, "must be a dict"),
])
def test_bad_specs_fail_loudly(spec, match):
  with pytest.raises(ValueError, match=match):
    compose.parse_spec(spec)


def test_bad_samples_fail_loudly(pool):
  scorer = compose.RewardScorer(SPEC, pool=pool)
  with pytest.raises(ValueError, match="lacks fields"):
    scorer.submit([{"task": "math", "completion": "x"}])
  with pytest.raises(ValueError, match="completion"):
    scorer.submit([{"task": "math", "answer": "1"}])
  strict = compose.RewardScorer({"components": [{"name": "format", "tasks": ["math"]}]})
  with pytest.raises(ValueError, match="no reward component handles"):
    strict.submit([{"task": "poetry", "completion": "x"}])


def test_failing_rewards_fall_back_and_are_flagged(pool, extra_rewards):
  extra_rewards("raises", _raising_reward)
  extra_rewards("hangs", _hanging_reward, timeout_s=0.5)
  extra_rewards("not_a_number", _string_reward)
  extra_rewards("inline_raises", lambda text: 1 / 0, kind="inline")
  spec = {"fallback": -0.5, "components": [
      {"name": "raises"}, {"name": "hangs", "fallback": -2.0}, {"name": "not_a_number"},
      {"name": "inline_raises"}, {"name": "format"}]}
  scorer = compose.RewardScorer(spec, pool=pool)
  start = time.monotonic()
  batch = scorer.score([{"completion": "<think>a</think><answer>1</answer>"}] * 2)
  assert time.monotonic() - start < 5
  for key, fallback in (("raises", -0.5), ("hangs", -2.0), ("not_a_number", -0.5),
                        ("inline_raises", -0.5)):
    np.testing.assert_array_equal(batch.components[key], [fallback] * 2)
    assert batch.failed[key].all(), key
  assert not batch.failed["format"].any()
  np.testing.assert_allclose(batch.total_N, [-0.5 - 2 - 0.5 - 0.5 + 1] * 2)


def test_batch_reward_hook_sees_its_view(pool, extra_rewards):
  seen = {}

  def helpfulness(texts, **columns):
    seen["texts"], seen["columns"] = texts, columns
    return [float(len(t)) for t in texts]

  extra_rewards("helpfulness", helpfulness, kind="batch", view="summary", inputs=("prompt",))
  extra_rewards("safety", lambda texts: [1.0], kind="batch")  # Wrong length: must fall back.
  spec = {"components": [{"name": "helpfulness", "tasks": ["general"]},
                         {"name": "safety", "tasks": ["general"]},
                         {"name": "accuracy", "tasks": ["math"], "fields": {"gold": "answer"}}]}
  samples = [{"task": "general", "completion": "<think>hmm</think>Paris.", "prompt": "q1"},
             {"task": "math", "completion": r"\boxed{1}", "answer": "1"},
             {"task": "general", "completion": "<think>x</think>Hi", "prompt": "q2"}]
  batch = compose.RewardScorer(spec, pool=pool).score(samples)
  assert seen == {"texts": ["Paris.", "Hi"], "columns": {"prompt": ["q1", "q2"]}}
  np.testing.assert_array_equal(batch.components["helpfulness"], [6, np.nan, 2])
  assert batch.failed["safety"].tolist() == [True, False, True]
  assert batch.components["accuracy"][1] == 1.0


def test_register_rejects_bad_rewards(extra_rewards):
  with pytest.raises(ValueError, match="already registered"):
    registry.register("format", _raising_reward)
  with pytest.raises(ValueError, match="module-level"):
    registry.register("closure", lambda text: 0.0)
  with pytest.raises(ValueError, match="no parameters"):
    registry.register("needs_gold", _raising_reward, inputs=("gold",))
  with pytest.raises(ValueError, match="kind"):
    registry.register("odd", _raising_reward, kind="gpu")


def test_submit_returns_before_rewards_finish(pool):
  """The RL loop submits right after the rollout and collects later: submit must not block."""
  scorer = compose.RewardScorer(SPEC, pool=pool)
  code_sample = dict(SAMPLES[2], tests=[{"input": str(i), "output": str(i + 1)}
                                        for i in range(6)])
  start = time.monotonic()
  pending = scorer.submit([code_sample] * 4)
  submitted = time.monotonic() - start
  batch = pending.result()
  assert submitted < batch.seconds / 4  # 24 sandboxed runs take far longer than submitting.
  np.testing.assert_array_equal(batch.components["code"], [1.0] * 4)


def test_a_broken_pool_stops_scoring_instead_of_filling_fallbacks():
  """RL must stop when no worker can run (a setup bug), not train on fallback rewards."""
  # A task that failed on its own keeps its fallback; one no worker could run raises.
  assert pool_lib.Outcome(0.0, "timeout after 10s", 10.0).value_or_raise() == 0.0
  with pytest.raises(pool_lib.RewardPoolBroken, match="RewardPool is broken: no workers"):
    pool_lib.Outcome(0.0, "pool broken: no workers", 0.0).value_or_raise()
  with pool_lib.RewardPool(num_workers=1, timeout_s=20) as broken:
    with broken._lock:  # what the dispatcher does when workers die before they start
      broken._break("workers die before they start (simulated)")
    with pytest.raises(pool_lib.RewardPoolBroken, match="simulated"):
      compose.RewardScorer(SPEC, pool=broken).score(SAMPLES)
