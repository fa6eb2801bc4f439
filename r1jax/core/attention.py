"""Attention of uncached sequences in query blocks, and the packed-row masks.

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

_NEG_INF = -1e30  # finite, so a fully masked (padding) query row stays NaN-free
# Query blocks per sequence at most: every block (and window) is its own code in the
# compiled step. At 8k tokens, 33 blocks of 256 with 7 windows each took the update's peak
# memory, compilation included, to 4.8 GB; 16 blocks with 4 windows: 3.3 GB.
MAX_BLOCKS = 16


def softmax_attention(q_BxTxKxJxh, k_BxKxXxh, v_BxKxhxX, mask_BxTxX):
  """softmax(q·kᵀ/√h, masked)·v for one block of queries against every key."""
  hd = q_BxTxKxJxh.shape[-1]
  s_BxKxJxTxX = jnp.einsum("btkgh,bksh->bkgts", q_BxTxKxJxh, k_BxKxXxh,
                           preferred_element_type=jnp.float32) / math.sqrt(hd)
  s_BxKxJxTxX = jnp.where(mask_BxTxX[:, None, None], s_BxKxJxTxX, _NEG_INF)
  p_BxKxJxTxX = jax.nn.softmax(s_BxKxJxTxX, axis=-1).astype(v_BxKxhxX.dtype)
  return jnp.einsum("bkgts,bkhs->btkgh", p_BxKxJxTxX, v_BxKxhxX,
                    preferred_element_type=jnp.float32).astype(v_BxKxhxX.dtype)


@dataclasses.dataclass(frozen=True)
class QueryBlocks:
  """The mask of an uncached sequence, kept as its (B, T) parts for `blocked_attention`:
  which keys are real, and (packed rows) each token's segment. Causality is by index."""

  valid_BxT: jax.Array
  segment_ids_BxT: jax.Array | None
  size: int  # most queries per block
  lanes: int | None = None  # packed rows attend `lanes` at a time (None: all together)
  sample_ids_BxT: jax.Array | None = None  # shared prompts in packed rows (`same_sequence`)


def blocked_attention(q_BxTxKxJxh, k_BxKxXxh, v_BxKxhxX, blocks: QueryBlocks):
  """The same attention, one block of queries at a time under remat: the live scores are
  (B, heads, block, keys) instead of (B, heads, T, T), in the forward and the backward,
  and no (B, T, T) mask is ever built. A block attends only to the keys up to its last
  query (causality), so the work is about half of T² for many blocks. Long sequences
  (the update at 8k tokens, packed rows of R1-length completions) need it. Packed rows
  (segment ids) go further: `windowed_attention`."""
  b, t = q_BxTxKxJxh.shape[:2]
  nb = min(-(-t // blocks.size), MAX_BLOCKS)
  c = -(-t // nb)  # equal blocks of at most `size` queries (more past MAX_BLOCKS · size)
  if blocks.segment_ids_BxT is not None:
    return windowed_attention(q_BxTxKxJxh, k_BxKxXxh, v_BxKxhxX, blocks, c)

  def one(q_BxTxKxJxh, k_BxKxXxh, v_BxKxhxX, valid_BxX, lo, hi):
    # Keys [0, hi): this block's queries and every earlier token. Sliced in here, so the
    # backward keeps the full k / v once, not a copy of each block's prefix.
    return softmax_attention(q_BxTxKxJxh, k_BxKxXxh[:, :, :hi], v_BxKxhxX[..., :hi],
                              _block_mask(valid_BxX, None, None, None, None, lo, 0, hi))

  outs = []
  for lo in range(0, t, c):
    hi = min(t, lo + c)
    outs.append(jax.checkpoint(one, static_argnums=(4, 5))(
        q_BxTxKxJxh[:, lo:hi], k_BxKxXxh, v_BxKxhxX, blocks.valid_BxT, lo, hi))
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


def _block_mask(valid_BxX, seg_BxT, seg_BxX, sample_BxT, sample_BxX, lo: int, klo: int,
                hi: int) -> jax.Array:
  """(B, T, Y) mask of queries [lo, hi) over keys [klo, hi): causal, real, same sequence."""
  query_T = lo + jnp.arange(hi - lo)
  key_Y = klo + jnp.arange(hi - klo)
  mask_BxTxY = (key_Y[None, :] <= query_T[:, None])[None] & valid_BxX[:, None, klo:hi]
  if seg_BxT is not None:
    mask_BxTxY &= same_sequence(seg_BxT, seg_BxX[:, klo:hi], sample_BxT,
                                None if sample_BxX is None else sample_BxX[:, klo:hi])
  return mask_BxTxY


WINDOW_STEPS = 3  # narrow windows per block (c, 2c, 4c), then all of [0, hi)


def _windows(c: int, hi: int) -> tuple[int, ...]:
  """Key windows a query block ending at `hi` may use: c, 2c, 4c and then all of [0, hi).
  Few on purpose: every branch of every block is compiled (see MAX_BLOCKS)."""
  out = [c << i for i in range(WINDOW_STEPS) if c << i < hi]
  return (*out, hi)


def windowed_attention(q_BxTxKxJxh, k_BxKxXxh, v_BxKxhxX, blocks: QueryBlocks, c: int):
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
  seg_BxT, valid_BxT = blocks.segment_ids_BxT, blocks.valid_BxT
  lanes = b if not blocks.lanes or b % blocks.lanes else blocks.lanes
  steps = b // lanes
  index_T = jnp.arange(t)
  first_BxT = jnp.concatenate([jnp.ones((b, 1), bool), seg_BxT[:, 1:] != seg_BxT[:, :-1]], 1)
  start_BxT = jax.lax.cummax(jnp.where(first_BxT, index_T, 0), axis=1)
  start_BxT = jnp.where(valid_BxT, start_BxT, index_T)  # padding needs only its own block
  # (B, ...) -> (I, Z, ...): step i holds rows i, i + I, …, one per device (Z lanes).
  by_step = lambda x: x.reshape(lanes, steps, *x.shape[1:]).swapaxes(0, 1)
  k_IxZxKxXxh, v_IxZxKxhxX = by_step(k_BxKxXxh), by_step(v_BxKxhxX)
  valid_IxZxT, seg_IxZxT = by_step(valid_BxT), by_step(seg_BxT)
  sample_BxT = blocks.sample_ids_BxT
  sample_IxZxT = None if sample_BxT is None else by_step(sample_BxT)

  outs = []
  for lo in range(0, t, c):
    hi = min(t, lo + c)
    widths = _windows(hi - lo, hi)
    need_I = jnp.max(by_step(hi - jnp.min(start_BxT[:, lo:hi], axis=1)), axis=1)
    which_I = jnp.searchsorted(jnp.asarray(widths), need_I)

    def branch(klo, q, k, v, valid, seg, sample, lo=lo, hi=hi):
      mask = _block_mask(valid, seg[:, lo:hi], seg, None if sample is None else sample[:, lo:hi],
                         sample, lo, klo, hi)
      return softmax_attention(q, k[:, :, klo:hi], v[..., klo:hi], mask)

    def step(xs, widths=widths, hi=hi, branch=branch):
      which, *args = xs
      return jax.lax.switch(which, [functools.partial(branch, hi - w) for w in widths], *args)

    o_IxZxTxKxJxh = jax.lax.map(jax.checkpoint(step), (
        which_I, by_step(q_BxTxKxJxh[:, lo:hi]), k_IxZxKxXxh, v_IxZxKxhxX, valid_IxZxT,
        seg_IxZxT, sample_IxZxT))
    outs.append(o_IxZxTxKxJxh.swapaxes(0, 1).reshape(b, hi - lo, *o_IxZxTxKxJxh.shape[3:]))
  return jnp.concatenate(outs, axis=1)
