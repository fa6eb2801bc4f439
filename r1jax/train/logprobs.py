"""Log-probs without a gradient, and the frozen reference whose log-probs the KL term needs.

Where the reference's log-probs come from is decided once, at setup (`ref_source`):
- NONE: β = 0. No reference exists; nothing runs.
- ROLLOUT: once each rollout's samples are on the host, `LogProbs.of_batch` runs the
  reference on them, packed, on the device while the host scores; the batch carries the result.
- UPDATE: the update runs the reference itself (`nograd_logprobs` inside `Trainer.rl_step`).
  With `grpo.overlap` a rollout is sampled one step ahead, and the reference may be reset
  before the update that consumes it.
Every batch here is packed rows (train/packing.py); a padded batch is one sequence a row.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.core import checkpoint, model, multihost
from r1jax.core.sharding import MeshJit
from r1jax.core.config import GRPOConfig, ModelConfig
from r1jax.train import batches as batches_lib
from r1jax.train import losses, packing
from r1jax.train.batches import RolloutBatch


class RefSource(enum.Enum):
  NONE = "none"
  ROLLOUT = "rollout"
  UPDATE = "update"


def ref_source(grpo: GRPOConfig) -> RefSource:
  """The one decision: no reference at β = 0; in the update when rollouts run ahead."""
  if not grpo.beta:
    return RefSource.NONE
  return RefSource.UPDATE if grpo.overlap else RefSource.ROLLOUT


def nograd_logprobs(params: model.Params, cfg: ModelConfig, grpo: GRPOConfig,
                    mb: dict[str, jax.Array], mesh: Mesh) -> jax.Array:
  """(M, A, n, Q) logp of every token of split packed rows (column 0, which nothing predicts,
  is zero), one micro-batch at a time so one micro-batch's logits bound the memory."""
  ma = mb["tokens"].shape[:2]
  flat = lambda x: x.reshape(-1, *x.shape[2:])

  def one(x):
    return losses.token_logprobs_and_entropy(
        params, cfg, x["tokens"], batches_lib.attention_plan(x, mesh, cfg), 1,
        grpo.temperature, grpo.logits_chunk, x.get("positions"))[0]

  fields = ("tokens", "positions", "segment_ids", "sample_ids")
  logp = jax.lax.map(one, {k: flat(mb[k]) for k in fields if mb.get(k) is not None})
  logp = jnp.pad(logp, ((0, 0), (0, 0), (1, 0)))
  return jax.lax.stop_gradient(logp.reshape(*ma, *logp.shape[1:]))


@dataclasses.dataclass(frozen=True)
class PendingLogp:
  """Log-probs still being computed on packed rows, and how to put them back to (N, T)."""

  packed: jax.Array  # (R, Q) every packed token's logp, on the mesh
  index: np.ndarray  # (R, Q) the completion token each column holds (packing.pack_rollout)
  n: int
  t: int

  def get(self) -> np.ndarray:
    """Waits for the device; (N, T) f32, 0 past each completion's end."""
    return packing.unpack_completions(multihost.host_rows(self.packed), self.index, self.n,
                                      self.t)


class LogProbs:
  """Jitted no-grad log-probs and the reference's copy and reset, for one model and mesh."""

  def __init__(self, model_cfg: ModelConfig, grpo: GRPOConfig, mesh: Mesh):
    self.cfg, self.grpo, self.mesh = model_cfg, grpo, mesh
    self.param_shardings = jax.tree.map(lambda a: a.sharding,
                                        checkpoint.abstract_params(model_cfg, mesh))
    self._cache: dict[tuple, Callable] = {}

  def row_sharding(self, rows: int) -> NamedSharding:
    m, a = self.grpo.minibatches, self.grpo.microbatches
    return NamedSharding(self.mesh, PartitionSpec(
        *batches_lib.row_axes(rows // (m * a), self.mesh), None))

  def make_ref(self, params: model.Params) -> model.Params:
    """A copy of params in grpo.ref_dtype: the frozen reference (never donated)."""
    key = ("make_ref",)
    if key not in self._cache:
      dtype = jnp.dtype(self.grpo.ref_dtype)
      # An explicit copy: jit would otherwise forward the policy's own buffers,
      # which the next (donating) step invalidates.
      self._cache[key] = jax.jit(
          lambda p: jax.tree.map(lambda a: jnp.copy(a).astype(dtype), p),
          in_shardings=(self.param_shardings,), out_shardings=self.param_shardings)
    return self._cache[key](params)

  def reset_ref(self, ref: Any, params: model.Params, iteration: int) -> Any:
    """The reference, replaced by the policy every grpo.ref_reset_every RL iterations."""
    every = self.grpo.ref_reset_every
    if ref is None:  # β = 0: there is no reference to reset
      return None
    if every and iteration > 0 and iteration % every == 0:
      return self.make_ref(params)
    return ref

  def _split_logp(self, params, rows: dict[str, jax.Array]) -> jax.Array:
    m, a = self.grpo.minibatches, self.grpo.microbatches
    mb = {k: batches_lib.split_rows(v, m, a, self.mesh) for k, v in rows.items()
          if v is not None}
    logp = nograd_logprobs(params, self.cfg, self.grpo, mb, self.mesh)
    return jnp.moveaxis(logp, 2, 0).reshape(rows["tokens"].shape)

  def of_batch(self, params: model.Params, batch: RolloutBatch) -> PendingLogp:
    """The (N, T) logp of a host batch's completions under `params`, dispatched: its samples
    packed into rows as the update packs them (train/packing.py, whatever `grpo.pack` says:
    the values do not depend on the layout, and padding would cost as much compute as the
    tokens with R1's heavy-tailed lengths). The RL loop calls it for the reference once the
    samples are on the host, so the device runs it while the host scores; `.get()` waits."""
    index: list = []
    packed, _ = packing.pack_rollout(batch, self.grpo, self.grpo.pack_len,
                                     self.mesh.shape["data"] * self.mesh.shape["fsdp"], index)
    rows = {"tokens": packed.tokens, "positions": packed.positions,
            "segment_ids": packed.segment_ids, "sample_ids": packed.sample_ids}
    rows = {k: v for k, v in rows.items() if v is not None}
    whole = packed.tokens.shape[0] * jax.process_count()  # this process's rows: its block
    rows = multihost.to_global(rows, jax.tree.map(lambda _: self.row_sharding(whole), rows))
    n, t = batch.completion_mask.shape
    return PendingLogp(self.packed_program(rows)(params, rows), index[0], n, t)

  def packed_program(self, rows: dict[str, Any]) -> MeshJit:
    """The jitted program `of_batch` runs for packed rows of these shapes (concrete or
    abstract: an ahead-of-time compile lowers it): every token's logp, (R, Q)."""
    key = ("packed", tuple(sorted((k, v.shape) for k, v in rows.items())))
    if key not in self._cache:
      self._cache[key] = MeshJit(jax.jit(self._split_logp, out_shardings=self.row_sharding(
          rows["tokens"].shape[0])), self.mesh)
    return self._cache[key]
