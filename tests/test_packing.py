"""The update's row layouts (train/packing.py): tight packing and one sequence a row give the
loss and gradient of the padded batch's forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.core import attention, model
from r1jax.core.config import GRPOConfig, ModelConfig
from r1jax.train import losses
from r1jax.train.batches import RolloutBatch
from r1jax.train.packing import one_per_row, pack_rollout, unpack_completions
from test_losses import np_weights

CFG = ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                  mlp_dim=64, max_position=128)
S, T = 6, 12


def rollout(n=8, seed=0, ref=True, group=1, longest=T) -> RolloutBatch:
  """Uneven samples: left-padded prompts of 1–6 tokens, completions of 0–`longest` tokens
  (two of them: T and 1); each run of `group` samples has one prompt (a GRPO group)."""
  rng = np.random.default_rng(seed)
  prompt_len = np.repeat(rng.integers(1, S + 1, n // group), group)
  comp_len = rng.integers(0, longest + 1, n)
  comp_len[0], comp_len[1] = T, 1
  tokens = rng.integers(0, CFG.vocab_size, (n, S + T)).astype(np.int32)
  tokens[:, :S] = np.repeat(tokens[::group, :S], group, axis=0)
  pmask = np.arange(S)[None, :] >= (S - prompt_len)[:, None]
  cmask = np.arange(T)[None, :] < comp_len[:, None]
  return RolloutBatch(
      tokens=tokens, mask=np.concatenate([pmask, cmask], axis=1), completion_mask=cmask,
      old_logp=rng.normal(-2.0, 0.3, (n, T)).astype(np.float32),
      advantages=rng.standard_normal(n).astype(np.float32),
      truncated=comp_len == T,
      ref_logp=rng.normal(-2.0, 0.3, (n, T)).astype(np.float32) if ref else None)


@pytest.fixture(scope="module")
def params():
  return model.init_params(CFG, jax.random.key(0))


def padded_loss(p, b: RolloutBatch, g: GRPOConfig):
  """The reference: the padded rows' forward (positions from the mask, no segments), with the
  test's float64 restatement of the mode's token weights (one mini-batch)."""
  logp, ent = losses.token_logprobs_and_entropy(p, CFG, b.tokens, attention.plan(b.mask), S,
                                                g.temperature, 5)
  mask = np.asarray(b.completion_mask)
  if g.mask_truncated:
    mask = mask & ~np.asarray(b.truncated)[:, None]
  adv = jnp.broadcast_to(b.advantages[:, None], mask.shape)
  weights = np_weights(mask, g.loss_mode).astype(np.float32)
  return losses.grpo_loss(logp, b.old_logp, adv, mask, weights, g, b.ref_logp)[0]


def rows_loss(p, pk, g: GRPOConfig):
  """The update's loss on either layout of packed rows."""
  logp, ent = losses.token_logprobs_and_entropy(
      p, CFG, pk.tokens, attention.plan(pk.segment_ids > 0, pk.segment_ids, pk.sample_ids), 1,
      g.temperature, 5, pk.positions)
  cut = lambda x: None if x is None else x[:, 1:]
  return losses.grpo_loss(logp, cut(pk.old_logp), cut(pk.advantages), cut(pk.loss_mask),
                          cut(pk.weights), g, cut(pk.ref_logp))[0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("share", [False, True], ids=["own_prompts", "shared_prompts"])
def test_tight_packing_equals_one_sequence_a_row_and_the_padded_loss(params, mode,
                                                                    mask_truncated, share):
  """Every loss mode, with or without a group's short samples sharing one prompt copy: tight
  rows, one sequence a row and the padded forward give one loss and gradient."""
  g = GRPOConfig(loss_mode=mode, beta=0.04, mask_truncated=mask_truncated, temperature=0.9,
                 share_prompts=share)
  b = rollout(n=16, seed=1, group=4, longest=6)
  pk, stats = pack_rollout(b, g, row_len=S + T)
  assert stats["pack/rows"] < 16 and stats["pack/fill"] > stats["pack/padded_fill"]
  # Sharing happened, and samples after a run's first one carry loss tokens.
  assert (stats["pack/shared_prompt_tokens"] > 0) == share
  if share:
    assert (pk.loss_mask & (pk.sample_ids >= 2)).any()
  else:  # no sample ids: attention needs no sample rule, and skips its mask work
    assert pk.sample_ids is None
  want, want_g = jax.value_and_grad(padded_loss)(params, jax.tree.map(jnp.asarray, b), g)
  for rows in (pk, one_per_row(b, g)):
    got, got_g = jax.value_and_grad(rows_loss)(params, jax.tree.map(jnp.asarray, rows), g)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for a, e in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_packed_rows_hold_each_sample_once_in_its_own_segment():
  """Each segment is one contiguous run: a prompt's prefix (sample id 0) and then each
  sample's last prompt token and completion (ids 1, 2, …). Reading a sample back (its
  segment's prefix, then its own columns) gives its tokens at positions 0, 1, …"""
  g = GRPOConfig(minibatches=2, microbatches=2, share_prompts=True)
  b = rollout(n=16, seed=1, group=4)
  pk, stats = pack_rollout(b, g, row_len=24, rows_multiple=2)
  r = pk.tokens.shape[0]
  assert r % (2 * 2 * 2) == 0 and stats["pack/rows"] == r
  assert stats["pack/shared_prompt_tokens"] > 0
  found = []
  for row in range(r):
    for seg in range(1, pk.segment_ids[row].max() + 1):
      cols = np.flatnonzero(pk.segment_ids[row] == seg)
      assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols)))  # contiguous
      ids = pk.sample_ids[row, cols]
      assert np.array_equal(ids, np.sort(ids)) and ids[-1] >= 1  # prefix, then samples 1, 2, …
      for k in range(1, ids[-1] + 1):
        own = np.concatenate([cols[ids == 0], cols[ids == k]])
        assert np.array_equal(pk.positions[row, own], np.arange(len(own)))
        found.append((row, pk.tokens[row, own].tolist()))
  samples = [np.concatenate([b.tokens[i, :S][b.mask[i, :S]],
                             b.tokens[i, S:][b.completion_mask[i]]]).tolist() for i in range(16)]
  assert sorted(t for _, t in found) == sorted(samples)
  # Sample i lands in mini-batch (i // A) % M, and packed row k in mini-batch (k // A) % M.
  for i, tokens in enumerate(samples):
    assert any((row // 2) % 2 == (i // 2) % 2 for row, t in found if t == tokens)
  assert not pk.weights[~pk.loss_mask].any()


def test_one_sequence_a_row_keeps_the_padded_columns():
  """Row i is sample i's padded row: column S + t scores completion token t, positions count
  real tokens, and each mini-batch's weights are the mode's over its own samples."""
  b = rollout(n=16, seed=2, group=4)
  g = GRPOConfig(minibatches=2, microbatches=2, loss_mode="bnpo", mask_truncated=True)
  rows = one_per_row(b, g)
  np.testing.assert_array_equal(rows.tokens, b.tokens)
  np.testing.assert_array_equal(rows.segment_ids, b.mask.astype(np.int32))
  np.testing.assert_array_equal(rows.positions[b.mask],
                                np.concatenate([np.arange(k) for k in b.mask.sum(1)]))
  loss_mask = b.completion_mask & ~b.truncated[:, None]
  np.testing.assert_array_equal(rows.loss_mask[:, S:], loss_mask)
  assert not rows.loss_mask[:, :S].any() and rows.sample_ids is None
  np.testing.assert_array_equal(rows.old_logp[:, S:], b.old_logp)
  np.testing.assert_array_equal(rows.ref_logp[:, S:], b.ref_logp)
  np.testing.assert_array_equal(rows.advantages[:, S:],
                                np.broadcast_to(b.advantages[:, None], (16, T)))
  for j in range(2):  # sample i is in mini-batch (i // A) % M
    members = (np.arange(16) // 2) % 2 == j
    np.testing.assert_allclose(rows.weights[members],
                               np.pad(np_weights(loss_mask[members], "bnpo"), ((0, 0), (S, 0))),
                               rtol=1e-6)


def test_packing_errors():
  b = rollout()
  with pytest.raises(ValueError, match="more than the packed row length 10"):
    pack_rollout(b, GRPOConfig(), row_len=10)
  with pytest.raises(ValueError, match="do not split into 3 mini-batches"):
    pack_rollout(b, GRPOConfig(minibatches=3))
  with pytest.raises(ValueError, match="do not split into 3 mini-batches"):
    one_per_row(b, GRPOConfig(minibatches=3))
  no_prompt = dataclasses.replace(b, mask=b.mask.copy())
  no_prompt.mask[2, :S] = False
  with pytest.raises(ValueError, match="every sample needs a prompt token"):
    pack_rollout(no_prompt, GRPOConfig())


@pytest.mark.slow
@pytest.mark.parametrize("mode,minibatches,overlap", [
    ("grpo", 2, ""), ("dr_grpo", 2, ""), ("bnpo", 2, "rollout"), ("grpo", 1, "rewards")])
def test_trainer_step_on_tight_rows_equals_one_sequence_a_row(params, mode, minibatches,
                                                              overlap):
  """Through Trainer.rl_step: mini-batches × 2 micro-batches, β > 0 with the reference run
  by the step itself, on a mesh; the same metrics and the same updated params. With
  `overlap` the loss is decoupled (starting-policy logprobs: a forward pass with 2
  mini-batches, the loss's own with 1)."""
  from r1jax.core import sharding
  from r1jax.core.config import OptConfig
  from r1jax.train.logprobs import LogProbs
  from r1jax.train.trainer import Trainer

  mesh = sharding.make_mesh((2, 4, 1))
  g = GRPOConfig(loss_mode=mode, beta=0.04, minibatches=minibatches, microbatches=2,
                 group_size=4, logits_chunk=5, share_prompts=True, overlap=overlap)
  # Adam's eps at 1e-4, near the small gradient entries: its first step is then about linear
  # in them (gain lr / eps = 10), so the params compare the gradients. At eps 1e-8 an entry
  # with |g| ~ eps turns f32 round-off (~1e-10) into ~2e-6 of parameter.
  trainer = Trainer(CFG, OptConfig(lr=1e-3, eps=1e-4), mesh, g)
  ref = LogProbs(CFG, g, mesh).make_ref(params)
  b = dataclasses.replace(rollout(n=16, seed=5, ref=False, group=4), truncated=None)
  pk, stats = pack_rollout(b, g, rows_multiple=2)
  assert stats["pack/shared_prompt_tokens"] > 0
  out = {}
  for name, batch in (("padded", b), ("packed", pk)):  # put_batch: one sequence a row
    state = trainer.init_state(jax.tree.map(jnp.copy, params))
    state, metrics = trainer.rl_step(state, trainer.put_batch(batch), ref)
    out[name] = (jax.device_get(state.params), jax.device_get(metrics))
  (p_pad, m_pad), (p_pk, m_pk) = out["padded"], out["packed"]
  keys = ("loss", "grad_norm", "kl", "entropy", "tokens", "clip_frac_low",
          *(("is_weight_mean", "is_capped_frac") if overlap else ()))
  for key in keys:
    np.testing.assert_allclose(m_pk[key], m_pad[key], rtol=2e-5, atol=1e-7, err_msg=key)
  for a, e in zip(jax.tree.leaves(p_pk), jax.tree.leaves(p_pad)):
    np.testing.assert_allclose(a, e, atol=1e-7)
  assert trainer.compiled_rl_shapes() == 2


def test_row_buckets_bound_shapes_and_padding_rows():
  from r1jax.train.packing import _bucket
  for multiple in (1, 2, 8):
    sizes = {_bucket(r, multiple) for r in range(1, 1025)}
    assert all(s % multiple == 0 for s in sizes)
    assert len(sizes) <= 8 + 4 * 7  # 1–8, then 4 per doubling up to 1024
    for r in range(1, 1025):
      b = _bucket(r, multiple)
      assert r <= b and (b - r < multiple or (b - r) / r < 0.25)


def test_lane_slots_pair_rows_of_similar_length():
  """A micro-batch's rows spread over `lanes` devices in contiguous blocks and attend one row
  per device at a time: the rank-th longest rows share a step, and every slot is used once."""
  from r1jax.train.packing import _lane_slot
  for rows, lanes in ((8, 2), (12, 4), (6, 1), (6, 4)):
    slots = [_lane_slot(r, rows, lanes) for r in range(rows)]
    assert sorted(slots) == list(range(rows))
    if rows % lanes == 0:
      steps = rows // lanes
      for rank, slot in enumerate(slots):  # step = offset in its block = rank // lanes
        assert slot % steps == rank // lanes and slot // steps == rank % lanes


@pytest.mark.parametrize("share", [False, True], ids=["own_prompts", "shared_prompts"])
def test_the_index_puts_packed_values_back_in_place(share):
  """`pack_rollout`'s index maps each packed completion column to its (sample, token): the
  packed old logp and tokens, put back by it, are the batch's own at every completion token
  and 0 elsewhere (what the reference's packed logprobs rely on)."""
  g = GRPOConfig(minibatches=2, microbatches=2, share_prompts=share)
  b = rollout(n=16, seed=2, group=4)
  index: list = []
  pk, _ = pack_rollout(b, g, row_len=24, rows_multiple=2, index=index)
  (idx,) = index
  assert idx.shape == pk.tokens.shape and idx.dtype == np.int64
  comp = np.asarray(b.completion_mask)
  assert np.array_equal(np.sort(idx[idx >= 0]), np.flatnonzero(comp.reshape(-1)))
  back = unpack_completions(pk.old_logp, idx, *comp.shape)
  np.testing.assert_array_equal(back, np.where(comp, b.old_logp, 0))
  tokens = unpack_completions(pk.tokens.astype(np.float32), idx, *comp.shape)
  np.testing.assert_array_equal(tokens[comp], np.asarray(b.tokens)[:, -comp.shape[1]:][comp])
