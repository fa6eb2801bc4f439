"""Reward models: Bradley–Terry vs float64, scoring, training, sharding, RL use, the stage."""

import json
import signal
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.core import checkpoint, model, sharding
from r1jax.core.config import ModelConfig, OptConfig
from r1jax.core.metrics import read_metrics
from r1jax.core.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from r1jax.data.preferences import encode_pairs, load_pairs
from r1jax.rewards import compose, registry
from r1jax.rewards import reward_model as rm
from r1jax.train.batches import PairBatch
from r1jax.train.reward_model import RMTrainer
from r1jax.train.state import TrainState

from r1jax.main import EXIT_PREEMPTED

import main_runs

def pair_batch(encoded) -> PairBatch:
  return PairBatch(*encoded["chosen"], *encoded["rejected"])


CFG = ModelConfig(vocab_size=128, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                  mlp_dim=64, tie_embeddings=True, max_position=256)


class CharTokenizer(Tokenizer):
  """Bytes -> ids 3.. (pad 0, eos 1): enough text handling for a tiny reward model."""

  bos_id, eos_id, pad_id = None, 1, 0

  @property
  def vocab_size(self):
    return CFG.vocab_size

  def encode(self, text, add_bos=False):
    return [3 + b % (CFG.vocab_size - 3) for b in text.encode()]

  def decode(self, ids):
    return "".join(chr(i - 3) for i in ids if i >= 3)

  def token_id(self, piece):
    return None


def preference_rows(n, seed):
  """Chosen answers are polite, rejected ones rude; the prompts are noise."""
  rng = np.random.default_rng(seed)
  words = ["sum", "plan", "trip", "code", "list", "poem", "math", "bake"]
  good = ["thank you, here it is", "happy to help: done", "sure, glad to assist"]
  bad = ["go away", "not my problem", "figure it out yourself"]
  return [{"prompt": " ".join(rng.choice(words, 3)), "chosen": str(rng.choice(good)),
           "rejected": str(rng.choice(bad))} for _ in range(n)]


def test_bradley_terry_matches_float64():
  rng = np.random.default_rng(0)
  rc, rr = rng.normal(0, 3, 64).astype(np.float32), rng.normal(0, 3, 64).astype(np.float32)
  m = rc.astype(np.float64) - rr.astype(np.float64)
  ref_loss = np.mean(np.log1p(np.exp(-m)))
  ref_grad_c = -1.0 / (1.0 + np.exp(m)) / len(m)  # d loss / d r_chosen
  (loss, metrics), (gc, gr) = jax.value_and_grad(rm.bradley_terry, argnums=(0, 1),
                                                 has_aux=True)(rc, rr)
  assert abs(float(loss) - ref_loss) <= 1e-6 * abs(ref_loss)
  np.testing.assert_allclose(np.asarray(gc), ref_grad_c, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(np.asarray(gr), -ref_grad_c, rtol=1e-5, atol=1e-9)
  assert float(metrics["rm/accuracy"]) == pytest.approx(np.mean(m > 0))
  # Stable far from zero, where log(1 + exp(-m)) would overflow naively.
  assert np.isfinite(float(rm.bradley_terry(jnp.array([-200.0]), jnp.array([200.0]))[0]))


@pytest.mark.slow
def test_score_reads_last_real_token():
  params = rm.init_rm(CFG, jax.random.key(0))
  params["head"] = {"w": jax.random.normal(jax.random.key(1), (CFG.hidden,)), "b": jnp.array(0.5)}
  seq = np.array([5, 9, 22, 7, 40], np.int32)
  right = np.zeros((2, 8), np.int32)
  right_mask = np.zeros((2, 8), bool)
  right[0, :5], right_mask[0, :5] = seq, True
  right[1, :3], right_mask[1, :3] = seq[:3], True
  left = np.zeros((1, 8), np.int32)
  left[0, 3:] = seq
  left_mask = left != 0
  h = model.hidden_states(params["backbone"], seq[None], CFG)
  expected = float(h[0, -1] @ params["head"]["w"] + 0.5)
  r_right = np.asarray(rm.score(params, right, right_mask, CFG))
  r_left = np.asarray(rm.score(params, left, left_mask, CFG))
  assert r_right[0] == pytest.approx(expected, abs=1e-5)
  assert r_left[0] == pytest.approx(expected, abs=1e-5)
  assert abs(r_right[1] - expected) > 1e-3  # a shorter sequence reads another position


@pytest.fixture(scope="module")
def trained():
  tok = CharTokenizer()
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  trainer = RMTrainer(CFG, OptConfig(lr=3e-3, grad_clip=0.0), mesh)
  state = trainer.init(jax.random.key(0))
  rows = preference_rows(512, 0)
  history = []
  for i in range(60):
    batch = pair_batch(encode_pairs(tok, rows[(i * 16) % 512:(i * 16) % 512 + 16], "plain", 48))
    state, metrics = trainer.step(state, trainer.put_batch(batch))
    history.append(float(metrics["rm/loss"]))
  return tok, trainer, state, history


@pytest.mark.slow
def test_training_learns_preferences(trained):
  tok, trainer, state, history = trained
  assert np.mean(history[-10:]) < 0.5 * np.mean(history[:5])
  assert int(state.step) == 60
  # The loss sees score differences only: the head's bias is held at its init, not moved
  # by Adam's scaled-up rounding noise (without the hold: -0.0086 after these 60 steps).
  assert float(state.params["head"]["b"]) == 0.0
  held_out = preference_rows(128, 99)
  batch = encode_pairs(tok, held_out, "plain", 48)
  rc = rm.score(state.params, *batch["chosen"], CFG)
  rr = rm.score(state.params, *batch["rejected"], CFG)
  accuracy = float(jnp.mean(rc > rr))
  print(f"reward model held-out pairwise accuracy {accuracy:.3f}")
  assert accuracy > 0.9
  rc_all, rr_all = trainer.all_pair_scores(state.params, tok, held_out, "plain", 48, 16)
  assert float(np.mean(rc_all > rr_all)) == accuracy


# Adam with a large epsilon is linear in small gradients: comparing params then compares
# gradients (g / sqrt(v) would amplify last-ulp differences where g ~ 0).
LINEAR_OPT = OptConfig(lr=0.5, eps=10.0, grad_clip=0.0)


def _two_steps(shape, microbatches, batch):
  devices = jax.devices()[:1] if shape == (1, 1, 1) else None
  trainer = RMTrainer(CFG, LINEAR_OPT, sharding.make_mesh(shape, devices=devices), microbatches)
  state = trainer.init(jax.random.key(3))
  for _ in range(2):
    state, metrics = trainer.step(state, trainer.put_batch(batch))
  return jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()}


@pytest.mark.slow
def test_sharded_and_accumulated_steps_match_single_device(trained):
  batch = pair_batch(encode_pairs(trained[0], preference_rows(16, 5), "plain", 48))
  single, m1 = _two_steps((1, 1, 1), 1, batch)
  moved = sum(np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(single), jax.tree.leaves(rm.init_rm(CFG, jax.random.key(3)))))
  assert moved > 1e-3  # the steps really changed the params
  for shape, micro in (((2, 2, 2), 1), ((1, 1, 1), 2), ((2, 2, 2), 2)):
    other, m = _two_steps(shape, micro, batch)
    assert m["rm/loss"] == pytest.approx(m1["rm/loss"], abs=1e-6), (shape, micro)
    assert m["rm/accuracy"] == m1["rm/accuracy"]
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(other)):
      np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{shape} x{micro}")


@pytest.mark.slow
def test_non_finite_update_is_skipped_and_not_counted(trained):
  tok, trainer, state, _ = trained
  before = jax.tree.map(np.asarray, state)
  state = jax.device_put(before, trainer.state_shardings)
  batch = pair_batch(encode_pairs(tok, preference_rows(16, 6), "plain", 48))
  poisoned = jax.tree.map(jnp.copy, state)
  poisoned = TrainState({**poisoned.params, "head": {**poisoned.params["head"],
                                                     "b": jnp.asarray(np.nan, jnp.float32)}},
                        poisoned.opt_state, poisoned.step)
  after, metrics = trainer.step(poisoned, trainer.put_batch(batch))
  assert int(metrics["skipped"]) == 1 and int(after.step) == int(before.step)
  after, metrics = trainer.step(state, trainer.put_batch(batch))
  assert int(metrics["skipped"]) == 0 and int(after.step) == int(before.step) + 1


def test_save_load_and_use_in_reward_scorer(trained, tmp_path):
  tok, _, state, _ = trained
  rm.save_rm(tmp_path / "rm", state.params, CFG)
  cfg, params = rm.load_rm(tmp_path / "rm", mesh=sharding.make_mesh((2, 2, 2)))
  assert cfg == CFG
  assert params["head"]["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
  scorer_rm = rm.RewardModel(params, cfg, tok, template="plain", max_len=48, batch_size=4)
  registry.register("helpfulness_test", scorer_rm, inputs=("prompt",), kind="device",
                    view="summary", overwrite=True)
  spec = dict(task_field="task", default_task="general", components=[
      dict(name="helpfulness_test", tasks=["general"], fields={"prompt": "question"})])
  samples = [
      {"question": "plan a trip", "completion": "<think>go away</think> thank you, here it is"},
      {"question": "plan a trip", "completion": "<think>thank you</think> go away"},
      {"question": "bake", "completion": "<think>hmm</think> sure, glad to assist"},
  ]
  with compose.RewardScorer(spec) as scorer:
    out = scorer.score(samples)
  r = out.total_N
  assert not out.failed["helpfulness_test"].any()
  # The summary after </think> is judged, not the reasoning.
  assert r[0] > r[1] and r[2] > r[1]


def test_bad_input(tmp_path):
  path = tmp_path / "pairs.jsonl"
  good = preference_rows(3, 1)
  path.write_text("\n".join([json.dumps(good[0]), "{not json", json.dumps({"prompt": "x"}),
                             json.dumps(good[1]), json.dumps({**good[2], "chosen": 5})]))
  rows = load_pairs(path)
  assert rows == good[:2]
  with pytest.raises(FileNotFoundError, match="no data file at .*missing.jsonl"):
    load_pairs(tmp_path / "missing.jsonl")
  (tmp_path / "bad.jsonl").write_text("{}\n[1]\n")
  with pytest.raises(ValueError, match="no usable preference rows"):
    load_pairs(tmp_path / "bad.jsonl")
  # A policy checkpoint is not a reward model.
  checkpoint.save_params(tmp_path / "policy", model.init_params(CFG, jax.random.key(0)), CFG)
  with pytest.raises(ValueError, match="not a reward model"):
    rm.load_rm(tmp_path / "policy")
  with pytest.raises(ValueError, match="2 responses but 1 prompts"):
    rm.RewardModel(rm.init_rm(CFG, jax.random.key(0)), CFG, CharTokenizer(), template="plain")(
        ["a", "b"], ["p"])
  with pytest.raises(ValueError, match="disagrees with the declared template"):
    rm.RewardModel(rm.init_rm(CFG, jax.random.key(0)), CFG, CharTokenizer(), template="chatml")


# ------------------------------------------------------------------------- the stage


def _start(world, workdir: Path, *overrides: str) -> subprocess.Popen:
  return main_runs.start(
      "--config=experiments/reward_model.py", f"--workdir={workdir}",
      f"--config.tokenizer={world / 'spm.model'}", f"--config.data.train={world / 'train.jsonl'}",
      f"--config.data.eval={world / 'eval.jsonl'}", "--config.mesh.shape=(2,4,1)",
      "--config.ckpt.every=4", *overrides)


def _rm_params(workdir: Path):
  return jax.tree.map(np.asarray, rm.load_rm(workdir / "reward_model")[1])


@pytest.fixture(scope="module")
def rm_world(tmp_path_factory):
  world = tmp_path_factory.mktemp("rm_world")
  train, held_out = preference_rows(480, 7), preference_rows(64, 8)
  for name, rows in (("train", train), ("eval", held_out)):
    (world / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  train_sentencepiece([r[k] for r in train for k in ("prompt", "chosen", "rejected")],
                      world / "spm", 400)
  return world


@pytest.fixture(scope="module")
def uninterrupted(rm_world, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("rm_full") / "w"
  out = main_runs.finish(_start(rm_world, workdir))
  return json.loads(out.strip().splitlines()[-1]), workdir


@pytest.mark.slow
def test_reward_model_stage_end_to_end(uninterrupted):
  summary, workdir = uninterrupted
  assert summary["rm/eval_accuracy"] > 0.9, summary
  assert summary["stage"] == "reward_model" and summary["step"] == 60
  records = read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, 61))  # every step, like other stages
  assert {"rm/loss", "rm/accuracy", "grad_norm", "lr", "skipped"} <= set(records[-1])
  assert [r["step"] for r in records if r.get("rm/eval_accuracy") is not None] == [30, 60]
  cfg, _ = rm.load_rm(summary["checkpoint"])
  assert cfg.hidden == 128
  with pytest.raises(ValueError, match="holds a reward_model checkpoint, not policy params"):
    checkpoint.load_params(summary["checkpoint"])
  # Best-metric checkpoints: the best eval step is kept beside the newest ones.
  kept = main_runs.saved_steps(workdir)
  assert 60 in kept and (30 in kept or kept[-2:] == [56, 60]), kept


@pytest.mark.slow
def test_stage_saves_its_validation_norm_and_a_spec_applies_it(rm_world, uninterrupted,
                                                               tmp_path):
  summary, workdir = uninterrupted
  facts = json.loads((workdir / "reward_model" / "norm.json").read_text())
  assert facts["pair_accuracy"] == summary["eval_pair_accuracy"] == summary["rm/eval_accuracy"]
  # Recomputed independently: the saved RM's raw scores on every held-out response.
  rows = load_pairs(rm_world / "eval.jsonl")
  tok = load_tokenizer(str(rm_world / "spm.model"))
  model_ = rm.RewardModel.load(workdir / "reward_model", tok, template="plain", max_len=64)
  raw = np.asarray(model_([r[k] for k in ("chosen", "rejected") for r in rows],  # scale 1, no
                          [r["prompt"] for _ in range(2) for r in rows]), np.float64)  # norm
  assert facts["responses"] == raw.size == 128
  np.testing.assert_allclose([facts["mean"], facts["std"]], [raw.mean(), raw.std()], rtol=1e-5,
                             atol=1e-5)
  assert facts["pair_accuracy"] == np.mean(raw[:64] > raw[64:])
  spec = {"name": "v", "path": str(workdir / "reward_model"),
          "tokenizer": str(rm_world / "spm.model"), "template": "plain", "max_len": 64,
          "norm": "validation"}
  loaded = rm.load_models([spec])["v"].fn
  assert (loaded.norm.mode, loaded.norm.mean, loaded.norm.std) == (
      "affine", facts["mean"], facts["std"])
  z = np.asarray(loaded([r[k] for k in ("chosen", "rejected") for r in rows],
                        [r["prompt"] for _ in range(2) for r in rows]))
  assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-4
  # An RM saved without held-out pairs has no norm.json: a clear error before any rollout.
  bare = tmp_path / "bare"
  cfg, params = rm.load_rm(workdir / "reward_model")
  rm.save_rm(bare, params, cfg)
  with pytest.raises(FileNotFoundError, match="norm.json does not exist.*data.eval"):
    rm.load_models([{**spec, "path": str(bare)}])
  with pytest.raises(ValueError, match="'none', 'running', 'validation'"):
    rm.load_models([{**spec, "norm": "zscore"}])
  with pytest.raises(ValueError, match=r"other settings.*'template': \('plain', 'chatml'\)"):
    rm.load_models([{**spec, "template": "chatml"}])


# The interruption tests: a few steps on each side of the kill, held-out evals on both sides.
SHORT = ("--config.steps=16", "--config.eval_every=8")


@pytest.fixture(scope="module")
def short_run(rm_world, tmp_path_factory):
  """The uninterrupted SHORT run that an interrupted and resumed one must equal bit for bit."""
  workdir = tmp_path_factory.mktemp("rm_short") / "w"
  main_runs.finish(_start(rm_world, workdir, *SHORT))
  return workdir


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_is_bit_exact(rm_world, short_run, tmp_path):
  """One run stopped twice: SIGTERM saves the step it stopped at and exits 75; the resumed
  run is killed (-9) after its next periodic checkpoint; the last run resumes from it and
  ends with the uninterrupted run's params, bit for bit."""
  workdir = tmp_path / "w"
  proc = _start(rm_world, workdir, *SHORT)
  main_runs.wait_for_checkpoint(proc, workdir, 4)
  proc.send_signal(signal.SIGTERM)
  main_runs.finish(proc, returncode=EXIT_PREEMPTED)  # saved, then "try again later"
  summary = json.loads((workdir / "summary.json").read_text())
  stopped = summary["step"]
  assert summary["preempted"] is True and stopped < 12
  assert main_runs.saved_steps(workdir)[-1] == stopped  # its last step was saved
  assert not (workdir / "reward_model").exists()
  proc = _start(rm_world, workdir, *SHORT)
  kill_at = (stopped // 4 + 1) * 4  # the resumed run's first periodic checkpoint (every 4)
  main_runs.kill_after_checkpoint(proc, workdir, kill_at)
  assert not (workdir / "reward_model").exists(), "the run finished before it was killed"
  main_runs.finish(_start(rm_world, workdir, *SHORT))
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed_from"] >= kill_at and summary["step"] == 16
  main_runs.assert_bit_exact(_rm_params(short_run), _rm_params(workdir))


def test_scores_in_the_loop_equal_the_stage_scoring(trained):
  """The RL loop (RewardScorer → device reward) and the reward_model stage score alike."""
  tok, trainer, state, _ = trained
  rows = preference_rows(24, 7)
  chosen, _ = trainer.all_pair_scores(state.params, tok, rows, "plain", 48, 16)
  np.testing.assert_allclose(  # the stage's scoring is the plain forward of encoded pairs
      chosen, rm.score(state.params, *encode_pairs(tok, rows, "plain", 48)["chosen"], CFG),
      atol=1e-5)
  model_ = rm.RewardModel(state.params, CFG, tok, template="plain", max_len=48, batch_size=16)
  registry.register("safety_test", model_, inputs=("prompt",), kind="device", view="full",
                    overwrite=True)
  spec = dict(default_task="general", components=[
      dict(name="safety_test", fields={"prompt": "question"})])
  samples = [{"question": r["prompt"], "completion": r["chosen"]} for r in rows]
  with compose.RewardScorer(spec) as scorer:
    out = scorer.score(samples)
  np.testing.assert_allclose(out.components["safety_test"], chosen, atol=1e-5)
  assert out.device_s > 0


def test_reward_norms():
  rng = np.random.default_rng(0)
  a, b = rng.normal(3, 2, 50), rng.normal(3, 2, 70)
  running = rm.RewardNorm("running")
  running(a)
  got = running(b)
  seen = np.concatenate([a, b])
  np.testing.assert_allclose(got, (b - seen.mean()) / seen.std(ddof=1), rtol=1e-9)
  fixed = rm.RewardNorm("affine", 3.0, 2.0)
  np.testing.assert_allclose(fixed(np.array([5.0, 1.0])), [1.0, -1.0])
  assert np.array_equal(rm.RewardNorm()(np.array([2.5])), [2.5])
  with pytest.raises(ValueError, match="std > 0"):
    rm.RewardNorm("affine", 0.0, 0.0)
  with pytest.raises(ValueError, match="none, affine or running"):
    rm.RewardNorm("zscore")
