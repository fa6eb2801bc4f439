"""Train step: sharded == single device, exact micro-batching, skips, reference, bandit, SFT."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from r1jax.core import attention, model, sharding
from r1jax.core.config import GRPOConfig, ModelConfig, OptConfig, grpo_config, grpo_group
from r1jax.train import advantages, losses
from r1jax.train import batches as batches_lib
from r1jax.train import trainer as ts
from r1jax.train.batches import RolloutBatch, SFTBatch
from r1jax.train.logprobs import LogProbs
from r1jax.train.state import init_state, lr_schedule, make_optimizer, schedule_inputs
from r1jax.train.update import UpdateStep

CFG = ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                  mlp_dim=64, qkv_bias=True, tie_embeddings=False)
GRPO = GRPOConfig(group_size=4, loss_mode="bnpo", eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                  beta=0.04, mu=2, minibatches=2, microbatches=2, mask_truncated=True,
                  logits_chunk=4)
OPT = OptConfig(lr=1e-3, warmup_steps=2, weight_decay=0.01, grad_clip=1.0)
MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2)]
N, S, T = 32, 6, 10


def single_device_trainer(grpo=GRPO, **kw):
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  return ts.Trainer(CFG, OPT, mesh, grpo, **kw)


def guarded_rl_step(tr, state, placed_batch, ref=None):
  """rl_step on a batch and reference already on the mesh, with every transfer disallowed.

  Proves the jitted step moves nothing hidden: no host round trip, no resharding.
  """
  with jax.transfer_guard("disallow"):
    return tr.rl_step(state, placed_batch, ref)


_LOGP: dict[int, tuple] = {}


def logp_of(tr) -> LogProbs:
  """The trainer's reference and log-prob utilities (one per trainer: compiled once)."""
  if id(tr) not in _LOGP:
    _LOGP[id(tr)] = (tr, LogProbs(tr.cfg, tr.grpo, tr.mesh))
  return _LOGP[id(tr)][1]


def completion_logp(tr, params, b: RolloutBatch) -> np.ndarray:
  """(N, T) logp of a padded batch's completions, by the reference's path (`of_batch`: the
  samples packed, then put back in place)."""
  return logp_of(tr).of_batch(params, b).get()


def host(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def rollout(rng, logp_fn=None, n=N, noise=0.3):
  """A random rollout: left-padded prompts, right-padded completions, varied lengths."""
  tokens = rng.integers(2, CFG.vocab_size, (n, S + T)).astype(np.int32)
  mask = np.ones((n, S + T), bool)
  mask[:, :S] = np.arange(S)[None] >= rng.integers(0, 3, n)[:, None]
  lens = rng.integers(1, T + 1, n)
  lens[:3] = T
  cmask = np.arange(T)[None] < lens[:, None]
  mask[:, S:] = cmask
  tokens[~mask] = 0
  adv = np.asarray(advantages.group_advantages(rng.random(n), GRPO.group_size))
  old = rng.normal(-4.0, 1.0, (n, T)).astype(np.float32)
  batch = RolloutBatch(tokens, mask, cmask, old, adv, truncated=lens == T)
  if logp_fn is not None:  # sampler-like old logprobs: the policy's, plus noise
    old = np.asarray(logp_fn(batch)) + noise * rng.normal(size=(n, T)).astype(np.float32)
    batch = dataclasses.replace(batch, old_logp=np.where(cmask, old, 0.0).astype(np.float32))
  return batch


@pytest.fixture(scope="module")
def reference():
  """One rl_step on one device: the result every sharded layout must reproduce."""
  tr = single_device_trainer()
  params = model.init_params(CFG, jax.random.key(0))
  ref = jax.tree.map(lambda x: x + 0.01 * jnp.sin(x * 100.0), params)  # a nearby reference
  batch = rollout(np.random.default_rng(0),
                  lambda b: completion_logp(tr, params, b), noise=0.3)
  state = tr.init_state(jax.tree.map(jnp.copy, params))
  new, metrics = guarded_rl_step(tr, state, tr.put_batch(batch), logp_of(tr).make_ref(ref))
  return dict(trainer=tr, params=host(params), ref=host(ref), batch=batch, new=host(new),
              metrics=host(metrics))


@pytest.mark.slow
def test_state_is_initialised_sharded_and_owns_its_params():
  mesh = sharding.make_mesh((1, 4, 2))
  tr = ts.Trainer(CFG, OPT, mesh, GRPO)
  state = tr.init_state_random(jax.random.key(0))
  q = state.params["layers"]["q"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  adam = state.opt_state[1]
  assert adam.mu["layers"]["q"].sharding.spec == q.sharding.spec
  assert adam.nu["lm_head"].sharding.spec == state.params["lm_head"].sharding.spec
  assert int(state.step) == 0
  params = jax.device_put(model.init_params(CFG, jax.random.key(0)), tr.param_shardings)
  state = tr.init_state(params)  # donated: the state owns the buffers now
  assert params["embed"].is_deleted()
  np.testing.assert_allclose(state.params["embed"], model.init_params(
      CFG, jax.random.key(0))["embed"])


@pytest.mark.slow
def test_metrics_are_per_update_and_informative(reference):
  m = reference["metrics"]
  updates = GRPO.mu * GRPO.minibatches
  assert all(v.shape == (updates,) for v in m.values())
  assert set(m) >= {"loss", "surrogate", "kl", "clip_frac_low", "clip_frac_high",
                    "clip_frac_dual", "entropy", "ratio_mean", "ratio_min", "ratio_max",
                    "approx_kl_old", "grad_norm", "lr", "skipped", "tokens"}
  assert np.all(m["skipped"] == 0) and np.all(m["grad_norm"] > 0)
  assert np.all(m["clip_frac_low"] > 0) and np.all(m["kl"] > 0)
  np.testing.assert_allclose(m["lr"], [5e-4, 1e-3, 1e-3, 1e-3])  # warmup over 2 updates
  b = reference["batch"]
  eff = b.completion_mask & ~b.truncated[:, None]  # mask_truncated drops full-length rows
  assert m["tokens"].sum() == GRPO.mu * eff.sum()
  assert int(reference["new"].step) == updates


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_step_matches_single_device(reference, shape):
  tr = ts.Trainer(CFG, OPT, sharding.make_mesh(shape), GRPO)
  state = tr.init_state(jax.tree.map(jnp.asarray, reference["params"]))
  new, metrics = guarded_rl_step(tr, state, tr.put_batch(reference["batch"]),
                                 logp_of(tr).make_ref(
                                     jax.device_put(reference["ref"], tr.param_shardings)))
  assert new.params["layers"]["gate"].sharding.mesh.shape == dict(zip(sharding.MESH_AXES, shape))
  diff = max_diff(new.params, reference["new"].params)
  moved = max_diff(reference["new"].params, reference["params"])
  print(f"mesh {shape}: max |params - single device| = {diff:.2e} (update size {moved:.2e})")
  assert diff <= 1e-5
  assert max_diff(new.opt_state, reference["new"].opt_state) <= 1e-5
  for k, v in metrics.items():
    np.testing.assert_allclose(v, reference["metrics"][k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_microbatching_is_exact(reference):
  """K = 1 and K = 2 accumulate the same mini-batch gradient."""
  tr = single_device_trainer(dataclasses.replace(GRPO, microbatches=1))
  # Same rows per mini-batch as the K = 2 split: row r is in mini-batch (r // 2) mod 2.
  b = reference["batch"]
  order = np.argsort([(r // 2) % 2 for r in range(N)], kind="stable")
  mb_of = lambda rows: [(r // 2) % 2 for r in rows]
  assert mb_of(order[:16]) == [0] * 16
  # With K = 1 row r is in mini-batch r mod 2: place each row accordingly.
  perm = np.empty(N, int)
  perm[0::2], perm[1::2] = order[:16], order[16:]
  permuted = jax.tree.map(lambda x: x[perm], b)
  state = tr.init_state(jax.tree.map(jnp.asarray, reference["params"]))
  new, metrics = guarded_rl_step(tr, state, tr.put_batch(permuted),
                                 logp_of(tr).make_ref(reference["ref"]))
  diff = max_diff(new.params, reference["new"].params)
  print(f"K=1 vs K=2: max |params diff| = {diff:.2e}")
  assert diff <= 1e-5
  np.testing.assert_allclose(metrics["loss"], reference["metrics"]["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], reference["metrics"]["grad_norm"], rtol=1e-5)


def reinforce_grad_norm(params, b, rows, w_NxT) -> float:
  """‖∇ −Σ w·A·logp‖ over `rows` of batch `b`: REINFORCE with per-token weights."""
  def loss(p):
    lsm = jax.nn.log_softmax(model.forward(p, b.tokens[rows], CFG, mask_BxT=b.mask[rows])
                             [:, S - 1:-1], -1)
    logp = jnp.take_along_axis(lsm, b.tokens[rows, S:, None], -1)[..., 0]
    return -jnp.sum(w_NxT * b.advantages[rows, None] * logp)

  return float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(
      jax.jit(jax.grad(loss))(params)))))


@pytest.mark.slow
def test_first_update_gradient_is_reinforce(reference):
  """μ = 1 semantics: old = the policy's logp, ref = policy ⇒ ∇ = REINFORCE with baseline."""
  tr, params = reference["trainer"], reference["params"]
  b = reference["batch"]
  b = dataclasses.replace(b, old_logp=np.asarray(completion_logp(tr, params, b)))
  state = tr.init_state(jax.tree.map(jnp.asarray, params))
  ref = logp_of(tr).make_ref(jax.tree.map(jnp.asarray, params))
  _, metrics = guarded_rl_step(tr, state, tr.put_batch(b), ref)
  rows = np.array([r for r in range(N) if (r // 2) % 2 == 0])  # mini-batch 0 (M = 2, K = 2)
  eff = (b.completion_mask & ~b.truncated[:, None])[rows]
  want = reinforce_grad_norm(params, b, rows, eff / eff.sum())  # bnpo
  got = float(metrics["grad_norm"][0])
  print(f"first-update grad norm {got:.6e} vs REINFORCE {want:.6e}: "
        f"rel {abs(got - want) / want:.2e}")
  assert abs(got - want) <= 1e-5 * want
  assert abs(metrics["ratio_mean"][0] - 1) < 1e-5 and metrics["approx_kl_old"][0] < 1e-9
  assert metrics["surrogate"][0] != 0 and metrics["kl"][0] < 1e-9


@pytest.mark.slow
def test_recomputed_old_logprobs_ignore_the_samplers(reference):
  """recompute_old_logp: old = the pre-update policy, for every pass (not re-taken per pass)."""
  grpo = dataclasses.replace(GRPO, recompute_old_logp=True, beta=0.0, minibatches=1,
                             microbatches=1)
  tr = single_device_trainer(grpo)
  b = dataclasses.replace(reference["batch"], old_logp=np.full((N, T), -50.0, np.float32))
  state = tr.init_state(jax.tree.map(jnp.asarray, reference["params"]))
  _, metrics = guarded_rl_step(tr, state, tr.put_batch(b))
  assert abs(metrics["ratio_mean"][0] - 1) < 1e-5 and metrics["ratio_max"][0] < 1 + 1e-5
  assert abs(metrics["ratio_mean"][1] - 1) > 1e-4  # pass 2 sees the first update


@pytest.mark.slow
@pytest.mark.parametrize("mu_m", [(1, 1), (2, 2)])
def test_decoupled_first_update_is_is_weighted_reinforce(reference, mu_m):
  """overlap / recompute: ratio 1 against the starting policy (its own detached logp when
  μ·M = 1, a forward pass otherwise), and the gradient is REINFORCE with each token weighted
  by min(π / π_sampler, tis_cap), the sampler being a step behind (here: heavy noise)."""
  mu, m = mu_m
  grpo = dataclasses.replace(GRPO, overlap="rewards", tis_cap=2.0, mu=mu, minibatches=m)
  tr, params = single_device_trainer(grpo), reference["params"]
  b = reference["batch"]
  policy = np.asarray(completion_logp(reference["trainer"], params, b))
  noise = np.random.default_rng(5).normal(0.0, 0.8, policy.shape).astype(np.float32)
  b = dataclasses.replace(b, old_logp=np.where(b.completion_mask, policy + noise, 0.0))
  state = tr.init_state(jax.tree.map(jnp.asarray, params))
  _, metrics = guarded_rl_step(tr, state, tr.put_batch(b),
                               logp_of(tr).make_ref(jax.tree.map(jnp.asarray, params)))
  rows = np.array([r for r in range(N) if m == 1 or (r // 2) % 2 == 0])  # first mini-batch
  eff = (b.completion_mask & ~b.truncated[:, None])[rows]
  w = np.minimum(np.exp(policy - b.old_logp), 2.0)[rows] * eff / eff.sum()  # bnpo
  assert (np.exp(policy - b.old_logp)[rows][eff] > 2).any()  # the cap is exercised
  want = reinforce_grad_norm(params, b, rows, w)
  assert abs(float(metrics["grad_norm"][0]) - want) <= 1e-5 * want
  assert abs(metrics["ratio_mean"][0] - 1) < 1e-5 and metrics["is_capped_frac"][0] > 0
  if mu * m > 1:
    assert abs(metrics["ratio_mean"][-1] - 1) > 1e-4  # later updates: against the start


def test_non_finite_update_is_skipped_and_counted(reference):
  tr, b = reference["trainer"], reference["batch"]
  before = reference["new"]
  state = jax.device_put(before, tr.state_shardings)
  bad = dataclasses.replace(b, advantages=np.full_like(b.advantages, np.nan))
  after, metrics = guarded_rl_step(tr, state, tr.put_batch(bad),
                                   logp_of(tr).make_ref(reference["ref"]))
  assert metrics["skipped"].tolist() == [1, 1, 1, 1]
  assert max_diff(after, before) == 0 and int(after.step) == int(before.step)
  # One poisoned row only spoils the updates of its mini-batch (row r → (r // 2) mod 2).
  eff = b.completion_mask & ~b.truncated[:, None]
  row = next(r for r in range(N) if (r // 2) % 2 == 0 and eff[r].any())
  adv = b.advantages.copy()
  adv[row] = np.inf
  after, metrics = guarded_rl_step(tr, after, tr.put_batch(dataclasses.replace(b, advantages=adv)),
                                   logp_of(tr).make_ref(reference["ref"]))
  assert metrics["skipped"].tolist() == [1, 0, 1, 0]
  assert int(after.step) == int(before.step) + 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(after)))


@pytest.mark.slow
def test_reference_survives_donation_and_resets(reference):
  tr, b = reference["trainer"], reference["batch"]
  state = tr.init_state(jax.tree.map(jnp.asarray, reference["params"]))
  ref = logp_of(tr).make_ref(state.params)
  packed = lambda batch: tr.put_batch(tr.pack(batch)[0])  # the loop's layout, as of_batch's
  s1, m1 = guarded_rl_step(tr, jax.tree.map(jnp.copy, state), packed(b), ref)
  assert not ref["embed"].is_deleted()  # a copy, not the donated policy buffers
  # Precomputed reference logprobs (the loop overlaps them with rewards): the same step.
  b2 = dataclasses.replace(b, ref_logp=np.asarray(completion_logp(tr, ref, b)))
  start = jax.tree.map(np.asarray, state.params)  # before s2's step donates it
  s2, m2 = guarded_rl_step(tr, state, packed(b2), None)
  # Two programs (the reference inside the update, or beforehand) round differently, and
  # AdamW's m/√v scales a gradient's last bits up where its terms nearly cancel: the
  # params agree to 0.5 % of the largest update (measured 0.16 %; under 0.03 % with XLA:CPU's
  # other fusion emitters). The reference's log-probs are checked through the KL: a KL of
  # 2e-5 (the second update's) is a difference of near-equal log-probs, exact to ~2e-9.
  moved = max_diff(s1.params, start)
  assert moved > 1e-3 and max_diff(s1.params, s2.params) <= 0.005 * moved
  assert np.asarray(m1["kl"]).max() > 1e-3
  np.testing.assert_allclose(m1["kl"], m2["kl"], rtol=1e-5, atol=1e-8)
  # A bf16 reference, replaced by the policy every 2 RL iterations.
  tr16 = single_device_trainer(dataclasses.replace(GRPO, ref_dtype="bfloat16",
                                                   ref_reset_every=2))
  lp16 = logp_of(tr16)
  ref16 = lp16.make_ref(s1.params)
  assert ref16["embed"].dtype == jnp.bfloat16
  assert lp16.reset_ref(ref16, s2.params, 1) is ref16
  new_ref = lp16.reset_ref(ref16, s2.params, 2)
  np.testing.assert_array_equal(new_ref["embed"], s2.params["embed"].astype(jnp.bfloat16))


def test_bad_batches_fail_clearly(reference):
  tr, b = reference["trainer"], reference["batch"]
  state = reference["new"]  # never reaches the device: the checks come first
  with pytest.raises(ValueError, match="old_logp has shape"):
    tr.put_batch(dataclasses.replace(b, old_logp=b.old_logp[:, 1:]))
  with pytest.raises(ValueError, match="30 samples do not split into 2 mini-batches"):
    tr.put_batch(jax.tree.map(lambda x: x[:30], b))
  with pytest.raises(TypeError, match="rl_step takes packed rows"):
    tr.rl_step(state, b, reference["ref"])
  rows = tr.put_batch(b)
  with pytest.raises(ValueError, match="needs ref_params"):
    tr.rl_step(state, rows, None)
  with pytest.raises(ValueError, match="from the batch or from ref_params, not both"):
    tr.rl_step(state, tr.put_batch(dataclasses.replace(b, ref_logp=b.old_logp)),
               reference["ref"])
  sft_only = ts.Trainer(CFG, OPT, tr.mesh)
  for use in (sft_only.put_batch, sft_only.pack):
    with pytest.raises(ValueError, match="needs a Trainer built with a GRPOConfig"):
      use(b)
  with pytest.raises(ValueError, match="unknown grpo field"):
    grpo_group(beta_kl=0.1)
  with pytest.raises(ValueError, match="grpo.loss_mode"):
    grpo_config(grpo_group(loss_mode="sum"))
  assert grpo_config(grpo_group(beta=0.0)).beta == 0.0


def test_lr_schedule():
  cos = lr_schedule(OptConfig(lr=1.0, schedule="cosine", warmup_steps=4, total_steps=14,
                                 final_lr_ratio=0.1))
  got = [float(cos(k)) for k in (0, 3, 4, 9, 14, 100)]
  np.testing.assert_allclose(got, [0.25, 1.0, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)
  assert float(lr_schedule(OptConfig(lr=2.0))(7)) == 2.0
  with pytest.raises(ValueError, match="total_steps"):
    OptConfig(schedule="cosine", warmup_steps=5, total_steps=5)


def _constant_schedule(o: OptConfig):
  """The schedule with o's numbers written in as Python constants: the reference the update's
  schedule inputs must equal bit for bit (restated, not imported)."""

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    lr = o.lr * (jnp.minimum(1.0, (s + 1) / o.warmup_steps) if o.warmup_steps else 1.0)
    if o.schedule == "cosine":
      frac = jnp.clip((s - o.warmup_steps) / (o.total_steps - o.warmup_steps), 0.0, 1.0)
      lr = lr * (o.final_lr_ratio + (1 - o.final_lr_ratio) * 0.5 * (1 + jnp.cos(np.pi * frac)))
    return lr

  return schedule


# XLA:CPU's default backend options, as runs compile (conftest.py's test flags compile at
# LLVM -O0, where the two programs' cosines can differ in the last bit)
RUN_OPTIONS = dict(xla_backend_optimization_level=3, xla_llvm_disable_expensive_passes=False,
                   xla_cpu_use_fusion_emitters=True)


def test_schedule_inputs_give_the_constants_lr_bit_for_bit():
  """The learning rate computed from traced schedule inputs, compiled, equals the one compiled
  from Python constants at every step (tiny_r1's SFT, RL and RM schedules among them), so a
  run's updates are the ones it made when the numbers were constants."""
  steps = jnp.arange(1300)
  run = lambda fn, *args: np.asarray(jax.jit(fn).lower(*args).compile(RUN_OPTIONS)(*args))
  for o in (OptConfig(lr=2e-3, schedule="cosine", warmup_steps=50, total_steps=1200),
            OptConfig(lr=5e-4, schedule="cosine", warmup_steps=20, total_steps=300),
            OptConfig(lr=2.5e-5, schedule="cosine", warmup_steps=5, total_steps=200),
            OptConfig(lr=5e-5, schedule="cosine", warmup_steps=0, total_steps=80,
                      final_lr_ratio=0.3),
            OptConfig(lr=3e-3, warmup_steps=7), OptConfig(lr=1e-4)):
    want = run(jax.vmap(_constant_schedule(o)), steps)
    got = run(lambda h, k, o=o: jax.vmap(lr_schedule(o, h))(k), schedule_inputs(o), steps)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=str(o))


def test_updates_that_differ_only_in_the_schedule_are_one_program():
  """Two stages' trainers with other learning rates, warmups and lengths lower the same SFT
  update (so the persistent cache compiles it once); a changed Adam β does not."""
  mesh = sharding.make_mesh((2, 4, 1))
  batch = SFTBatch(np.zeros((8, 12), np.int32), np.ones((8, 12), bool), np.ones((8, 12), bool))

  def text(opt):
    tr = ts.Trainer(CFG, opt, mesh, GRPO)
    state = jax.eval_shape(tr.init_state_random, jax.random.key(0))
    placed = tr.put_batch(batch)
    return tr.sft_program(placed).lower(state, placed).as_text()

  a = OptConfig(lr=2e-3, schedule="cosine", warmup_steps=50, total_steps=1200)
  same = text(a)
  assert text(dataclasses.replace(a, lr=5e-4, warmup_steps=20, total_steps=120)) == same
  assert text(dataclasses.replace(a, b2=0.95)) != same


# --- toy bandit: reward 1 iff the first completion token is the target ---------

BANDIT = ModelConfig(vocab_size=16, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                     mlp_dim=64, tie_embeddings=False)
EOS, TARGET, BS, BT, PROMPTS, G = 1, 7, 4, 3, 4, 8


def make_sampler(cfg):
  """A minimal KV-free sampler: returns tokens, masks and the sampled tokens' logp."""

  @jax.jit
  def sample(params, prompt_NxS, pmask_NxS, key):
    n = prompt_NxS.shape[0]
    tokens = jnp.concatenate([prompt_NxS, jnp.zeros((n, BT), jnp.int32)], 1)
    mask = jnp.concatenate([pmask_NxS, jnp.zeros((n, BT), bool)], 1)
    alive, logps = jnp.ones((n,), bool), []
    for j in range(BT):
      logits = model.forward(params, tokens, cfg, mask_BxT=mask)[:, BS + j - 1]
      tok = jax.random.categorical(jax.random.fold_in(key, j), logits)
      logps.append(jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], 1)[:, 0])
      tokens = tokens.at[:, BS + j].set(jnp.where(alive, tok, 0))
      mask = mask.at[:, BS + j].set(alive)
      alive = alive & (tok != EOS)
    cmask = mask[:, BS:]
    return tokens, mask, cmask, jnp.where(cmask, jnp.stack(logps, 1), 0.0), alive

  return sample


@pytest.fixture(scope="module")
def bandit():
  grpo = GRPOConfig(group_size=G, beta=0.0, minibatches=2, microbatches=1, eps_low=0.2,
                    eps_high=0.28, logits_chunk=2)
  mesh = sharding.make_mesh((2, 2, 2))
  tr = ts.Trainer(BANDIT, OptConfig(lr=3e-3), mesh, grpo)
  return tr, make_sampler(BANDIT)


def train_bandit(tr, sample, steps, flip_sign=False, drop_first=False):
  rng = np.random.default_rng(0)
  state = tr.init_state_random(jax.random.key(0))
  curve = []
  for step in range(steps):
    prompt = np.repeat(rng.integers(2, BANDIT.vocab_size, (PROMPTS, BS)), G, 0).astype(np.int32)
    pmask = np.ones_like(prompt, bool)
    pmask[::3, 0] = False  # some left padding
    tokens, mask, cmask, old, truncated = sample(state.params, prompt, pmask,
                                                 jax.random.key(step))
    reward = (np.asarray(tokens)[:, BS] == TARGET).astype(np.float32)
    curve.append(float(reward.mean()))
    adv = np.asarray(advantages.group_advantages(reward, G)) * (-1 if flip_sign else 1)
    cmask = np.asarray(cmask)
    if drop_first:  # a deliberately wrong mask: the rewarded token is excluded
      cmask = cmask & (np.arange(BT) > 0)
    batch = RolloutBatch(np.asarray(tokens), np.asarray(mask), cmask, np.asarray(old), adv,
                            truncated=np.asarray(truncated))
    state, _ = guarded_rl_step(tr, state, tr.put_batch(batch))
  return curve


@pytest.mark.slow
def test_bandit_reward_rises_from_chance(bandit):
  steps = 40
  curve = train_bandit(*bandit, steps)
  print("bandit mean reward by step:", " ".join(f"{r:.2f}" for r in curve))
  assert np.mean(curve[:3]) < 0.2  # chance is 1/16
  assert np.mean(curve[-3:]) > 0.9
  # Controls: the same run with the sign or the mask wrong does not learn.
  flipped = train_bandit(*bandit, steps, flip_sign=True)
  unmasked = train_bandit(*bandit, steps, drop_first=True)
  print(f"controls, final mean reward: sign flipped {np.mean(flipped[-3:]):.2f}, "
        f"first token masked out {np.mean(unmasked[-3:]):.2f}")
  assert np.mean(flipped[-3:]) < 0.1 and np.mean(unmasked[-3:]) < 0.4


# --- SFT ----------------------------------------------------------------------


@pytest.mark.slow
def test_sft_step_sharded_matches_and_memorises():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (16, 12)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  mask[:, -3:] = np.arange(3)[None] < rng.integers(0, 4, 16)[:, None]  # right padding
  loss_mask = mask.copy()
  loss_mask[:, :4] = False  # the "prompt" is context only
  batch = SFTBatch(tokens, mask, loss_mask)
  params = model.init_params(CFG, jax.random.key(0))
  want_loss = float(losses.sft_loss(params, CFG, tokens, attention.plan(mask), loss_mask)[0])
  results = []
  for mesh in (sharding.make_mesh((1, 1, 1), jax.devices()[:1]), sharding.make_mesh((1, 4, 2))):
    # eps above float32 noise of a gradient summed in another order: Adam's first update is
    # g / (|g| + eps), which turns that noise on a near-zero g into an lr-sized difference.
    tr = ts.Trainer(CFG, OptConfig(lr=1e-2, eps=1e-6), mesh, sft=ts.SFTSettings(microbatches=2))
    state = tr.init_state(jax.tree.map(jnp.copy, params))
    state, metrics = tr.sft_step(state, tr.put_batch(batch))
    assert abs(float(metrics["loss"]) - want_loss) <= 1e-6 * want_loss
    results.append(host(state.params))
  assert max_diff(*results) <= 1e-5
  device_batch = tr.put_batch(batch)
  for _ in range(30):
    state, metrics = tr.sft_step(state, device_batch)
  print(f"SFT memorisation: loss {want_loss:.3f} -> {float(metrics['loss']):.3f}")
  assert float(metrics["loss"]) < 0.5 * want_loss


def test_reference_logprobs_of_packed_samples_equal_one_forward_per_row(reference):
  """The RL loop's reference forward (the samples packed, the result put back to (N, T))
  against the model's plain forward over each padded row, log-softmax at the temperature,
  in float64: every completion token within 1e-5, and 0 past each completion's end."""
  tr, b = reference["trainer"], reference["batch"]
  ref = logp_of(tr).make_ref(reference["ref"])
  got = completion_logp(tr, ref, b)
  logits = np.asarray(model.forward(ref, jnp.asarray(b.tokens), CFG,
                                    mask_BxT=jnp.asarray(b.mask)), np.float64)
  z = logits[:, S - 1:-1] / GRPO.temperature  # column j predicts completion token j
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  want = np.take_along_axis(logp, b.tokens[:, S:, None], -1)[..., 0]
  comp = np.asarray(b.completion_mask)
  assert got.shape == (N, T) and comp.any(axis=1).all() and not comp.all()
  np.testing.assert_allclose(got[comp], want[comp], rtol=0, atol=1e-5)
  assert (got[~comp] == 0).all()


def test_an_update_that_is_not_finite_is_skipped_however_it_arises():
  """A NaN learning rate: loss and gradient are finite, the update is not. It is skipped like
  a NaN loss (skipped = 1; weights, moments and step unchanged), so the weights never turn
  NaN and the loop's max_skipped_updates can stop the run."""
  for lr, skipped in ((float("nan"), 1), (0.1, 0)):
    o = OptConfig(lr=lr)
    state = init_state(make_optimizer(o), {"w": jnp.ones(3)})
    update = UpdateStep(o, {"w": SingleDeviceSharding(jax.devices()[0])})
    loss_fn = lambda p, mb: (jnp.sum((p["w"] * mb) ** 2), {})
    after, _, _, metrics = jax.jit(lambda s, m, h: update(s, m, loss_fn, h))(
        state, jnp.ones((1, 3)), schedule_inputs(o))
    assert int(metrics["skipped"]) == skipped and int(after.step) == 1 - skipped
    assert (max_diff(after, state) == 0) == bool(skipped)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(after)))


def test_bf16_params_train_with_f32_moments():
  """bf16 weights (as `model.param_dtype=bfloat16` gives): the moments are f32 from the start,
  so the μ × M scan carries the same types through every update, and the weights keep bf16."""
  cfg = dataclasses.replace(CFG, param_dtype="bfloat16")
  tr = ts.Trainer(cfg, OPT, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), GRPO)
  params = model.init_params(cfg, jax.random.key(0))
  ref = logp_of(tr).make_ref(params)
  state = tr.init_state(params)  # donated
  adam = state.opt_state[1]
  assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.float32)}
  batch = rollout(np.random.default_rng(0))
  new, metrics = tr.rl_step(state, tr.put_batch(batch), ref)
  assert {x.dtype for x in jax.tree.leaves(new.params)} == {jnp.dtype(jnp.bfloat16)}
  assert int(new.step) == GRPO.mu * GRPO.minibatches and not np.any(metrics["skipped"])


@pytest.mark.slow
def test_packed_sft_step_in_query_blocks_matches_one_piece():
  """Packed rows (two documents a row) in query blocks of 4, each block over the key window
  its documents can see: the same loss and update as attention in one piece."""
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, CFG.vocab_size, (16, 16)).astype(np.int32)
  cut = rng.integers(3, 13, 16)[:, None]
  col = np.arange(16)[None]
  segment_ids = np.where(col < cut, 1, 2).astype(np.int32)
  segment_ids[:4, -2:] = 0  # padding at the end of some rows
  mask = segment_ids > 0
  positions = np.where(col < cut, col, col - cut).astype(np.int32)
  batch = SFTBatch(tokens, mask, mask.copy(), positions, segment_ids)
  params = model.init_params(CFG, jax.random.key(0))
  mesh = sharding.make_mesh((1, 4, 2))
  results = []
  for block in (0, 4):
    tr = ts.Trainer(CFG.replace(attention_block=block), OptConfig(lr=1e-2, eps=1e-6), mesh,
                    sft=ts.SFTSettings(microbatches=2))
    state, metrics = tr.sft_step(tr.init_state(jax.tree.map(jnp.copy, params)),
                                 tr.put_batch(batch))
    results.append((float(metrics["loss"]), host(state.params)))
  assert abs(results[0][0] - results[1][0]) <= 1e-6 * results[0][0]
  assert max_diff(results[0][1], results[1][1]) <= 1e-5


def test_packed_rows_walk_per_device_only_when_the_scores_are_large(monkeypatch):
  """The update's plan: query blocks of `model.attention_block`; all of a device's packed
  rows in one step while one block's scores stay small, else one row per device a step."""
  mesh = sharding.make_mesh((1, 4, 2))
  seg = jnp.ones((8, 16), jnp.int32)
  rows = {"tokens": seg, "segment_ids": seg}
  plan = batches_lib.attention_plan(rows, mesh, CFG.replace(attention_block=4))
  assert (plan.block, plan.lanes) == (4, None)
  assert batches_lib.attention_plan(rows, mesh, CFG).block == 0  # 16 tokens: one piece
  # one block: 2 rows a device x 4 heads x 4 queries x 16 keys x 4 bytes, one byte too many
  monkeypatch.setattr(batches_lib, "ALL_ROWS_BYTES", 8 // 4 * CFG.heads * 4 * 16 * 4 - 1)
  plan = batches_lib.attention_plan(rows, mesh, CFG.replace(attention_block=4))
  assert plan.lanes == 4  # the 8 rows spread over the mesh's 4 data devices
  with pytest.raises(ValueError, match="attention_block"):
    CFG.replace(attention_block=-1)
