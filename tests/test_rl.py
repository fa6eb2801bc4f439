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
