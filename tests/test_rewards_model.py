"""Reward models: Bradley–Terry loss vs float64, last-token scoring, training, sharding, RL use."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax import checkpoint, model, sharding
from r1jax.config import ModelConfig
from r1jax.rewards import compose, registry
from r1jax.rewards import model as rm
from r1jax.tokenizer import Tokenizer

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
  h, _ = model.hidden_states(params["backbone"], seq[None], CFG)
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
  trainer = rm.RMTrainer(CFG, optax.adamw(3e-3), mesh)
  state = trainer.init(jax.random.key(0))
  rows = preference_rows(512, 0)
  history = []
  for i in range(60):
    batch = rm.encode_pairs(tok, rows[(i * 16) % 512:(i * 16) % 512 + 16], "plain", 48)
    state, metrics = trainer.step(state, batch)
    history.append(float(metrics["rm/loss"]))
  return tok, trainer, state, history


def test_training_learns_preferences(trained):
  tok, trainer, state, history = trained
  assert np.mean(history[-10:]) < 0.5 * np.mean(history[:5])
  held_out = preference_rows(128, 99)
  batch = rm.encode_pairs(tok, held_out, "plain", 48)
  rc = rm.score(state.params, *batch["chosen"], CFG)
  rr = rm.score(state.params, *batch["rejected"], CFG)
  accuracy = float(jnp.mean(rc > rr))
  print(f"reward model held-out pairwise accuracy {accuracy:.3f}")
  assert accuracy > 0.9


def test_sharded_step_matches_single_device(trained):
  tok = trained[0]
  batch = rm.encode_pairs(tok, preference_rows(16, 5), "plain", 48)
  results = []
  for shape in [(1, 1, 1), (2, 2, 2)]:
    devices = jax.devices()[:1] if shape == (1, 1, 1) else None
    mesh = sharding.make_mesh(shape, devices=devices)
    # SGD: the update is linear in the gradient, so this compares gradients
    # (Adam's g/sqrt(v) amplifies last-ulp differences where g ~ 0).
    trainer = rm.RMTrainer(CFG, optax.sgd(0.5), mesh)
    state = trainer.init(jax.random.key(3))
    for _ in range(2):
      state, metrics = trainer.step(state, batch)
    results.append((jax.tree.map(np.asarray, state.params), float(metrics["rm/loss"])))
  (single, loss1), (sharded, loss8) = results
  assert loss1 == pytest.approx(loss8, abs=1e-6)
  moved = sum(np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(single), jax.tree.leaves(rm.init_rm(CFG, jax.random.key(3)))))
  assert moved > 1e-3  # the steps really changed the params
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_save_load_and_use_in_reward_scorer(trained, tmp_path):
  tok, _, state, _ = trained
  rm.save_rm(tmp_path / "rm", state.params, CFG)
  cfg, params = rm.load_rm(tmp_path / "rm", mesh=sharding.make_mesh((2, 2, 2)))
  assert cfg == CFG
  assert params["head"]["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
  scorer_rm = rm.RewardModel(params, cfg, tok, template="plain", max_len=48, batch_size=4)
  scorer_rm.register("helpfulness_test", view="summary", overwrite=True)
  spec = dict(task_field="task", default_task="general", components=[
      dict(name="helpfulness_test", tasks=["general"], fields={"prompt": "question"})])
  samples = [
      {"question": "plan a trip", "completion": "<think>go away</think> thank you, here it is"},
      {"question": "plan a trip", "completion": "<think>thank you</think> go away"},
      {"question": "bake", "completion": "<think>hmm</think> sure, glad to assist"},
  ]
  with compose.RewardScorer(spec) as scorer:
    out = scorer.score(samples)
  r = out.total_B
  assert not out.failed["helpfulness_test"].any()
  # The summary after </think> is judged, not the reasoning.
  assert r[0] > r[1] and r[2] > r[1]


def test_bad_input(tmp_path):
  path = tmp_path / "pairs.jsonl"
  good = preference_rows(3, 1)
  path.write_text("\n".join([json.dumps(good[0]), "{not json", json.dumps({"prompt": "x"}),
                             json.dumps(good[1]), json.dumps({**good[2], "chosen": 5})]))
  rows = rm.load_pairs(path)
  assert rows == good[:2]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    rm.load_pairs(tmp_path / "missing.jsonl")
  (tmp_path / "bad.jsonl").write_text("{}\n[1]\n")
  with pytest.raises(ValueError, match="no usable preference rows"):
    rm.load_pairs(tmp_path / "bad.jsonl")
  # A policy checkpoint is not a reward model.
  checkpoint.save_params(tmp_path / "policy", model.init_params(CFG, jax.random.key(0)), CFG)
  with pytest.raises(ValueError, match="not a reward model"):
    rm.load_rm(tmp_path / "policy")
  with pytest.raises(ValueError, match="2 responses but 1 prompts"):
    rm.RewardModel(rm.init_rm(CFG, jax.random.key(0)), CFG, CharTokenizer())(["a", "b"], ["p"])


def test_reward_model_stage_end_to_end(tmp_path):
  import os
  import subprocess
  import sys
  from pathlib import Path
  from r1jax.tokenizer import train_sentencepiece
  repo = Path(__file__).resolve().parents[1]
  train, held_out = preference_rows(480, 7), preference_rows(64, 8)
  for name, rows in (("train", train), ("eval", held_out)):
    (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  spm = train_sentencepiece([r[k] for r in train for k in ("prompt", "chosen", "rejected")],
                            tmp_path / "spm", 400)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "r1jax.main", "--config=experiments/reward_model.py",
       f"--workdir={tmp_path / 'w'}", f"--config.tokenizer={spm}",
       f"--config.data.train={tmp_path / 'train.jsonl'}",
       f"--config.data.eval={tmp_path / 'eval.jsonl'}", "--config.mesh.shape=(2,4,1)"],
      cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["rm/eval_accuracy"] > 0.9, summary
  lines = (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 6 and json.loads(lines[-1])["step"] == 60
  cfg, _ = rm.load_rm(summary["checkpoint"])
  assert cfg.hidden == 128
  with pytest.raises(ValueError, match="holds a reward_model checkpoint, not policy params"):
    checkpoint.load_params(summary["checkpoint"])
