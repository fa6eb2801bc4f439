"""A Pallas TPU kernel for one decode step against the KV cache (flash decoding).

Each decode step attends one new query per row to every valid slot of the row's cache. The
step is bound by reading the cache, so the kernel reads each (row, kv head)'s keys and values
once, in blocks of slots, and keeps the softmax online (running max, sum and weighted values
in f32 scratch), with the kv head's J query heads (GQA) as the rows of one matmul. It reads
the cache in the sampler's own layout (keys slot-minor, values slot-major: core/model.py
KVCache), so nothing is transposed or copied per step, and the mask is the plan's (valid
slots up to the current one).

Block: the largest of 512, 256, 128 slots that divides the cache. The sampler rounds its
caches up to a multiple of 128 slots where the kernel runs (`slot_multiple`); a cache that is
not (`fits`) keeps XLA's form. On a mesh the kernel runs under shard_map, rows and kv heads
split as in core/kernels.py. On CPU it runs in Pallas interpret mode (tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from r1jax.core import kernels, sharding

BLOCKS = (512, 256, 128)  # slots per block, the first that divides the cache
_SUBLANES = 8  # query rows padded to a whole sublane tile
_NEG = -1e30


def block_for(slots: int) -> int | None:
  """Slots per kernel block for a cache of `slots`, or None (XLA's form)."""
  return next((b for b in BLOCKS if slots % b == 0), None)


def fits(slots: int) -> bool:
  return block_for(slots) is not None


def slot_multiple(impl: str) -> int:
  """What a sampler rounds its cache's slot count up to, so that every decode step meets the
  kernel (`impl`: a model's `attention`, decided on the current context mesh): 128 where
  decode runs by this kernel (TPU), else 1."""
  return BLOCKS[-1] if kernels.choose(impl)[0] == "splash" else 1


def _kernel(mask_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc):
  """One (row, kv head, slot block): fold the block into the running softmax."""
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  q_Jxh = q_ref[0, 0]
  s_JxS = jax.lax.dot_general(q_Jxh, k_ref[0, 0], (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
  valid_1xS = mask_ref[0] > 0
  s_JxS = jnp.where(valid_1xS, s_JxS, _NEG)
  m_prev = m_sc[...]
  m_new = jnp.maximum(m_prev, jnp.max(s_JxS, axis=1, keepdims=True))
  p_JxS = jnp.where(valid_1xS, jnp.exp(s_JxS - m_new), 0.0)
  alpha = jnp.exp(m_prev - m_new)
  l_sc[...] = alpha * l_sc[...] + jnp.sum(p_JxS, axis=1, keepdims=True)
  v_Sxh = v_ref[0, 0]
  pv_Jxh = jax.lax.dot_general(p_JxS.astype(v_Sxh.dtype), v_Sxh, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
  acc_sc[...] = alpha * acc_sc[...] + pv_Jxh
  m_sc[...] = m_new

  @pl.when(step == pl.num_programs(2) - 1)
  def _out():  # a row with no valid slot (never read) divides by 1, not 0
    o_ref[0, 0] = (acc_sc[...] / jnp.maximum(l_sc[...], 1e-30)).astype(o_ref.dtype)


def _call(q_BxKxJxh, k_BxKxhxX, v_BxKxXxh, mask_Bx1xX, *, interpret: bool):
  """The pallas_call on one device's rows and kv heads."""
  b, kv, j, hd = q_BxKxJxh.shape
  slots = k_BxKxhxX.shape[3]
  blk = block_for(slots)
  grid = (b, kv, slots // blk)
  return pl.pallas_call(
      _kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=grid,
          in_specs=[pl.BlockSpec((1, 1, blk), lambda r, h, s: (r, 0, s)),
                    pl.BlockSpec((1, 1, j, hd), lambda r, h, s: (r, h, 0, 0)),
                    pl.BlockSpec((1, 1, hd, blk), lambda r, h, s: (r, h, 0, s)),
                    pl.BlockSpec((1, 1, blk, hd), lambda r, h, s: (r, h, s, 0))],
          out_specs=pl.BlockSpec((1, 1, j, hd), lambda r, h, s: (r, h, 0, 0)),
          scratch_shapes=[pltpu.VMEM((j, 1), jnp.float32), pltpu.VMEM((j, 1), jnp.float32),
                          pltpu.VMEM((j, hd), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q_BxKxJxh.shape, q_BxKxJxh.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(mask_Bx1xX, q_BxKxJxh, k_BxKxhxX, v_BxKxXxh)


def decode_attention(q_BxTxKxJxh, k_BxKxhxX, v_BxKxXxh, mask_BxX, interpret: bool):
  """softmax(q·kᵀ/√h)·v of one query a row (T = 1) over the cache's masked slots."""
  b, t, kv, g, hd = q_BxTxKxJxh.shape
  if t != 1:
    raise ValueError(f"decode_attention takes one query a row, got {t}")
  dtype = v_BxKxXxh.dtype
  j = -(-g // _SUBLANES) * _SUBLANES
  q_BxKxJxh = (q_BxTxKxJxh[:, 0] * (1.0 / math.sqrt(hd))).astype(dtype)
  q_BxKxJxh = jnp.pad(q_BxKxJxh, ((0, 0), (0, 0), (0, j - g), (0, 0)))
  mask_Bx1xX = mask_BxX.astype(jnp.int32)[:, None]
  run = functools.partial(_call, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:  # rows and kv heads split as the cache is (sharding.cache_shardings)
    rows = sharding.logical_to_spec(("batch",), (b,), mesh)[0]
    heads = sharding.logical_to_spec(("kv",), (kv,), mesh)[0]
    spec = P(rows, heads, None, None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None, None)),
                        out_specs=spec, check_vma=False)
  o_BxKxJxh = run(q_BxKxJxh, k_BxKxhxX.astype(dtype), v_BxKxXxh.astype(dtype), mask_Bx1xX)
  return o_BxKxJxh[:, None, :, :g]
