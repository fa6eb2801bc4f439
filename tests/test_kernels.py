"""Fused attention kernels (TPU splash, Pallas GPU, cuDNN) against the XLA form in one piece:
values and gradients with left padding, packed segments, GQA and several block sizes, alone and
inside the model on a mesh (under shard_map). On CPU they run in Pallas interpret mode (cuDNN's
call on XLA); on a device (tools/device_check.sh) the kernel for it runs compiled."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.core import attention, decode_attention, kernels, model, sharding
from r1jax.core.config import ModelConfig

B, K, J, HD = 4, 2, 2, 32  # rows, kv heads, queries per kv head (GQA), head width


def _rows(layout: str, t: int, rng: np.random.Generator):
  """(valid, segment ids or None): left-padded rows, or rows packed with uneven sequences."""
  if layout == "left_padded":
    pads = [0, 5, 17, t - 3]
    valid = np.arange(t)[None, :] >= np.array(pads)[:, None]
    return jnp.asarray(valid), None
  if layout == "runs":  # one run of real tokens a row: left, right, both or no padding
    starts, ends = np.array([0, 4, 9, 30]), np.array([t, t - 7, t - 1, 40])
    i = np.arange(t)[None, :]
    return jnp.asarray((i >= starts[:, None]) & (i < ends[:, None])), None
  seg = np.zeros((B, t), np.int32)
  for b in range(B):
    pos, s = 0, 1
    while pos < t - 8:
      n = int(rng.integers(3, t // 2))
      seg[b, pos:pos + n] = s
      pos, s = pos + n, s + 1
    seg[b, t - int(rng.integers(0, 8)):] = 0  # trailing padding
  return jnp.asarray(seg > 0), jnp.asarray(seg)


def _qkv(t: int, seed: int):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, t, K, J, HD))
  k = jax.random.normal(ks[1], (B, K, HD, t))
  v = jax.random.normal(ks[2], (B, K, t, HD))
  w = jax.random.normal(ks[3], (B, t, K, J, HD))
  return q, k, v, w


def _value_and_grads(fn, q, k, v, w, valid):
  """The outputs at real queries and the gradients of Σ w·out over them (padding's outputs
  are never read, and the two forms need not agree there)."""
  keep = valid[:, :, None, None, None]

  def loss(q, k, v):
    return jnp.sum(jnp.where(keep, fn(q, k, v) * w, 0.0))
  out = jnp.where(keep, fn(q, k, v), 0.0)
  return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("kernel, layout, t, blocks", [
    ("splash", "left_padded", 256, (128, 128)),
    ("splash", "packed", 384, (128, 128)),
    ("splash", "packed", 200, (128, 256)),  # padded up to a whole block
    ("pallas_gpu", "left_padded", 128, (32, 32)),
    ("pallas_gpu", "packed", 192, (64, 32)),
    ("pallas_gpu", "packed", 100, (32, 64)),
    ("cudnn", "left_padded", 96, None),
    ("cudnn", "runs", 80, None),
])
def test_kernel_matches_xla(kernel, layout, t, blocks):
  valid, seg = _rows(layout, t, np.random.default_rng(t))
  q, k, v, w = _qkv(t, seed=t)
  plan = attention.plan(valid, seg, block=0)  # the whole (T, T) mask: the reference
  ref = jax.jit(lambda q, k, v: _value_and_grads(
      lambda q, k, v: attention.attend(q, k, v, plan, "xla"), q, k, v, w, valid))(q, k, v)
  fused = jax.jit(lambda q, k, v: _value_and_grads(
      lambda q, k, v: kernels.fused_attention(q, k, v, valid, seg, kernel,
                                              kernels.choose(kernel)[1], blocks),
      q, k, v, w, valid))(q, k, v)
  np.testing.assert_allclose(fused[0], ref[0], atol=1e-5, rtol=0)
  for name, got, want in zip("qkv", fused[1], ref[1]):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"d{name}")


def test_choice_by_platform_and_setting():
  assert kernels.choose("auto") == ("xla", False)  # CPU: the XLA form
  assert kernels.choose("xla") == ("xla", False)
  assert kernels.choose("splash") == ("splash", True)  # a TPU kernel on CPU: interpreted
  assert kernels.choose("pallas_gpu") == ("pallas_gpu", True)
  assert kernels.choose("cudnn") == ("cudnn", True)  # on CPU: the same call on XLA
  # cuDNN takes unpacked rows in bf16 / f16 with head widths <= 128 (multiples of 8); packed
  # rows and f32 go to the Pallas kernel, except on the XLA stand-in, which takes any dtype.
  assert kernels.cudnn_fits(None, jnp.bfloat16, 128)
  assert not kernels.cudnn_fits(jnp.ones((1, 4), jnp.int32), jnp.bfloat16, 64)
  assert not kernels.cudnn_fits(None, jnp.float32, 64)
  assert kernels.cudnn_fits(None, jnp.float32, 64, interpret=True)
  assert not kernels.cudnn_fits(None, jnp.float16, 256)
  with pytest.raises(ValueError, match="attention"):
    kernels.choose("flash")
  with pytest.raises(ValueError, match="model.attention"):
    ModelConfig(vocab_size=8, hidden=8, layers=1, heads=2, kv_heads=1, head_dim=4, mlp_dim=8,
                attention="flash")
  assert kernels.tpu_blocks("TPU v4", 4096) == (512, 512)
  assert kernels.tpu_blocks("TPU v5 lite", 4096) == (512, 1024)
  assert kernels.tpu_blocks("TPU v5p", 300) == (384, 384)  # capped at the padded row


def test_shared_prompts_stay_on_xla():
  """Sample ids (a group's samples sharing one prompt) have no segment-id form."""
  t = 64
  valid, seg = _rows("packed", t, np.random.default_rng(0))
  sample = jnp.where(jnp.arange(t)[None] % 7 > 2, seg, 0)
  q, k, v, _ = _qkv(t, seed=1)
  plan = attention.plan(valid, seg, sample, block=0)
  np.testing.assert_array_equal(attention.attend(q, k, v, plan, "splash"),
                                attention.attend(q, k, v, plan, "xla"))


CFG = ModelConfig(vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32,
                  mlp_dim=128, qkv_bias=True, tie_embeddings=True, max_position=512)


@pytest.mark.parametrize("kernel", ["splash", "pallas_gpu", "cudnn"])
def test_model_on_a_mesh_with_kernel(kernel):
  """The model's forward and gradient with a kernel under shard_map on a (2, 2, 2) mesh
  (rows over data × fsdp, kv heads over tensor) against the XLA form."""
  mesh = sharding.make_mesh((2, 2, 2))
  params = model.init_params(CFG, jax.random.key(0))
  t = 96
  valid, _ = _rows("left_padded", t, np.random.default_rng(0))
  tokens = jax.random.randint(jax.random.key(1), (B, t), 1, CFG.vocab_size)

  def run(cfg):
    def loss(p):
      logits = model.forward(p, tokens, cfg, mask_BxT=valid)
      return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits), 0.0)) / 1e4, logits
    with jax.set_mesh(mesh):
      (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return jnp.where(valid[..., None], logits, 0.0), grads

  ref_logits, ref_grads = run(dataclasses.replace(CFG, attention="xla"))
  logits, grads = run(dataclasses.replace(CFG, attention=kernel))
  np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=0, err_msg=jax.tree_util.keystr(path))


def _cache_reference(q, k, v, mask):
  """float64 numpy: each query over its row's masked slots, cache layout (k: h x X, v: X x h)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum("btkgh,bkhx->bkgtx", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.asarray(mask)[:, None, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bkgtx,bkxh->btkgh", p, v)


@pytest.mark.parametrize("slots, index", [(256, 200), (384, 383)])
def test_decode_kernel_matches_xla(slots, index):
  """One decode step (T = 1) against a cache: left-padded rows, slots past the current one
  empty, a row with a single valid slot; 2 blocks of 256 / 3 of 128 slots. The kernel and
  XLA's form against a float64 restatement."""
  ks = jax.random.split(jax.random.key(slots), 3)
  q = jax.random.normal(ks[0], (B, 1, K, J, HD))
  k = jax.random.normal(ks[1], (B, K, HD, slots))
  v = jax.random.normal(ks[2], (B, K, slots, HD))
  x = np.arange(slots)[None]
  written = x >= np.array([0, 9, 130, index])[:, None]  # row 3: its own slot only
  mask = jnp.asarray(written & (x <= index))
  plan = attention.AttentionPlan(jnp.ones((B, 1), bool), mask_BxTxX=mask[:, None], cached=True)
  ref = _cache_reference(q, k, v, mask[:, None])
  want = attention.attend(q, k, v, plan, "xla")
  np.testing.assert_allclose(want, ref, atol=1e-5, rtol=0)
  got = jax.jit(lambda q, k, v: attention.attend(q, k, v, plan, "splash"))(q, k, v)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  assert decode_attention.block_for(slots) == {256: 256, 384: 128}[slots]
  assert not decode_attention.fits(144)  # a 16-token bucket + 128 slots: XLA's form
  with pytest.raises(ValueError, match="one query a row"):
    decode_attention.decode_attention(jnp.concatenate([q, q], 1), k, v, mask, True)


def test_cache_attention_of_a_chunk():
  """Several queries a row against a cache (a chunk after a prefill): causal within the
  chunk, left padding and GQA, XLA's form against a float64 restatement."""
  t, slots, index = 5, 40, 21
  ks = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(ks[0], (B, t, K, J, HD))
  k = jax.random.normal(ks[1], (B, K, HD, slots))
  v = jax.random.normal(ks[2], (B, K, slots, HD))
  x = np.arange(slots)[None, None]
  query = index + np.arange(t)[None, :, None]
  mask = (x >= np.array([0, 3, 10, 20])[:, None, None]) & (x <= query)
  got = attention.softmax_attention(q, k, v, jnp.asarray(mask))
  np.testing.assert_allclose(got, _cache_reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_sampler_with_the_tpu_kernels_on_a_mesh():
  """The sampler with attention='splash' (interpreted): the prefill by splash within the
  prompts, each decode step by the decode kernel (under shard_map on a (2, 2, 2) mesh: rows
  over 4, kv heads over 2), 256-slot caches; the same tokens as XLA's form, logprobs
  within 1e-5."""
  from r1jax.generation.sampler import Sampler, SamplingParams
  mesh = sharding.make_mesh((2, 2, 2))
  params = model.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = [list(map(int, rng.integers(1, CFG.vocab_size, n))) for n in (5, 70, 128, 31)]
  sp = SamplingParams(temperature=1.0, max_new_tokens=6)
  outs = []
  for impl in ("xla", "splash"):
    cfg = dataclasses.replace(CFG, attention=impl)
    sampler = Sampler(cfg, mesh, max_prompt_len=128, min_bucket=128, min_rows=0)
    outs.append(sampler.generate(params, prompts, sp, jax.random.key(1), group=2))
  np.testing.assert_array_equal(np.asarray(outs[1].tokens), np.asarray(outs[0].tokens))
  np.testing.assert_allclose(np.asarray(outs[1].logprobs), np.asarray(outs[0].logprobs),
                             atol=1e-5, rtol=0)


def test_cudnn_in_bf16_matches_xla():
  """cuDNN's own dtype (bf16): on a GPU the real cuDNN call (tools/device_check.sh), on CPU
  its XLA stand-in; left-padded and run rows against the f32 XLA form of the same inputs,
  within bf16's rounding."""
  t = 64
  for layout in ("left_padded", "runs"):
    valid, _ = _rows(layout, t, np.random.default_rng(0))
    q, k, v, _ = (x.astype(jnp.bfloat16) for x in _qkv(t, seed=3))
    plan = attention.plan(valid, block=0)
    want = attention.attend(*(x.astype(jnp.float32) for x in (q, k, v)), plan, "xla")
    kernel, interpret = kernels.choose("cudnn")
    got = jax.jit(lambda q, k, v: kernels.fused_attention(q, k, v, valid, None, kernel,
                                                          interpret))(q, k, v)
    keep = np.asarray(valid)[:, :, None, None, None]
    np.testing.assert_allclose(np.where(keep, np.asarray(got, np.float32), 0),
                               np.where(keep, want, 0), atol=3e-2, rtol=0, err_msg=layout)
