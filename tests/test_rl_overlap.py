"""One step off-policy RL (grpo.overlap): stale samples, exact resume, errors that surface."""

import json
import signal

import jax
import numpy as np
import pytest

from r1jax import stages
from r1jax.core import checkpoint
from r1jax.core.metrics import read_metrics
from r1jax.generation.engine import Engine
from r1jax.main import EXIT_PREEMPTED

import main_runs
from tiny_world import make_world, rl_test_config

STEPS = 5


def overlap_config(world, steps=STEPS, overlap="rollout"):
  c = rl_test_config(world, steps=steps)
  c.grpo.overlap = overlap
  return c


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
  root = tmp_path_factory.mktemp("overlap")
  config_path = main_runs.config_file(overlap_config(world), root / "exp.py")
  main_runs.finish(main_runs.start(f"--config={config_path}", f"--workdir={root / 'run'}"))
  params = jax.tree.map(np.asarray, checkpoint.load_params(root / "run" / "final")[1])
  return config_path, params, root / "run"


@pytest.mark.slow
def test_updates_after_the_first_train_on_samples_one_policy_behind(uninterrupted):
  """Step 1 samples on-policy; every later rollout ran in the background on the policy one
  update behind, so the sampler's importance weight moves off 1 while the PPO ratio of
  the first mini-batch (against the update's own start) stays 1 (train/losses.py)."""
  records = read_metrics(uninterrupted[2] / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  first, later = records[0], records[1:]
  assert "ahead/rollout_s" not in first and abs(first["is_weight_mean"] - 1) < 1e-3
  for r in later:
    assert r["ahead/rollout_s"] > 0 and r["ahead/reward_s"] > 0
    assert "time/reward" not in r  # scored in the background
  # Off by a policy step: the weight differs from 1 by much more than numerics.
  assert max(abs(r["is_weight_mean"] - 1) for r in later) > 20 * abs(first["is_weight_mean"] - 1)
  summary = json.loads((uninterrupted[2] / "summary.json").read_text())
  assert summary["rl_wall_s"] > 0 and "final" in summary


@pytest.mark.slow
def test_sigterm_with_a_rollout_pending_resumes_bit_exact(uninterrupted, tmp_path):
  """The checkpoint holds the pending rollout's params and data position: the resumed run
  replays that rollout and ends with the uninterrupted run's weights, bit for bit."""
  config_path, want, _ = uninterrupted
  run = tmp_path / "run"
  proc = main_runs.start(f"--config={config_path}", f"--workdir={run}")
  main_runs.wait_for_checkpoint(proc, run, 2)
  proc.send_signal(signal.SIGTERM)
  main_runs.finish(proc, returncode=EXIT_PREEMPTED)
  summary = json.loads((run / "summary.json").read_text())
  assert summary["preempted"] is True and summary["step"] < STEPS
  main_runs.finish(main_runs.start(f"--config={config_path}", f"--workdir={run}"))
  assert json.loads((run / "summary.json").read_text())["resumed_from"] == summary["step"]
  main_runs.assert_bit_exact(want, jax.tree.map(
      np.asarray, checkpoint.load_params(run / "final")[1]))


@pytest.mark.slow
def test_rewards_mode_trains_the_rollout_modes_params(world, uninterrupted, tmp_path):
  """"rewards" samples step n + 1 before update n, "rollout" during it: the same samples from
  the same params, so the same weights, bit for bit (why several processes may run
  "rollout" as "rewards": stages/rl.processes_overlap)."""
  config_path = main_runs.config_file(overlap_config(world, overlap="rewards"),
                                      tmp_path / "exp.py")
  main_runs.finish(main_runs.start(f"--config={config_path}", f"--workdir={tmp_path / 'run'}"))
  main_runs.assert_bit_exact(uninterrupted[1], jax.tree.map(
      np.asarray, checkpoint.load_params(tmp_path / "run" / "final")[1]))


@pytest.mark.slow
def test_switching_overlap_on_a_resumed_run_is_refused(world, uninterrupted):
  """Checkpoints of an overlapped run hold the pending rollout's params; a run without
  overlap cannot resume them silently (nor the other way round)."""
  c = overlap_config(world, steps=STEPS + 1, overlap="")
  with pytest.raises(ValueError, match="does not match"):
    stages.run(c, str(uninterrupted[2]))


def test_a_failing_background_rollout_stops_the_run_with_its_error(world, tmp_path,
                                                                   monkeypatch):
  """An error in the rollout that runs ahead is raised by the main loop at the next step,
  after the steps before it were checkpointed; "rewards" mode, whose main thread waits for
  the samples, is not left waiting."""
  launch, calls = Engine.launch, []

  def flaky(self, *args, **kw):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("sampler exploded")
    return launch(self, *args, **kw)

  monkeypatch.setattr(Engine, "launch", flaky)
  with pytest.raises(RuntimeError, match="sampler exploded"):
    stages.run(overlap_config(world, overlap="rewards"), str(tmp_path / "run"))
  assert main_runs.saved_steps(tmp_path / "run") == [1, 2]
