"""Model: parameter table, KV-cache decoding, remat and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.core import attention, model
from r1jax.core.config import ModelConfig, RopeScaling

from jaxpr_shapes import output_shapes

CFG = ModelConfig(vocab_size=128, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                  mlp_dim=64, qkv_bias=True, tie_embeddings=False,
                  rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16))


def randomized(cfg, seed=0):
  """Init, then every leaf (norms and biases too) perturbed to be non-trivial."""
  params = model.init_params(cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="module")
def params():
  return randomized(CFG)


def test_param_table_matches_init_and_count(params):
  flat = model.flatten(params)
  table = model.param_table(CFG)
  assert {n: a.shape for n, a in flat.items()} == {n: s for n, (s, _, _) in table.items()}
  assert sum(a.size for a in flat.values()) == CFG.num_params
  axes = model.flatten(model.param_axes(CFG))
  assert all(len(axes[n]) == len(flat[n].shape) for n in flat)


@pytest.mark.slow
def test_cached_decode_equals_full_forward(params):
  """Prefill a left-padded prompt, then decode one token at a time."""
  rng = np.random.default_rng(0)
  b, prompt, new = 3, 6, 5
  tokens = rng.integers(0, CFG.vocab_size, (b, prompt + new)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  mask[1, :2] = False  # row 1 left-padded by 2
  mask[2, :5] = False  # row 2 left-padded by 5
  full = np.asarray(model.forward(params, tokens, CFG, mask_BxT=mask))

  step = jax.jit(lambda p, t, c, m: model.forward_cached(p, t, CFG, c, mask_BxT=m))
  cache = model.init_cache(CFG, b, prompt + new + 3)
  logits, cache = step(params, tokens[:, :prompt], cache, mask[:, :prompt])
  got = [np.asarray(logits)]
  for i in range(prompt, prompt + new):
    logits, cache = step(params, tokens[:, i:i + 1], cache, mask[:, i:i + 1])
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  assert int(cache.index) == prompt + new
  np.testing.assert_allclose(got[mask], full[mask], atol=1e-5)


@pytest.mark.slow
def test_cached_positions_count_real_tokens(params):
  """A decode step's default position is the row's count of real tokens."""
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, CFG.vocab_size, (2, 5)).astype(np.int32)
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
  step = jax.jit(lambda p, t, c, m=None, pos=None: model.forward_cached(
      p, t, CFG, c, mask_BxT=m, positions_BxT=pos))
  _, cache = step(params, tokens, model.init_cache(CFG, 2, 8), mask)
  nxt = np.array([[7], [7]], np.int32)
  auto, _ = step(params, nxt, cache)
  explicit, _ = step(params, nxt, cache, None, np.array([[3], [5]], np.int32))
  wrong, _ = step(params, nxt, cache, None, np.array([[5], [5]], np.int32))
  np.testing.assert_allclose(auto, explicit, atol=1e-6)
  assert np.abs(np.asarray(auto[0]) - np.asarray(wrong[0])).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_same_value_and_grad(params, remat):
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % CFG.vocab_size

  def loss(p, cfg):
    return jnp.mean(model.forward(p, tokens, cfg) ** 2)

  ref_v, ref_g = jax.value_and_grad(loss)(params, CFG)
  v, g = jax.value_and_grad(loss)(params, CFG.replace(remat=remat))
  np.testing.assert_allclose(v, ref_v, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_bf16_compute_close_to_f32(params):
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12)
  ref = model.forward(params, tokens, CFG)
  bf = model.forward(params, tokens, CFG.replace(compute_dtype="bfloat16"))
  assert bf.dtype == jnp.float32  # logits are always produced in f32
  rel = np.abs(np.asarray(bf) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
  assert 0 < rel < 0.05


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="multiple of"):
    CFG.replace(kv_heads=3)
  with pytest.raises(ValueError, match="compute_dtype"):
    CFG.replace(compute_dtype="float8")


def test_sample_ids_need_segment_ids(params):
  """Sample ids subdivide packed segments; alone they would silently mask nothing."""
  tokens = jnp.zeros((1, 6), jnp.int32)
  with pytest.raises(ValueError, match="pass segment_ids too"):
    attention.plan(tokens > 0, sample_ids_BxT=jnp.ones((1, 6), jnp.int32))


def test_attention_plan_refuses_no_lanes_and_negative_windows():
  """0 lanes would walk no rows; a negative window count has no meaning."""
  valid = jnp.ones((2, 6), bool)
  with pytest.raises(ValueError, match="lanes must be >= 1"):
    attention.plan(valid, lanes=0)
  with pytest.raises(ValueError, match="windows >= 0"):
    attention.plan(valid, windows=-1)
  assert attention.plan(valid, lanes=2, windows=0).lanes == 2


def _plain_swiglu(y, gate, up, down):
  """The MLP as plain jnp, differentiated by autodiff: the reference backward."""
  return jnp.einsum("btf,fd->btd", jax.nn.silu(y @ gate) * (y @ up), down)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 5e-2)])
def test_swiglu_hand_backward_matches_autodiff(dtype, tol):
  ks = jax.random.split(jax.random.key(3), 5)
  dt = jnp.dtype(dtype)
  y = jax.random.normal(ks[0], (3, 5, 16)).astype(dt)
  w = [(0.3 * jax.random.normal(k, s)).astype(dt)
       for k, s in zip(ks[1:4], [(16, 24), (16, 24), (24, 16)])]
  cot = jax.random.normal(ks[4], (3, 5, 16)).astype(dt)
  out, vjp = jax.vjp(model.swiglu, y, *w)
  f32 = lambda a: a.astype(jnp.float32)
  ref_out, ref_vjp = jax.vjp(_plain_swiglu, *map(f32, (y, *w)))
  np.testing.assert_allclose(f32(out), ref_out, rtol=tol, atol=tol)
  for got, want in zip(vjp(cot), ref_vjp(f32(cot))):
    assert got.dtype == dt
    err = np.abs(np.asarray(f32(got)) - np.asarray(want)).max() / np.abs(np.asarray(want)).max()
    assert err < tol


@pytest.mark.slow
def test_model_gradient_unchanged_by_hand_mlp_backward(params, monkeypatch):
  """Whole-model grads with the hand-written MLP backward equal plain autodiff's."""
  tokens = np.arange(20, dtype=np.int32).reshape(2, 10) * 7 % CFG.vocab_size
  loss = lambda p: jnp.mean(model.forward(p, tokens, CFG) ** 2)
  got = jax.jit(jax.grad(loss))(params)
  monkeypatch.setattr(model, "swiglu", _plain_swiglu)
  want = jax.jit(jax.grad(loss))(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


def test_fused_projections_decode_equals_unfused(params):
  """fuse_projections (the sampler's decode layout) changes no logits."""
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6) * 5 % CFG.vocab_size
  fused = model.fuse_projections(params)
  assert "qkv" in fused["layers"][0] and "q" not in fused["layers"][0]
  outs = []
  for p in (params, fused):
    cache = model.init_cache(CFG, 2, 8)
    logits, cache = model.forward_cached(p, tokens[:, :5], CFG, cache)
    step, _ = model.forward_cached(p, tokens[:, 5:], CFG, cache)
    outs.append(np.concatenate([logits, step], axis=1))
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("packed,lanes", [(False, None), (True, None), (True, 1), (True, 3),
                                          ("shared", 1)],
                         ids=["left_padded", "segment_ids", "segment_ids_1_lane",
                              "segment_ids_3_lanes", "shared_prompt_1_lane"])
def test_query_blocked_attention_matches_full_attention(params, packed, lanes):
  """Long sequences attend one block of queries at a time: the same hidden states and
  gradients as the full (T, T) attention, with left padding or packed segments, and a block
  that does not divide T. Packed rows attend over key windows chosen per lane step (one row
  at a time, all three together): every window size is met by some block here."""
  b, t = 3, 50
  tokens = jax.random.randint(jax.random.key(5), (b, t), 0, CFG.vocab_size)
  if packed:  # three documents per row, positions restarting in each
    lengths = [(10, 25, 15), (50, 0, 0), (1, 1, 48)]
    seg = np.concatenate([np.repeat(np.arange(3), l)[None] for l in lengths])
    pos = np.concatenate([np.concatenate([np.arange(n) for n in l])[None] for l in lengths])
    kw = dict(segment_ids_BxT=jnp.asarray(seg), positions_BxT=jnp.asarray(pos),
              valid_BxT=jnp.ones((b, t), bool))
    if packed == "shared":  # row 0's 2nd segment: a shared 5-token prefix, then two
      sample = np.zeros((b, t), np.int32)  # samples of 12 and 8 tokens, each from position 5
      sample[0, 15:27], sample[0, 27:35] = 1, 2
      pos[0, 27:35] = np.arange(5, 13)
      kw.update(sample_ids_BxT=jnp.asarray(sample), positions_BxT=jnp.asarray(pos))
  else:  # left padding of 0, 7 and 49 tokens
    kw = dict(valid_BxT=jnp.arange(t)[None, :] >= jnp.array([0, 7, 49])[:, None])

  def loss(p, block):
    plan = attention.plan(kw["valid_BxT"], kw.get("segment_ids_BxT"), kw.get("sample_ids_BxT"),
                          block=block, lanes=lanes)
    h = model.hidden_states(p, tokens, CFG, plan, kw.get("positions_BxT"))
    w = kw["valid_BxT"][..., None]
    return jnp.sum(jnp.where(w, h, 0.0) ** 2), h

  both = jax.jit(lambda p: [jax.value_and_grad(loss, has_aux=True)(p, b) for b in (0, 16)])
  ((full_l, full_h), full_g), ((blk_l, blk_h), blk_g) = both(params)
  real = np.asarray(kw["valid_BxT"])
  np.testing.assert_allclose(np.asarray(blk_h)[real], np.asarray(full_h)[real], atol=1e-5)
  np.testing.assert_allclose(blk_l, full_l, rtol=1e-6)
  for a, e in zip(jax.tree.leaves(blk_g), jax.tree.leaves(full_g)):
    # Blocks of different key lengths sum in another order: f32 round-off of the leaf's
    # largest gradients (up to ~500 here; ulp 3e-5) reaches its small entries too.
    np.testing.assert_allclose(a, e, atol=1e-6 * np.abs(e).max() + 1e-7, rtol=1e-5)
  # The blocked path really ran: its jaxpr has no (B, heads, T, T) scores, the full one does.
  shapes = lambda block: output_shapes(jax.grad(lambda p: loss(p, block)[0]), params)
  scores = (b, CFG.kv_heads, t * (CFG.heads // CFG.kv_heads), t)  # (B, K, T·J, X)
  assert scores in shapes(0)
  assert scores not in shapes(16)
