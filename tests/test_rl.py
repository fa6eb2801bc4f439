"""The RL loop: exact resume after SIGKILL, clean SIGTERM exit, and bad input handled."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from r1jax import checkpoint, stages
from r1jax.metrics import read_metrics
from r1jax.rewards import registry
from tiny_world import make_world, rl_test_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return make_world(tmp_path_factory.mktemp("world"))


def _config_file(config, path: Path) -> Path:
  """An experiment file that rebuilds `config` (so a subprocess runs exactly it)."""
  (path.parent / "config.json").write_text(config.to_json())
  path.write_text(
      "import json, pathlib, ml_collections\n"
      "def get_config(arg=None):\n"
      f"  d = json.loads(pathlib.Path({str(path.parent / 'config.json')!r}).read_text())\n"
      "  c = ml_collections.ConfigDict(d)\n"
      "  c.lock()\n"
      "  return c\n")
  return path


def _start(config_path: Path, workdir: Path) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "r1jax.main", f"--config={config_path}",
                           f"--workdir={workdir}"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


def _wait_for_checkpoint(proc, workdir: Path, step: int, timeout: float = 300) -> None:
  """Blocks until checkpoint `step` is committed (orbax renames its temp dir on commit)."""
  deadline = time.monotonic() + timeout
  target = workdir / "checkpoints" / str(step)
  while not target.is_dir():
    if proc.poll() is not None:
      raise AssertionError(f"run ended before step {step}: {proc.stdout.read()[-4000:]}")
    assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout} s"
    time.sleep(0.02)


def _final_params(workdir: Path):
  _, params = checkpoint.load_params(workdir / "final")
  return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
  root = tmp_path_factory.mktemp("full")
  config_path = _config_file(rl_test_config(world, steps=STEPS), root / "exp.py")
  _finish(_start(config_path, root / "run"))
  return config_path, _final_params(root / "run"), root / "run"


def _assert_bit_exact(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_uninterrupted_run_logs_rl_metrics(uninterrupted):
  _, _, run = uninterrupted
  records = read_metrics(run / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  for key in ("reward/total", "reward/accuracy", "reward/tag_count", "kl", "entropy",
              "clip_frac_low", "clip_frac_high", "response_length/mean", "response_length/max",
              "reflect/wait", "reflect/total", "tokens_per_s", "time/rollout", "time/reward",
              "time/update"):
    assert key in records[-1], key
  summary = json.loads((run / "summary.json").read_text())
  assert summary["step"] == STEPS and "final" in summary


def test_sigkill_then_resume_is_bit_exact(uninterrupted, tmp_path):
  config_path, want, _ = uninterrupted
  run = tmp_path / "run"
  proc = _start(config_path, run)
  _wait_for_checkpoint(proc, run, 2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (run / "final").exists(), "the run finished before it could be killed"
  out = _finish(_start(config_path, run))
  summary = json.loads((run / "summary.json").read_text())
  assert summary["resumed_from"] >= 2, out[-2000:]
  _assert_bit_exact(want, _final_params(run))


def test_sigterm_saves_exits_zero_and_resumes(uninterrupted, tmp_path):
  config_path, want, _ = uninterrupted
  run = tmp_path / "run"
  proc = _start(config_path, run)
  _wait_for_checkpoint(proc, run, 1)
  proc.send_signal(signal.SIGTERM)
  _finish(proc)  # exit code 0
  summary = json.loads((run / "summary.json").read_text())
  assert summary["preempted"] is True and summary["step"] < STEPS
  saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert saved[-1] == summary["step"]  # the step it stopped at was checkpointed
  assert not (run / "final").exists()
  _finish(_start(config_path, run))
  _assert_bit_exact(want, _final_params(run))


# ------------------------------------------------------------------------------ bad input


def test_malformed_rows_are_counted_and_the_run_continues(world, tmp_path):
  rows = Path(world["rl_train"]).read_text().splitlines()
  bad = tmp_path / "train.jsonl"
  bad.write_text("\n".join(rows[:20] + ["{not json", '{"question": "no answer"}', "[1, 2]"]
                           + rows[20:]) + "\n")
  c = rl_test_config(world, steps=1)
  c.data.train = str(bad)
  summary = stages.run(c, str(tmp_path / "run"))
  assert summary["step"] == 1
  assert summary["data/skipped_malformed_json"] == 1
  assert summary["data/skipped_missing_field"] == 1
  assert summary["data/skipped_not_object"] == 1


def test_missing_dataset_stops_before_any_work(world, tmp_path):
  c = rl_test_config(world)
  c.data.train = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    stages.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_prompt_plus_completion_over_max_position_stops_before_any_work(world, tmp_path):
  c = rl_test_config(world)
  c.data.max_prompt_tokens = 250  # + 12 new tokens > the model's 256 positions
  with pytest.raises(ValueError, match="max_position 256"):
    stages.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_wrong_shape_checkpoint_stops_before_any_work(world, uninterrupted, tmp_path):
  _, _, run = uninterrupted
  c = rl_test_config(world, hidden=48)  # init_from a checkpoint of hidden 32
  c.model.init_from = str(run / "final")
  with pytest.raises(ValueError, match="shape"):
    stages.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
  # Resuming a workdir with another model's checkpoints fails with the same clarity.
  c = rl_test_config(world, steps=STEPS + 1, hidden=48)
  with pytest.raises(ValueError, match="does not match"):
    stages.run(c, str(run))


def _boom(completion: str) -> float:
  raise RuntimeError("reward bug")


def test_raising_reward_falls_back_and_the_run_continues(world, tmp_path):
  if "test_boom" not in registry.REGISTRY:
    registry.register("test_boom", _boom, kind="inline")
  c = rl_test_config(world, steps=2)
  c.rewards.components = [{"name": "accuracy", "weight": 1.0},
                          {"name": "test_boom", "weight": 1.0, "fallback": -0.5}]
  summary = stages.run(c, str(tmp_path / "run"))
  assert summary["step"] == 2
  records = read_metrics(tmp_path / "run" / "metrics.jsonl")
  n = c.data.batch * c.grpo.group_size
  assert all(r["reward/test_boom_failures"] == n for r in records)
  assert all(r["reward/test_boom"] == -0.5 for r in records)


# --------------------------------------------------------------------- dynamic sampling (DAPO)


def _part(ctx, s, t, rewards, tag):
  """One fake rollout of B groups with prompt width s; every token id is `tag`."""
  from types import SimpleNamespace
  import jax.numpy as jnp
  from r1jax import rl
  from r1jax.train_step import RolloutBatch
  n = len(rewards)
  batch = RolloutBatch(jnp.full((n, s + t), tag, jnp.int32), jnp.ones((n, s + t), bool),
                       jnp.ones((n, t), bool), jnp.zeros((n, t)), jnp.zeros(n),
                       jnp.zeros(n, bool))
  r = np.asarray(rewards, np.float32)
  rw = SimpleNamespace(total_B=r, components={"acc": r, "fmt": 1 - r})
  return (None, batch, None, [f"{tag}-{i}" for i in range(n)], rw), rl._informative(ctx, rw)


def test_dynamic_sampling_keeps_informative_groups_across_prompt_widths():
  from types import SimpleNamespace
  from r1jax import losses, rl
  from r1jax.config import GRPOConfig
  ctx = SimpleNamespace(grpo=GRPOConfig(group_size=2), dynamic_sampling=True,
                        config=SimpleNamespace(data=SimpleNamespace(batch=3)))
  first = _part(ctx, 4, 3, [1, 0, 1, 1, 0, 0], 7)  # only group 0 varies
  second = _part(ctx, 8, 3, [0, 0, 1, 0, 0, 1], 9)  # groups 1 and 2 vary
  assert first[1].tolist() == [True, False, False]
  batch, texts, live = rl._assemble(ctx, [first, second])
  assert live == 3 and batch.tokens.shape == (6, 11)
  assert texts == ["7-0", "7-1", "9-2", "9-3", "9-4", "9-5"]
  tokens, mask = np.asarray(batch.tokens), np.asarray(batch.mask)
  assert not mask[:2, :4].any() and (tokens[:2, 4:] == 7).all()  # left-padded to width 11
  want = np.concatenate([np.asarray(losses.group_advantages([1, 0, 1, 1, 0, 0], 2))[:2],
                         np.asarray(losses.group_advantages([0, 0, 1, 0, 0, 1], 2))[2:]])
  np.testing.assert_allclose(np.asarray(batch.advantages), want)
  # Too few informative groups: the rest is filler without loss tokens.
  batch, _, live = rl._assemble(ctx, [first])
  assert live == 1
  assert np.asarray(batch.completion_mask)[2:].sum() == 0
  assert np.asarray(batch.completion_mask)[:2].all()


def test_beta_zero_never_creates_a_reference():
  from r1jax import sharding, train_step
  from r1jax.config import GRPOConfig, ModelConfig, OptConfig
  cfg = ModelConfig(vocab_size=32, hidden=16, layers=1, heads=2, kv_heads=1, head_dim=8,
                    mlp_dim=32)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tr = train_step.make_trainer(cfg, OptConfig(), mesh, GRPOConfig(beta=0.0, ref_reset_every=2))
  state = tr.init_state_random(jax.random.key(0))
  assert tr.maybe_reset_ref(None, state, 2) is None
  assert tr.maybe_reset_ref(tr.make_ref(state.params), state, 2) is not None


def test_per_component_advantages_judge_informativeness_per_component():
  from types import SimpleNamespace
  from r1jax import rl
  from r1jax.config import GRPOConfig
  rw = SimpleNamespace(total_B=np.ones(4, np.float32),
                       components={"acc": np.array([1, 0, 1, 1], np.float32),
                                   "fmt": np.array([0, 1, 0, 0], np.float32)})
  ctx = lambda norm: SimpleNamespace(grpo=GRPOConfig(group_size=2, reward_norm=norm))
  assert rl._informative(ctx("sum"), rw).tolist() == [False, False]
  assert rl._informative(ctx("per_component"), rw).tolist() == [True, False]
