"""How a batch attends: the attention plan, and attention of uncached sequences in query blocks.

`plan` decides once per batch shape how the model attends: the (B, T) parts of the mask
(real tokens, packed segments, shared-prompt samples), whether queries go in blocks and of
what size, how many packed rows walk side by side (the devices they spread over), and how
many narrow key windows a block may pick from. `cached_plan` is the one-piece plan of a
chunk against a KV cache. The model hands every layer's q, k, v and the plan to `attend`,
the one place a kernel (a TPU or GPU fused attention) plugs in. Keys are slot-minor
(B, K, h, X) and values slot-major (B, K, X, h), cached or not.

`softmax_attention` is one block of queries against its keys. `blocked_attention` walks
a long sequence one block of queries at a time under remat, so the (T, T) scores are never
live; on packed rows (segment ids) `windowed_attention` also narrows each block's keys to
the window its sequences can see. `same_sequence` is the packed-row visibility rule,
prompts shared by a group's samples included. Dimension letters: r1jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from r1jax.core import decode_attention, kernels

_NEG_INF = -1e30  # finite, so a fully masked (padding) query row stays NaN-free
ATTENTION_BLOCK = 256  # uncached sequences longer than this attend in query blocks of it
# Query blocks per sequence at most: every block (and window) is its own code in the
# compiled step. At 8k tokens, 33 blocks of 256 with 7 windows each took the update's peak
# memory, compilation included, to 4.8 GB; 16 blocks with 4 windows: 3.3 GB.
MAX_BLOCKS = 16
WINDOW_STEPS = 3  # narrow windows per block (c, 2c, 4c), then all of [0, hi)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["valid_BxT", "segment_ids_BxT", "sample_ids_BxT", "mask_BxTxX"],
                   meta_fields=["block", "lanes", "windows", "cached"])
@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  """Who attends to whom in one batch, and how the work is cut (a pytree; the cut is static).

  One piece (`block` 0): `mask_BxTxX` is the whole mask. Query blocks of `block`: the mask
  stays in its (B, T) parts (causality is by index). Packed rows walk `lanes` at a time,
  each block over the narrowest of `windows` key windows (then all keys) that covers it."""

  valid_BxT: jax.Array  # the batch's real tokens (queries; without a cache, the keys too)
  segment_ids_BxT: jax.Array | None = None  # packed rows: each token's sequence (0: padding)
  sample_ids_BxT: jax.Array | None = None  # shared prompts in packed rows (`same_sequence`)
  mask_BxTxX: jax.Array | None = None  # the whole mask, when attention runs in one piece
  block: int = 0  # most queries per block (0: one piece)
  lanes: int | None = None  # packed rows attended side by side (None: all of them)
  windows: int = WINDOW_STEPS  # narrow key windows per block (c, 2c, …) before all keys
  cached: bool = False  # queries against a KV cache's slots (`cached_plan`)


def plan(valid_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None,
         sample_ids_BxT: jax.Array | None = None, *, block: int | None = None,
         lanes: int | None = None, windows: int = WINDOW_STEPS) -> AttentionPlan:
  """The plan of uncached rows: token j attends to the real tokens i <= j of its own sequence
  (its segment and, where samples share a prompt, the prompt and its own sample). Rows longer
  than `block` (default ATTENTION_BLOCK; 0 = never) attend one block of queries at a time, so
  memory grows as T·block, not T²; packed rows then walk `lanes` at a time (pass the devices
  the rows spread over; None: all rows together)."""
  if sample_ids_BxT is not None and segment_ids_BxT is None:
    raise ValueError("sample_ids subdivide packed segments: pass segment_ids too")
  if (lanes is not None and lanes < 1) or windows < 0:
    raise ValueError(f"lanes must be >= 1 and windows >= 0, got {lanes}, {windows}")
  valid_BxT = valid_BxT.astype(bool)
  t = valid_BxT.shape[1]
  block = ATTENTION_BLOCK if block is None else block
  if block and t > block:
    return AttentionPlan(valid_BxT, segment_ids_BxT, sample_ids_BxT, None, block, lanes, windows)
  mask_BxTxX = jnp.tril(jnp.ones((t, t), bool))[None] & valid_BxT[:, None, :]
  if segment_ids_BxT is not None:
    mask_BxTxX &= same_sequence(segment_ids_BxT, segment_ids_BxT, sample_ids_BxT,
                                sample_ids_BxT)
  return AttentionPlan(valid_BxT, segment_ids_BxT, sample_ids_BxT, mask_BxTxX, 0, lanes,
                       windows)


def cached_plan(valid_BxT: jax.Array, slots_BxX: jax.Array, index: jax.Array) -> AttentionPlan:
  """The one-piece plan of a chunk written at cache slot `index`: each query attends to every
  valid slot up to its own (`slots_BxX`: the cache's valid slots, the chunk's included)."""
  t = valid_BxT.shape[1]
  slot_X = jnp.arange(slots_BxX.shape[1])
  causal_TxX = slot_X[None, :] <= index + jnp.arange(t)[:, None]
  return AttentionPlan(valid_BxT.astype(bool), mask_BxTxX=causal_TxX[None] & slots_BxX[:, None],
                       cached=True)


def attend(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh, plan: AttentionPlan, impl: str = "xla"):
  """softmax(q·kᵀ/√h)·v under the plan, keys slot-minor and values slot-major (the KV
  cache's layout, model.KVCache): by a fused kernel (`impl`, core/kernels.py; uncached rows
  without shared prompts; with splash, a decode step against the cache by
  core/decode_attention.py), in one piece, or in query blocks."""
  kernel, interpret = kernels.choose(impl)
  if plan.cached:
    if (kernel == "splash" and q_BxTxKxJxh.shape[1] == 1
        and decode_attention.fits(k_BxKxhxX.shape[3])):
      return decode_attention.decode_attention(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh,
                                               plan.mask_BxTxX[:, 0], interpret)
    return softmax_attention(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh, plan.mask_BxTxX)
  if kernel != "xla" and plan.sample_ids_BxT is None:
    return kernels.fused_attention(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh, plan.valid_BxT,
                                   plan.segment_ids_BxT, kernel, interpret)
  if plan.block:
    return blocked_attention(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh, plan)
  return softmax_attention(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh, plan.mask_BxTxX)


def softmax_attention(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh, mask_BxTxX):
  """softmax(q·kᵀ/√h, masked)·v for one block of queries against every key. Each kv head's
  T·J queries (TJ) are the rows of two plain matmuls, (TJ, h)·(h, X) and (TJ, X)·(X, h):
  on XLA:CPU 1.8x faster than contracting h and X as the minor dims of both operands, forward
  and backward, at 256 queries x 1,024 keys, and 1.5-2x at a decode step (model.KVCache)."""
  b, t, kv, g, hd = q_BxTxKxJxh.shape
  q_BxKxTJxh = q_BxTxKxJxh.transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, hd)
  s_BxKxTJxX = jnp.einsum("bkqh,bkhs->bkqs", q_BxKxTJxh, k_BxKxhxX,
                          preferred_element_type=jnp.float32) / math.sqrt(hd)
  s_BxKxTxJxX = s_BxKxTJxX.reshape(b, kv, t, g, -1)
  s_BxKxTxJxX = jnp.where(mask_BxTxX[:, None, :, None], s_BxKxTxJxX, _NEG_INF)
  p_BxKxTJxX = jax.nn.softmax(s_BxKxTxJxX, axis=-1).astype(v_BxKxXxh.dtype).reshape(
      b, kv, t * g, -1)
  o_BxKxTJxh = jnp.einsum("bkqs,bksh->bkqh", p_BxKxTJxX, v_BxKxXxh,
                          preferred_element_type=jnp.float32).astype(v_BxKxXxh.dtype)
  return o_BxKxTJxh.reshape(b, kv, t, g, hd).transpose(0, 2, 1, 3, 4)


def blocked_attention(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh, plan: AttentionPlan):
  """The same attention, one block of queries at a time under remat: the live scores are
  (B, heads, block, keys) instead of (B, heads, T, T), in the forward and the backward,
  and no (B, T, T) mask is ever built. A block attends only to the keys up to its last
  query (causality), so the work is about half of T² for many blocks. Long sequences
  (the update at 8k tokens, packed rows of R1-length completions) need it. Packed rows
  (segment ids) go further: `windowed_attention`."""
  b, t = q_BxTxKxJxh.shape[:2]
  nb = min(-(-t // plan.block), MAX_BLOCKS)
  c = -(-t // nb)  # equal blocks of at most `block` queries (more past MAX_BLOCKS · block)
  if plan.segment_ids_BxT is not None:
    return windowed_attention(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh, plan, c)

  def one(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh, valid_BxX, lo, hi):
    # Keys [0, hi): this block's queries and every earlier token. Sliced in here, so the
    # backward keeps the full k / v once, not a copy of each block's prefix.
    return softmax_attention(q_BxTxKxJxh, k_BxKxhxX[..., :hi], v_BxKxXxh[:, :, :hi],
                              _block_mask(valid_BxX, lo, 0, hi))

  outs = []
  for lo in range(0, t, c):
    hi = min(t, lo + c)
    outs.append(jax.checkpoint(one, static_argnums=(4, 5))(
        q_BxTxKxJxh[:, lo:hi], k_BxKxhxX, v_BxKxXxh, plan.valid_BxT, lo, hi))
  return jnp.concatenate(outs, axis=1)


def same_sequence(seg_BxT, seg_BxY, sample_BxT=None, sample_BxY=None) -> jax.Array:
  """(B, T, Y): may query t see key y in a packed row? Both in the same segment, and, where
  sample ids are given (prompts shared by a group's samples), the key is in the segment's
  shared prefix (sample 0) or in the query's own sample."""
  same_BxTxY = seg_BxT[:, :, None] == seg_BxY[:, None, :]
  if sample_BxT is not None:
    key_BxTxY = sample_BxY[:, None, :]
    same_BxTxY &= (key_BxTxY == 0) | (key_BxTxY == sample_BxT[:, :, None])
  return same_BxTxY


def _block_mask(valid_BxX, lo: int, klo: int, hi: int, seg_BxX=None,
                sample_BxX=None) -> jax.Array:
  """(B, T, Y) mask of queries [lo, hi) over keys [klo, hi): causal, real and (packed rows,
  `seg` / `sample` over all X positions) in the same sequence."""
  query_T = lo + jnp.arange(hi - lo)
  key_Y = klo + jnp.arange(hi - klo)
  mask_BxTxY = (key_Y[None, :] <= query_T[:, None])[None] & valid_BxX[:, None, klo:hi]
  if seg_BxX is not None:
    cut = lambda x, a, b: None if x is None else x[:, a:b]
    mask_BxTxY &= same_sequence(seg_BxX[:, lo:hi], seg_BxX[:, klo:hi], cut(sample_BxX, lo, hi),
                                cut(sample_BxX, klo, hi))
  return mask_BxTxY


def _windows(c: int, hi: int, steps: int) -> tuple[int, ...]:
  """Key windows a query block ending at `hi` may use: c, 2c, … (`steps` of them) and then all
  of [0, hi). Few on purpose: every branch of every block is compiled (see MAX_BLOCKS)."""
  out = [c << i for i in range(steps) if c << i < hi]
  return (*out, hi)


def windowed_attention(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh, plan: AttentionPlan, c: int):
  """Blocked attention on packed rows, each query block over only the keys its sequences
  can see.

  A query sees keys from its own sequence's first token on. A block of queries [lo, hi)
  therefore needs the keys [s, hi), s = the first token of the block's earliest sequence;
  the keys before s belong to other sequences, which the mask would discard. The rows are
  walked `lanes` at a time (one per device the rows are spread over, so each device takes
  one row per step). Each step, a `lax.switch` picks the narrowest static window [hi − w, hi)
  (w = c, 2c, 4c or hi) that covers the step's rows, so a block of short sequences costs a
  few c × c tiles instead of c × hi. Same math as the full block: the masked keys carry zero
  weight in either form. Segments must be contiguous runs of a row (as packing writes them);
  a segment holding a shared prompt and its samples is one run, from the prompt on.
  """
  b, t = q_BxTxKxJxh.shape[:2]
  seg_BxT, valid_BxT = plan.segment_ids_BxT, plan.valid_BxT
  lanes = b if not plan.lanes or b % plan.lanes else plan.lanes
  steps = b // lanes
  index_T = jnp.arange(t)
  first_BxT = jnp.concatenate([jnp.ones((b, 1), bool), seg_BxT[:, 1:] != seg_BxT[:, :-1]], 1)
  start_BxT = jax.lax.cummax(jnp.where(first_BxT, index_T, 0), axis=1)
  start_BxT = jnp.where(valid_BxT, start_BxT, index_T)  # padding needs only its own block
  # (B, ...) -> (I, Z, ...): step i holds rows i, i + I, …, one per device (Z lanes).
  by_step = lambda x: x.reshape(lanes, steps, *x.shape[1:]).swapaxes(0, 1)
  k_IxZxKxhxX, v_IxZxKxXxh = by_step(k_BxKxhxX), by_step(v_BxKxXxh)
  valid_IxZxT, seg_IxZxT = by_step(valid_BxT), by_step(seg_BxT)
  sample_BxT = plan.sample_ids_BxT
  sample_IxZxT = None if sample_BxT is None else by_step(sample_BxT)

  outs = []
  for lo in range(0, t, c):
    hi = min(t, lo + c)
    widths = _windows(hi - lo, hi, plan.windows)
    need_I = jnp.max(by_step(hi - jnp.min(start_BxT[:, lo:hi], axis=1)), axis=1)
    which_I = jnp.searchsorted(jnp.asarray(widths), need_I)

    def branch(klo, q, k, v, valid, seg, sample, lo=lo, hi=hi):
      mask = _block_mask(valid, lo, klo, hi, seg, sample)
      return softmax_attention(q, k[..., klo:hi], v[:, :, klo:hi], mask)

    def step(xs, widths=widths, hi=hi, branch=branch):
      which, *args = xs
      return jax.lax.switch(which, [functools.partial(branch, hi - w) for w in widths], *args)

    o_IxZxTxKxJxh = jax.lax.map(jax.checkpoint(step), (
        which_I, by_step(q_BxTxKxJxh[:, lo:hi]), k_IxZxKxhxX, v_IxZxKxXxh, valid_IxZxT,
        seg_IxZxT, sample_IxZxT))
    outs.append(o_IxZxTxKxJxh.swapaxes(0, 1).reshape(b, hi - lo, *o_IxZxTxKxJxh.shape[3:]))
  return jnp.concatenate(outs, axis=1)
