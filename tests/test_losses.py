"""Losses against a float64 numpy restatement: logprobs, advantages, every GRPO mode, SFT."""

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.train import losses, packing
from r1jax.core import attention, model
from r1jax.core.config import GRPOConfig, ModelConfig
from test_advantages import np_advantages
from jaxpr_shapes import output_shapes

CFG = ModelConfig(vocab_size=96, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                  mlp_dim=64, qkv_bias=True, tie_embeddings=False)
TOL = 1e-6  # relative, f32 JAX vs float64 numpy


def rel_err(got, want) -> float:
  """max |got − want| / max |want|: relative to the array's scale."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# --- float64 restatement -------------------------------------------------------


def np_grpo(logp, old, adv, mask, ref, cfg, prox=None):
  """(loss, dloss/dlogp, Σ|terms|) token by token, written case by case (no min / clip).

  With `prox` (decoupled): the ratio is against prox, and the objective is scaled by the
  sampler's importance weight exp(prox − old), truncated at cfg.tis_cap (if set)."""
  logp, old, adv = (np.asarray(x, np.float64) for x in (logp, old, adv))
  ref = None if ref is None else np.asarray(ref, np.float64)
  n, t = logp.shape
  lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
  ell, dell = np.zeros((n, t)), np.zeros((n, t))
  for i, j in itertools.product(range(n), range(t)):
    if not mask[i, j]:
      continue
    base = old[i, j] if prox is None else float(prox[i, j])
    a, rho = adv[i], np.exp(logp[i, j] - base)
    if lo <= rho <= hi or (rho > hi and a < 0) or (rho < lo and a > 0):
      obj, dobj = rho * a, rho * a  # the unclipped term is the minimum
    else:
      obj, dobj = (hi if rho > hi else lo) * a, 0.0
    if cfg.dual_clip and a < 0 and obj < cfg.dual_clip * a:
      obj, dobj = cfg.dual_clip * a, 0.0
    if prox is not None and cfg.tis_cap:
      w = np.exp(float(prox[i, j]) - old[i, j])
      w = cfg.tis_cap if w > cfg.tis_cap else w
      obj, dobj = w * obj, w * dobj
    ell[i, j], dell[i, j] = -obj, -dobj
    if ref is not None and cfg.beta:
      d = ref[i, j] - logp[i, j]
      ell[i, j] += cfg.beta * (np.exp(d) - d - 1)
      dell[i, j] += cfg.beta * (1 - np.exp(d))
  w = np_weights(mask, cfg.loss_mode)
  return float(np.sum(w * ell)), w * dell, float(np.sum(np.abs(w * ell)))


def np_weights(mask, mode):
  """Per-token weights of the loss sum for each aggregation mode."""
  n, t = mask.shape
  lens = mask.sum(1)
  if mode == "grpo":  # mean over the sequences that have tokens, of per-sequence means
    rows = [i for i in range(n) if lens[i]]
    return np.where(mask, 1.0 / np.maximum(lens, 1)[:, None], 0.0) / max(len(rows), 1)
  if mode == "bnpo":
    return mask / max(mask.sum(), 1)
  return mask / (n * t)


def grpo_loss(logp, old, adv_N, mask, cfg, ref=None, prox=None):
  """The one GRPO loss on one sequence a row: per-token advantages, and the token weights of
  train/packing.py (where `loss_mode` is read) over the whole batch as one mini-batch."""
  adv = jnp.broadcast_to(jnp.asarray(adv_N, jnp.float32)[:, None], mask.shape)
  weights = packing.token_weights(np.asarray(mask), cfg).astype(np.float32)
  return losses.grpo_loss(logp, old, adv, mask, weights, cfg, ref, prox)


def token_logprobs(params, cfg, tokens, mask, start, chunk=128):
  return losses.token_logprobs_and_entropy(params, cfg, tokens, attention.plan(mask), start, 1.0,
                                           chunk)[0]


def random_inputs(seed, n=16, t=11):
  rng = np.random.default_rng(seed)
  logp = np.minimum(rng.normal(-2.0, 1.0, (n, t)), -1e-3).astype(np.float32)
  # Ratios spread over all clip regions (and past the dual-clip bound 3).
  old = (logp - rng.normal(0.0, 0.6, (n, t))).astype(np.float32)
  ref = (logp + rng.normal(0.0, 0.3, (n, t))).astype(np.float32)
  adv = rng.normal(0.0, 1.0, n).astype(np.float32)
  lens = rng.integers(0, t + 1, n)
  lens[0] = 0  # one empty completion
  mask = np.arange(t)[None, :] < lens[:, None]
  mask &= rng.random((n, t)) > 0.1  # and some holes
  return logp, old, adv, mask, ref


CASES = [dict(loss_mode=m, dual_clip=d, beta=b, eps_high=h)
         for m in ("grpo", "bnpo", "dr_grpo") for d in (0.0, 3.0) for b in (0.0, 0.04)
         for h in (0.2, 0.28)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_loss_and_grad_match_float64(seed):
  logp, old, adv, mask, ref = random_inputs(seed)
  worst_loss = worst_grad = 0.0
  for case in CASES:
    cfg = GRPOConfig(eps_low=0.2, **case)
    fn = lambda lp, cfg=cfg: grpo_loss(lp, old, adv, mask, cfg, ref)[0]
    loss, grad = jax.value_and_grad(fn)(logp)
    want_loss, want_grad, scale = np_grpo(logp, old, adv, mask, ref, cfg)
    # Relative to the summed terms' magnitude: advantages of both signs can
    # cancel to a loss near 0, where no f32 sum has a small relative error.
    worst_loss = max(worst_loss, abs(float(loss) - want_loss) / scale)
    worst_grad = max(worst_grad, rel_err(grad, want_grad))
    assert np.all(np.asarray(grad)[~mask] == 0)
  print(f"seed {seed}: max rel err over {len(CASES)} configs: loss {worst_loss:.2e}, "
        f"dloss/dlogp {worst_grad:.2e}")
  assert worst_loss <= TOL and worst_grad <= TOL


@pytest.mark.parametrize("cap", [2.0, 0.0])
def test_decoupled_loss_and_grad_match_float64(cap):
  """Ratio against the starting policy, weighted by the sampler's truncated IS weight."""
  logp, old, adv, mask, ref = random_inputs(3)
  prox = (logp - np.random.default_rng(4).normal(0.0, 0.3, logp.shape)).astype(np.float32)
  w = np.exp(prox.astype(np.float64) - old)[mask]
  assert cap == 0 or (np.sum(w > cap) and np.sum(w < 1))  # both sides of the cap exercised
  for case in CASES[::3]:
    cfg = GRPOConfig(eps_low=0.2, tis_cap=cap, overlap="rewards", **case)
    fn = lambda lp, cfg=cfg: grpo_loss(lp, old, adv, mask, cfg, ref, prox)[0]
    loss, grad = jax.value_and_grad(fn)(logp)
    want_loss, want_grad, scale = np_grpo(logp, old, adv, mask, ref, cfg, prox)
    assert abs(float(loss) - want_loss) / scale <= TOL
    assert rel_err(grad, want_grad) <= TOL
  _, sums = grpo_loss(logp, old, adv, mask, cfg, ref, prox)
  assert sums["is_capped"] == (np.sum(w > cap) if cap else 0)
  want = np.minimum(w, cap).sum() if cap else mask.sum()  # cap 0: no weight
  np.testing.assert_allclose(sums["is_weight"], want, rtol=1e-5)


def test_clip_and_dual_clip_regions_are_exercised():
  """The random inputs above hit every branch, so the comparison covers them."""
  logp, old, adv, mask, _ = random_inputs(0)
  rho = np.exp(logp - old)[mask]
  a = np.broadcast_to(adv[:, None], mask.shape)[mask]
  assert np.sum((rho > 1.28) & (a > 0)) and np.sum((rho < 0.8) & (a < 0))
  assert np.sum((rho > 3.0) & (a < 0)) and np.sum((rho > 0.8) & (rho < 1.2))
  cfg = GRPOConfig(dual_clip=3.0, beta=0.0)
  _, sums = grpo_loss(logp, old, adv, mask, cfg)
  assert sums["clip_low"] > 0 and sums["clip_high"] > 0 and sums["clip_dual"] > 0
  assert sums["tokens"] == mask.sum()


@pytest.mark.parametrize("mode", ["grpo", "bnpo", "dr_grpo"])
def test_microbatch_losses_sum_to_the_batch_loss(mode):
  """With the mini-batch's token weights, any row partition sums to the full loss and grad."""
  logp, old, adv, mask, ref = random_inputs(2)
  cfg = GRPOConfig(loss_mode=mode, beta=0.04)
  full = jax.value_and_grad(lambda lp: grpo_loss(lp, old, adv, mask, cfg, ref)[0])
  loss, grad = full(logp)
  scale = np_grpo(logp, old, adv, mask, ref, cfg)[2]
  weights = packing.token_weights(mask, cfg).astype(np.float32)
  adv_NxT = np.broadcast_to(adv[:, None], mask.shape)
  parts = np.split(np.random.default_rng(0).permutation(len(logp)), 4)
  total, total_grad = 0.0, np.zeros_like(logp)
  for rows in parts:
    part = lambda lp: losses.grpo_loss(lp, old[rows], adv_NxT[rows], mask[rows],
                                       weights[rows], cfg, ref[rows])[0]
    l, g = jax.value_and_grad(part)(logp[rows])
    total += float(l)
    total_grad[rows] = g
  assert abs(total - float(loss)) <= 1e-6 * scale
  assert rel_err(total_grad, grad) <= 1e-6


@pytest.mark.parametrize("overlap", ["", "rewards"])
def test_garbage_at_masked_positions_never_leaks(overlap):
  logp, old, adv, mask, ref = random_inputs(3)
  cfg = GRPOConfig(beta=0.04, dual_clip=3.0, loss_mode="bnpo", overlap=overlap)
  prox = logp + 0.1 if overlap else None
  f = jax.value_and_grad(lambda lp, o, r, px: grpo_loss(
      lp, o, adv, mask, cfg, r, px if overlap else None)[0])
  clean = f(logp, old, ref, prox)
  bad = lambda x, v: None if x is None else np.where(mask, x, v).astype(np.float32)
  for v in (np.nan, np.inf, -np.inf, 1e30):
    got = f(bad(logp, v), bad(old, -v), bad(ref, v), bad(prox, v))
    assert float(got[0]) == float(clean[0])
    np.testing.assert_array_equal(got[1], clean[1])


def test_loss_errors():
  logp, old, adv, mask, ref = random_inputs(5)
  cfg = GRPOConfig()
  adv_NxT = np.broadcast_to(adv[:, None], mask.shape)
  weights = packing.token_weights(mask, cfg).astype(np.float32)
  with pytest.raises(ValueError, match="mask has shape"):
    losses.grpo_loss(logp, old, adv_NxT, mask[:, :-1], weights, cfg)
  with pytest.raises(ValueError, match="adv has shape"):
    losses.grpo_loss(logp, old, adv_NxT[:-1], mask, weights, cfg)
  with pytest.raises(ValueError, match="weights has shape"):
    losses.grpo_loss(logp, old, adv_NxT, mask, weights[:, 1:], cfg)
  with pytest.raises(ValueError, match="unknown loss mode"):
    packing.token_weights(mask, types.SimpleNamespace(loss_mode="token_sum", minibatches=1,
                                                      microbatches=1))
  with pytest.raises(ValueError, match="loss_mode"):
    GRPOConfig(loss_mode="token_sum")
  with pytest.raises(ValueError, match="dual_clip"):
    GRPOConfig(dual_clip=0.5)
  with pytest.raises(ValueError, match="grpo.overlap='yes' not in"):
    GRPOConfig(overlap="yes")
  with pytest.raises(ValueError, match="tis_cap must be 0"):
    GRPOConfig(tis_cap=0.5)


# --- model-level: teacher-forced logprobs, SFT, REINFORCE --------------------


@pytest.fixture(scope="module")
def tiny():
  """Randomised tiny params and a left-padded prompt + right-padded completion batch."""
  params = model.init_params(CFG, jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  rng = np.random.default_rng(0)
  n, s, t = 8, 5, 9
  tokens = rng.integers(0, CFG.vocab_size, (n, s + t)).astype(np.int32)
  mask = np.ones((n, s + t), bool)
  for i, pad in enumerate([0, 2, 4, 1, 0, 3, 0, 2]):
    mask[i, :pad] = False
  lens = np.array([9, 1, 5, 0, 7, 9, 3, 6])
  cmask = np.arange(t)[None, :] < lens[:, None]
  mask[:, s:] = cmask
  tokens[~mask] = 0
  forward = jax.jit(lambda p, tok, m: model.forward(p, tok, CFG, mask_BxT=m))
  logits = np.asarray(forward(params, tokens, mask), np.float64)

  def naive_logp(p):  # unchunked: the whole (N, T, V) log_softmax at once
    lsm = jax.nn.log_softmax(model.forward(p, tokens, CFG, mask_BxT=mask)[:, s - 1:-1], -1)
    return jnp.take_along_axis(lsm, tokens[:, s:, None], -1)[..., 0]

  naive_vjp = jax.jit(lambda p, ct: jax.vjp(naive_logp, p)[1](ct)[0])
  return dict(params=params, tokens=tokens, mask=mask, cmask=cmask, s=s, logits=logits,
              forward=forward, naive_vjp=naive_vjp)


def np_log_softmax(logits, temperature):
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("chunk", [1, 4, 64])  # chunk 4 does not divide T = 9
def test_token_logprobs_match_float64(tiny, chunk):
  p, tokens, mask, cmask, s = (tiny[k] for k in ("params", "tokens", "mask", "cmask", "s"))
  temp = 0.7
  got, ent = jax.jit(lambda p: losses.token_logprobs_and_entropy(
      p, CFG, tokens, attention.plan(mask), s, temp, chunk))(p)
  lsm = np_log_softmax(tiny["logits"][:, s - 1:-1], temp)
  want = np.take_along_axis(lsm, tokens[:, s:, None], -1)[..., 0]
  want_ent = -(np.exp(lsm) * lsm).sum(-1)
  err = np.abs(np.asarray(got) - want)[cmask].max()
  print(f"chunk {chunk}: token_logprobs vs float64 log_softmax max abs err {err:.2e}")
  assert err <= 1e-5
  assert np.abs(np.asarray(ent) - want_ent)[cmask].max() <= 1e-5


@pytest.mark.slow
def test_first_and_last_completion_token_scored_from_their_prefix(tiny):
  """Token j's logp equals the last-position logits of a forward of tokens[:j] alone."""
  p, tokens, mask, cmask, s = (tiny[k] for k in ("params", "tokens", "mask", "cmask", "s"))
  got = np.asarray(token_logprobs(p, CFG, tokens, mask, s))
  rows = np.arange(len(tokens))
  for j in (0, cmask.shape[1] - 1):
    last = tiny["forward"](p, tokens[:, :s + j], mask[:, :s + j])[:, -1]
    want = np_log_softmax(last, 1.0)[rows, tokens[:, s + j]]
    assert np.abs(got[:, j] - want)[cmask[:, j]].max() <= 1e-5


@pytest.mark.slow
def test_chunked_gradient_equals_unchunked(tiny):
  p, tokens, mask, cmask, s = (tiny[k] for k in ("params", "tokens", "mask", "cmask", "s"))
  ct = (np.random.default_rng(1).normal(size=cmask.shape) * cmask).astype(np.float32)
  chunked = lambda q: token_logprobs(q, CFG, tokens, mask, s, chunk=4)
  got = jax.jit(lambda q, c: jax.vjp(chunked, q)[1](c)[0])(p, ct)
  want = tiny["naive_vjp"](p, ct)
  err = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  assert err <= 1e-5, err


MODES = [("dr_grpo", "none"), ("grpo", "group"), ("bnpo", "group")]


@pytest.mark.slow
def test_mu1_beta0_gradient_is_reinforce_with_group_baseline(tiny):
  """At the sampling policy (ratio 1), the GRPO gradient is −Σ w·A·∇logπ for every mode."""
  p, tokens, mask, cmask, s = (tiny[k] for k in ("params", "tokens", "mask", "cmask", "s"))
  g = 4
  rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.5])
  advs = [np_advantages(rewards, g, scale, 1e-4, 1) for _, scale in MODES]
  old = token_logprobs(p, CFG, tokens, mask, s)  # what the sampler returned

  def grpo_grads(q):
    out = []
    for (mode, _), adv in zip(MODES, advs):
      cfg = GRPOConfig(loss_mode=mode, beta=0.0, group_size=g)
      loss = lambda q: grpo_loss(token_logprobs(q, CFG, tokens, mask, s, chunk=4), old,
                                 adv, cmask, cfg)[0]
      out.append(jax.grad(loss)(q))
    return out

  for (mode, scale), adv, got in zip(MODES, advs, jax.jit(grpo_grads)(p)):
    # REINFORCE: ∇ of −Σ_it w_it·A_i·logπ(o_it), A_i = r_i − mean of its group (÷ std).
    want = tiny["naive_vjp"](p, (-np_weights(cmask, mode) * adv[:, None]).astype(np.float32))
    err = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    print(f"{mode}/{scale}: GRPO vs REINFORCE-with-group-baseline grad max rel err {err:.2e}")
    assert err <= 1e-5


def test_sft_loss_matches_float64(tiny):
  p, tokens, mask = tiny["params"], tiny["tokens"], tiny["mask"]
  loss_mask = mask.copy()
  loss_mask[:, :6] = False  # e.g. a prompt that is not trained on
  loss, sums = jax.jit(lambda p: losses.sft_loss(p, CFG, tokens, attention.plan(mask), loss_mask,
                                                     chunk=4))(p)
  lsm = np_log_softmax(tiny["logits"], 1.0)
  nll = -np.take_along_axis(lsm[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  want = nll[loss_mask[:, 1:]].mean()
  assert abs(float(loss) - want) / want <= TOL
  assert sums["tokens"] == loss_mask[:, 1:].sum()


def np_distill(logits, tokens, loss_mask, top_ids, top_lp, has_teacher, w):
  """Float64 restatement: w·KL(teacher top-k + rest ‖ student) + (1 − w)·CE per target."""
  lsm = np_log_softmax(logits, 1.0)[:, :-1]
  tgt, ids, tlp = tokens[:, 1:], top_ids[:, 1:], top_lp[:, 1:].astype(np.float64)
  m, kd = loss_mask[:, 1:], (loss_mask & has_teacher)[:, 1:]
  total = 0.0
  for i, j in zip(*np.nonzero(m)):
    ce = -lsm[i, j, tgt[i, j]]
    if not kd[i, j]:
      total += ce
      continue
    p = np.exp(tlp[i, j])
    q = np.exp(lsm[i, j])
    r, q_rest = 1.0 - p.sum(), 1.0 - q[ids[i, j]].sum()
    kl = (p * (tlp[i, j] - np.log(q[ids[i, j]]))).sum()
    if r > 0:
      kl += r * (np.log(r) - np.log(q_rest))
    total += w * kl + (1 - w) * ce
  return total / m.sum()


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0])
def test_distill_loss_matches_float64(tiny, w):
  p, tokens, mask = tiny["params"], tiny["tokens"], tiny["mask"]
  rng = np.random.default_rng(3)
  n, q, k = tokens.shape[0], tokens.shape[1], 4
  # A teacher: its own random distribution per position, top-k kept (distinct ids).
  t_logits = rng.normal(size=(n, q, CFG.vocab_size)) * 2.0
  t_lsm = np_log_softmax(t_logits, 1.0)
  top_ids = np.argsort(-t_lsm, -1)[..., :k].astype(np.int32)
  top_lp = np.take_along_axis(t_lsm, top_ids, -1).astype(np.float32)
  has = mask & (rng.random((n, q)) < 0.8)  # some targets have no teacher record: CE only
  loss_mask = mask.copy()
  loss_mask[:, :4] = False
  loss, sums = jax.jit(lambda p: losses.distill_loss(
      p, CFG, tokens, attention.plan(mask), loss_mask, top_ids, top_lp, has, w, chunk=4))(p)
  want = np_distill(tiny["logits"], tokens, loss_mask, top_ids, top_lp, has, w)
  assert abs(float(loss) - want) / want <= 1e-5, (float(loss), want)
  assert sums["kd_tokens"] == (loss_mask & has)[:, 1:].sum()
  if w == 0.0:  # plain CE: the SFT loss exactly
    sft, _ = losses.sft_loss(p, CFG, tokens, attention.plan(mask), loss_mask, chunk=4)
    assert float(loss) == pytest.approx(float(sft), rel=1e-6)


@pytest.mark.slow
def test_distill_gradient_moves_the_student_towards_the_teacher(tiny):
  """A few steps on the KL alone lower it (the gradient has the right sign and scale)."""
  p, tokens, mask = tiny["params"], tiny["tokens"], tiny["mask"]
  rng = np.random.default_rng(4)
  t_lsm = np_log_softmax(rng.normal(size=(*tokens.shape, CFG.vocab_size)) * 3.0, 1.0)
  top_ids = np.argsort(-t_lsm, -1)[..., :8].astype(np.int32)
  top_lp = np.take_along_axis(t_lsm, top_ids, -1).astype(np.float32)
  plan = attention.plan(mask)
  loss = jax.jit(lambda q: losses.distill_loss(q, CFG, tokens, plan, mask, top_ids, top_lp,
                                               mask, 1.0, chunk=4)[0])
  grad = jax.jit(jax.grad(lambda q: losses.distill_loss(q, CFG, tokens, plan, mask, top_ids,
                                                        top_lp, mask, 1.0, chunk=4)[0]))
  start = float(loss(p))
  for _ in range(5):
    p = jax.tree.map(lambda a, g: a - 0.05 * g, p, grad(p))
  assert float(loss(p)) < 0.95 * start


def test_logprob_input_errors(tiny):
  p, tokens, mask, s = tiny["params"], tiny["tokens"], tiny["mask"], tiny["s"]
  with pytest.raises(ValueError, match="completion_start"):
    token_logprobs(p, CFG, tokens, mask, tokens.shape[1])
  with pytest.raises(ValueError, match="must be equal"):
    token_logprobs(p, CFG, tokens, mask[:, 1:], s)
  with pytest.raises(ValueError, match="loss_mask"):
    losses.sft_loss(p, CFG, tokens, attention.plan(mask), mask[:, 1:])


@pytest.mark.slow
def test_chunking_bounds_logits_memory():
  """Compiled value+grad peak scratch: below one full (N, T, V) f32 logits when chunked."""
  cfg = ModelConfig(vocab_size=8192, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16,
                    mlp_dim=64)
  params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  n, s, t = 8, 4, 128
  tok = jax.ShapeDtypeStruct((n, s + t), jnp.int32)
  msk = jax.ShapeDtypeStruct((n, s + t), jnp.bool_)
  full_logits = n * t * cfg.vocab_size * 4

  def scratch(chunk):
    loss = lambda p, x, m: jnp.sum(losses.token_logprobs_and_entropy(
        p, cfg, x, attention.plan(m), s, 1.0, chunk)[0])
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tok, msk).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  chunked, whole = scratch(8), scratch(t)
  print(f"scratch: chunk 8 {chunked / 2**20:.1f} MiB, unchunked {whole / 2**20:.1f} MiB, "
        f"one full logits {full_logits / 2**20:.1f} MiB")
  assert chunked < 0.5 * full_logits < whole


@pytest.mark.parametrize("mode", ["grpo", "bnpo", "dr_grpo"])
def test_no_op_builds_rows_by_length_by_vocab_logits(mode):
  """The GRPO update's gradient (logprobs, entropy, loss, KL to a reference) never produces
  an array of rows × T × V elements, however laid out; unchunked, it does (the check bites)."""
  cfg = ModelConfig(vocab_size=300, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16,
                    mlp_dim=64)
  params = model.init_params(cfg, jax.random.key(0))
  n, s, t = 4, 3, 64
  tokens = jax.random.randint(jax.random.key(1), (n, s + t), 0, cfg.vocab_size)
  mask = np.ones((n, s + t), bool)
  g = GRPOConfig(loss_mode=mode, beta=0.04)
  old, ref = jnp.zeros((n, t)), jnp.zeros((n, t))

  def grad_of(chunk):
    def loss(p):
      logp, ent = losses.token_logprobs_and_entropy(p, cfg, tokens, attention.plan(mask), s,
                                                    1.0, chunk)
      value, _ = grpo_loss(logp, old, jnp.ones((n,)), mask[:, s:], g, ref)
      return value + 1e-3 * jnp.sum(ent)
    return jax.grad(loss)

  big = lambda shapes: [x for x in shapes if int(np.prod(x)) >= n * t * cfg.vocab_size]
  assert not big(output_shapes(grad_of(16), params))
  assert big(output_shapes(grad_of(t), params))
