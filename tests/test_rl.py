"""The RL loop: exact resume after SIGKILL, clean SIGTERM exit, and bad input handled."""

import dataclasses
import json
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from r1jax import stages
from r1jax.core import checkpoint, sharding
from r1jax.core.config import GRPOConfig, ModelConfig, OptConfig
from r1jax.core.metrics import read_metrics
from r1jax.generation.engine import Samples
from r1jax.generation.sampler import STOP_EOS
from r1jax.rewards import registry
from r1jax.stages import rl
from r1jax.train import advantages
from r1jax.train.logprobs import LogProbs, RefSource, ref_source
from r1jax.train.trainer import Trainer
from r1jax.main import EXIT_PREEMPTED

import main_runs
from tiny_world import make_world, rl_test_config
STEPS = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return make_world(tmp_path_factory.mktemp("world"))


def _start(config_path: Path, workdir: Path) -> subprocess.Popen:
  return main_runs.start(f"--config={config_path}", f"--workdir={workdir}")


def _final_params(workdir: Path):
  _, params = checkpoint.load_params(workdir / "final")
  return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
  root = tmp_path_factory.mktemp("full")
  config_path = main_runs.config_file(rl_test_config(world, steps=STEPS), root / "exp.py")
  main_runs.finish(_start(config_path, root / "run"))
  return config_path, _final_params(root / "run"), root / "run"


@pytest.mark.slow
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


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_is_bit_exact(uninterrupted, tmp_path):
  """One run stopped twice: SIGTERM saves the step it stopped at and exits 75; the resumed
  run is killed (-9, no chance to save) after its first new checkpoint; the last run
  resumes from that checkpoint and ends with the uninterrupted run's params, bit for bit."""
  config_path, want, _ = uninterrupted
  run = tmp_path / "run"
  proc = _start(config_path, run)
  main_runs.wait_for_checkpoint(proc, run, 1)
  proc.send_signal(signal.SIGTERM)
  main_runs.finish(proc, returncode=EXIT_PREEMPTED)  # saved, then "try again later"
  summary = json.loads((run / "summary.json").read_text())
  stopped = summary["step"]
  assert summary["preempted"] is True and stopped < STEPS - 1
  assert main_runs.saved_steps(run)[-1] == stopped  # the step it stopped at was checkpointed
  assert not (run / "final").exists()
  proc = _start(config_path, run)
  main_runs.kill_after_checkpoint(proc, run, stopped + 1)
  assert not (run / "final").exists(), "the run finished before it could be killed"
  out = main_runs.finish(_start(config_path, run))
  summary = json.loads((run / "summary.json").read_text())
  assert summary["resumed_from"] >= stopped + 1 and summary["step"] == STEPS, out[-2000:]
  main_runs.assert_bit_exact(want, _final_params(run))


# ------------------------------------------------------------------------------ bad input


@pytest.mark.slow
def test_malformed_rows_are_counted_and_the_run_continues(world, tmp_path):
  rows = Path(world["rl_train"]).read_text().splitlines()
  bad = tmp_path / "train.jsonl"
  bad.write_text("\n".join(rows[:20] + ["{not json", '{"question": "no answer"}', "[1, 2]"]
                           + rows[20:]) + "\n")
  c = rl_test_config(world, steps=1)
  c.data.train = str(bad)
  c.max_bad_share = 0.05  # 3 bad rows of 67 (4.5 %): under the share, skipped and counted
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


@pytest.mark.slow
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


def _scored(s, t, rewards, tag):
  """One fake scored rollout of B groups (G = 2) with prompt width s; every token is `tag`."""
  n, g = len(rewards), 2
  samples = Samples(np.full((n // g, s), tag, np.int32), np.ones((n // g, s), bool),
                    np.full((n, t), tag, np.int32), np.ones((n, t), bool),
                    np.zeros((n, t), np.float32), np.full(n, STOP_EOS, np.int32),
                    tuple(f"{tag}-{i}" for i in range(n)), g)
  r = np.asarray(rewards, np.float32)
  return rl.ScoredRollout([{}] * (n // g), samples, None, None,
                          advantages.group_advantages(r, g), advantages.informative_groups(r, g))


def test_dynamic_sampling_keeps_informative_groups_across_prompt_widths():
  run = SimpleNamespace(grpo=GRPOConfig(group_size=2),
                        config=SimpleNamespace(data=SimpleNamespace(batch=3)))
  first = _scored(4, 3, [1, 0, 1, 1, 0, 0], 7)  # only group 0 varies
  second = _scored(8, 3, [0, 0, 1, 0, 0, 1], 9)  # groups 1 and 2 vary
  assert first.keep.tolist() == [True, False, False]
  update = rl.assemble(run, [first, second])
  batch = update.batch
  assert update.live == 3 and batch.tokens.shape == (6, 11)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(batch))  # host until placed
  assert update.texts == ["7-0", "7-1", "9-2", "9-3", "9-4", "9-5"]
  assert not batch.mask[:2, :4].any() and (batch.tokens[:2, 4:] == 7).all()  # left-padded
  want = np.concatenate([advantages.group_advantages([1, 0, 1, 1, 0, 0], 2)[:2],
                         advantages.group_advantages([0, 0, 1, 0, 0, 1], 2)[2:]])
  np.testing.assert_allclose(batch.advantages, want)
  # Too few informative groups: the rest is filler without loss tokens.
  update = rl.assemble(run, [first])
  assert update.live == 1
  assert update.batch.completion_mask[2:].sum() == 0
  assert update.batch.completion_mask[:2].all()


@pytest.mark.slow
def test_beta_zero_never_creates_a_reference():
  cfg = ModelConfig(vocab_size=32, hidden=16, layers=1, heads=2, kv_heads=1, head_dim=8,
                    mlp_dim=32)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  grpo = GRPOConfig(beta=0.0, ref_reset_every=2)
  assert ref_source(grpo) is RefSource.NONE
  assert ref_source(dataclasses.replace(grpo, beta=0.1)) is RefSource.ROLLOUT
  assert ref_source(dataclasses.replace(grpo, beta=0.1, overlap="rewards")) is RefSource.UPDATE
  lp = LogProbs(cfg, grpo, mesh)
  state = Trainer(cfg, OptConfig(), mesh, grpo).init_state_random(jax.random.key(0))
  assert lp.reset_ref(None, state.params, 2) is None
  assert lp.reset_ref(lp.make_ref(state.params), state.params, 2) is not None


def test_per_component_advantages_judge_informativeness_per_component():
  rw = SimpleNamespace(total_N=np.ones(4, np.float32),
                       components={"acc": np.array([1, 0, 1, 1], np.float32),
                                   "fmt": np.array([0, 1, 0, 0], np.float32)})
  run = lambda norm, dynamic=True: SimpleNamespace(
      grpo=GRPOConfig(group_size=2, reward_norm=norm),
      config=SimpleNamespace(dynamic_sampling=dynamic))
  keep = lambda r: advantages.keep_groups(rw, r.grpo, r.config.dynamic_sampling, 2)
  assert keep(run("sum")).tolist() == [False, False]
  assert keep(run("per_component")).tolist() == [True, False]
  assert keep(run("sum", dynamic=False)).tolist() == [True, True]


def test_one_iteration_places_one_batch_and_moves_nothing_hidden(world, tmp_path):
  """Rewards, advantages and selection stay on the host; the update gets one placed batch."""
  run = rl.setup(rl_test_config(world, steps=1), tmp_path / "run")  # β > 0: the reference too
  placed, put, step = [], run.trainer.put_batch, run.trainer.rl_step

  def counting_put(batch):
    placed.append(batch)
    return put(batch)

  def guarded_step(*args):
    with jax.transfer_guard("disallow"):
      return step(*args)

  with run.loop, run.scorer:
    _, state, ref, _ = rl.initial_state(run)
    run.trainer.put_batch = counting_put
    run.trainer.rl_step = guarded_step
    state, ref, metrics, _ = rl.iteration(run, state, ref, 1)
  assert len(placed) == 1
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(placed[0]))
  assert placed[0].ref_logp is not None and placed[0].ref_logp.shape == placed[0].old_logp.shape
  assert metrics["skipped"] == 0 and int(state.step) == 4  # μ = 2 passes × 2 mini-batches


@pytest.mark.slow
def test_tight_rows_update_as_one_sequence_a_row_in_the_loop(world, tmp_path):
  """grpo.pack: the first iteration (same rollout: same params and key) updates alike with
  tight rows and one sequence a row, and logs its packing."""
  metrics = {}
  for pack in (False, True):
    c = rl_test_config(world, steps=1)
    c.unlock()
    c.grpo.pack = pack
    c.lock()
    run = rl.setup(c, tmp_path / f"run_{pack}")
    with run.loop, run.scorer:
      _, state, ref, _ = rl.initial_state(run)
      state, ref, metrics[pack], _ = rl.iteration(run, state, ref, 1)
  padded, packed = metrics[False], metrics[True]
  assert padded["response_length/mean"] == packed["response_length/mean"]  # same rollout
  for key in ("loss", "grad_norm", "kl", "entropy", "tokens"):
    np.testing.assert_allclose(packed[key], padded[key], rtol=1e-4, err_msg=key)
  # 8 devices hold the rows of each micro-batch here: packed rows round up to 8 per
  # micro-batch, so this toy batch cannot shrink (tests/test_packing.py measures the saving).
  assert 0 < packed["pack/padded_fill"] <= packed["pack/fill"] <= 1
  assert packed["pack/rows"] % 8 == 0
  assert packed["pack/compiled_shapes"] == 1 and "pack/rows" not in padded
  short = rl_test_config(world, steps=1)
  short.unlock()
  short.grpo.update(pack=True, pack_len=8)
  with pytest.raises(ValueError, match="pack_len=8 is shorter than the longest sample"):
    rl.validate(short)
