"""The batch types the update steps consume, built on the host and laid out on the mesh once.

Builders here are host numpy: everything between a rollout and its update (rewards,
advantages, group selection) is bookkeeping on the host, and `put_batch` places the finished
batch on the mesh in one transfer. Rows go over the (data, fsdp) axes as far as a micro-batch
divides, so splitting a batch into M mini-batches × A micro-batches (`split_rows`) moves no
data between devices. Dimension letters: see r1jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.core import attention, multihost, sharding
from r1jax.core.config import ModelConfig
from r1jax.generation.engine import Samples

log = logging.getLogger(__name__)
_WARNED: set = set()  # (rows, devices) already logged


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RolloutBatch:
  """One GRPO batch, rows grouped [prompt0 × G, prompt1 × G, …]; a row is Q = S + T tokens."""

  tokens: Any  # (N, Q) int32: left-padded prompt (S) then right-padded completion (T)
  mask: Any  # (N, Q) bool: real token, False on padding (positions derive from it)
  completion_mask: Any  # (N, T) bool: real completion token, stop token included
  old_logp: Any  # (N, T) f32: the sampler's logp of each completion token
  advantages: Any  # (N,) f32: from train/advantages.py
  truncated: Any = None  # (N,) bool: hit T without a stop (grpo.mask_truncated)
  ref_logp: Any = None  # (N, T) f32 reference logp; None: the step computes it


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedRollout:
  """A padding-free GRPO batch (built by train/packing.py): (N, Q) arrays. Column j of the
  per-token fields describes token j as predicted from token j − 1 (column 0 never is)."""

  tokens: Any  # (N, Q) int32
  positions: Any  # (N, Q) int32: position within its own sequence
  segment_ids: Any  # (N, Q) int32: 1, 2, … per sequence in the row; 0 = padding
  loss_mask: Any  # (N, Q) bool: a completion token the loss counts
  weights: Any  # (N, Q) f32: its weight in the mini-batch's Σ w·ℓ (0 off the mask)
  old_logp: Any  # (N, Q) f32: the sampler's logp of the token
  advantages: Any  # (N, Q) f32: its sample's advantage
  ref_logp: Any = None  # (N, Q) f32 reference logp, or None
  # (N, Q) int32: 0 on a segment's shared prompt prefix, k on sample k's own tokens (the
  # last prompt token, copied, then its completion); None: one sample per segment.
  sample_ids: Any = None

  @property
  def mask(self):
    """Real tokens (attention); the padded batch's `mask`."""
    return self.segment_ids > 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SFTBatch:
  """Next-token prediction on packed or padded sequences of T tokens."""

  tokens: Any  # (N, T) int32
  mask: Any  # (N, T) bool: real token (attention), False on padding
  loss_mask: Any  # (N, T) bool: token j is a target (predicted from tokens < j)
  positions: Any = None  # (N, T) int32 per-document positions (packed rows)
  segment_ids: Any = None  # (N, T) int32 document per token, 0 = padding (packed)
  # Logit distillation (SFT on a teacher's generate output with output.top_k_logprobs):
  top_ids: Any = None  # (N, T, k) int32: the teacher's k likeliest tokens for token j
  top_logprobs: Any = None  # (N, T, k) f32: their teacher log-probs
  teacher_mask: Any = None  # (N, T) bool: token j has a teacher record


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairBatch:
  """Preference pairs for a Bradley–Terry reward model, right-padded to T tokens."""

  chosen: Any  # (B, T) int32: prompt + preferred response
  chosen_mask: Any  # (B, T) bool
  rejected: Any  # (B, T) int32: prompt + dispreferred response
  rejected_mask: Any  # (B, T) bool

  @property
  def tokens(self):  # rows for the layout rules: the chosen side's
    return self.chosen


# ---------------------------------------------------------------------------- host builders


def rollout_batch(samples: Samples, advantages_N: np.ndarray,
                  ref_logp_NxT: np.ndarray | None = None) -> RolloutBatch:
  """Prompt (repeated G times) + completion rows of one set of samples, on the host."""
  g = samples.group
  prompt_NxS = np.repeat(samples.prompt_tokens, g, axis=0)
  pmask_NxS = np.repeat(samples.prompt_mask, g, axis=0)
  return RolloutBatch(
      tokens=np.concatenate([prompt_NxS, samples.tokens], axis=1),
      mask=np.concatenate([pmask_NxS, samples.mask], axis=1),
      completion_mask=samples.mask, old_logp=samples.logprobs,
      advantages=np.asarray(advantages_N, np.float32), truncated=samples.truncated,
      ref_logp=ref_logp_NxT)


def pad_prompts(batch: RolloutBatch, width: int) -> RolloutBatch:
  """Left-pads the prompt part to `width` total columns (rollouts differ in S)."""
  extra = width - batch.tokens.shape[1]
  if extra == 0:
    return batch
  pad = lambda x: np.pad(x, ((0, 0), (extra, 0)))
  return dataclasses.replace(batch, tokens=pad(batch.tokens), mask=pad(batch.mask))


def select_rows(batch: Any, rows: np.ndarray) -> Any:
  """The batch restricted to host row indices `rows`."""
  return jax.tree.map(lambda x: x[rows], batch)


def concat(batches: list[Any]) -> Any:
  """Row-wise concatenation of same-typed host batches (prompts padded to one width first)."""
  if isinstance(batches[0], RolloutBatch):
    width = max(b.tokens.shape[1] for b in batches)
    batches = [pad_prompts(b, width) for b in batches]
  return jax.tree.map(lambda *xs: np.concatenate(xs), *batches)


# ------------------------------------------------------------------------------ mesh layout


def check_batch(batch: Any, rows_per_split: int) -> None:
  """Clear errors for inconsistent shapes, before anything is traced."""
  if batch.tokens.ndim != 2:
    raise ValueError(f"batch.tokens must be (N, T), got shape {tuple(batch.tokens.shape)}")
  n, width = batch.tokens.shape
  want: dict[str, tuple] = {}
  if isinstance(batch, RolloutBatch):
    t = batch.completion_mask.shape[-1]
    if batch.completion_mask.ndim != 2 or not 1 <= t < width:
      raise ValueError(f"completion_mask {batch.completion_mask.shape} must be (N, T), "
                       f"T < Q={width}")
    want.update(mask=(n, width), completion_mask=(n, t), old_logp=(n, t), advantages=(n,),
                truncated=(n,), ref_logp=(n, t))
  elif isinstance(batch, PackedRollout):
    want.update({k: (n, width) for k in ("positions", "segment_ids", "loss_mask", "weights",
                                         "old_logp", "advantages", "ref_logp", "sample_ids")})
  elif isinstance(batch, SFTBatch):
    want.update({k: (n, width) for k in ("mask", "loss_mask", "positions", "segment_ids",
                                         "teacher_mask")})
    if batch.top_ids is not None:
      k = batch.top_ids.shape[-1]
      want.update(top_ids=(n, width, k), top_logprobs=(n, width, k))
      if batch.top_logprobs is None or batch.teacher_mask is None:
        raise ValueError("a distillation batch needs top_ids, top_logprobs and teacher_mask")
  else:
    want.update({k: (n, width) for k in ("chosen_mask", "rejected", "rejected_mask")})
  for name, shape in want.items():
    x = getattr(batch, name)
    if x is not None and tuple(x.shape) != shape:
      raise ValueError(f"batch.{name} has shape {tuple(x.shape)}, expected {shape}")
  if n % rows_per_split:
    raise ValueError(f"batch of {n} rows does not split into {rows_per_split} "
                     "(mini-batches × micro-batches)")


def row_axes(rows_per_micro: int, mesh: Mesh) -> tuple:
  """Mesh axes for the row dim: the batch axes that divide a micro-batch."""
  return tuple(sharding.batch_spec(1, rows_per_micro, mesh))


def _row_lanes(rows_per_micro: int, mesh: Mesh) -> int:
  """Devices a micro-batch's rows spread over."""
  out = 1
  for entry in row_axes(rows_per_micro, mesh):
    for axis in (entry,) if isinstance(entry, str) else entry or ():
      out *= mesh.shape[axis]
  return out


# Walking packed rows one per device a step (attention.windowed_attention) bounds the
# live scores at long rows; below this many bytes of one block's scores for all of a
# device's rows, one step over all rows is faster (tiny_r1's SFT step on XLA:CPU: ~7 %).
ALL_ROWS_BYTES = 64 << 20


def attention_plan(rows: dict[str, jax.Array], mesh: Mesh,
                   cfg: ModelConfig) -> attention.AttentionPlan:
  """How one micro-batch's rows attend: real tokens (`mask`, or packed rows' segment ids > 0),
  packed segments and shared-prompt samples, in query blocks of `cfg.attention_block`. Packed
  rows walk one per device they spread over (each device takes one row per step), unless one
  block's scores for all of a device's rows stay under ALL_ROWS_BYTES."""
  seg = rows.get("segment_ids")
  valid = rows["mask"] if "mask" in rows else seg > 0
  b, t = rows["tokens"].shape
  lanes = _row_lanes(b, mesh)
  scores = b // lanes * cfg.heads * min(cfg.attention_block or t, t) * t * 4
  return attention.plan(valid, seg, rows.get("sample_ids"), block=cfg.attention_block,
                        lanes=None if scores <= ALL_ROWS_BYTES else lanes)


def batch_shardings(batch: Any, splits: int, mesh: Mesh) -> Any:
  """Shardings for a batch split `splits` ways: rows over the batch axes that divide."""
  row = row_axes(batch.tokens.shape[0] // splits, mesh)
  return jax.tree.map(
      lambda x: NamedSharding(mesh, PartitionSpec(*row, *[None] * (x.ndim - 1))), batch)


def put_batch(batch: Any, splits: int, mesh: Mesh) -> Any:
  """Host batch → the mesh in one transfer, laid out for a step that splits it `splits` ways.

  With several processes the batch is this process's rows, and the global batch is every
  process's in process order (core/multihost.py `to_global`: each sends only its own rows)."""
  check_batch(batch, splits)
  count = jax.process_count()
  if count == 1:
    _warn_if_replicated(batch.tokens.shape[0] // splits, mesh)
    return jax.device_put(batch, batch_shardings(batch, splits, mesh))
  whole = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * count, *x.shape[1:]),
                                                      x.dtype), batch)
  return multihost.to_global(batch, batch_shardings(whole, splits, mesh))


def _warn_if_replicated(rows: int, mesh: Mesh) -> None:
  """Rows of a micro-batch that the batch axes do not divide run on fewer lanes, each row
  computed on several devices: logged once per shape, never silent (with several processes
  it is an error: multihost.to_global)."""
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  lanes = _row_lanes(rows, mesh)
  if lanes < devices and (rows, devices) not in _WARNED:
    _WARNED.add((rows, devices))
    log.warning("%d rows per micro-batch do not divide over the %d devices of the batch axes: "
                "they spread over %d, each row computed %d times; use a multiple of %d rows",
                rows, devices, lanes, devices // lanes, devices)


def split_rows(x: jax.Array, m: int, a: int, mesh: Mesh) -> jax.Array:
  """(N, ...) → (M, A, n, ...): row i·M·A + j·A + l goes to mini-batch j, micro-batch l.

  Each micro-batch is thus spread evenly over the devices that hold contiguous row blocks.
  """
  n = x.shape[0] // (m * a)
  x = jnp.moveaxis(x.reshape(n, m, a, *x.shape[1:]), 0, 2)
  spec = PartitionSpec(None, None, *row_axes(n, mesh), *[None] * (x.ndim - 3))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
