"""The policy's jitted updates on a mesh: GRPO, SFT and distillation losses fed to the one
shared update (train/update.py).

One `Trainer.rl_step(state, batch, ref_params)` consumes one rollout batch, as packed rows
(`Trainer.pack`: tightly packed, or one sequence a row; train/packing.py):
1. Reference logprobs: where train/logprobs.py's RefSource says — the batch's (computed
   beside the rollout), one no-grad forward of `ref_params` per micro-batch, or none (β = 0).
2. Old logprobs: the sampler's, so μ = 1 still has a real ratio (it measures
   sampler/trainer mismatch) — or the pre-update policy's if configured.
3. Split: N rows → M mini-batches × A micro-batches of n rows (batches.split_rows).
4. μ passes × M mini-batches, each one `UpdateStep` with the GRPO loss Σ w·ℓ: exact
   mini-batch gradients, clipping, the non-finite skip and the step count.
`sft_step` is the same update with the masked next-token loss. Every metric comes back
per optimizer update, shape (μ·M,), with no host sync.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.core import checkpoint, model
from r1jax.core.config import GRPOConfig, ModelConfig, OptConfig
from r1jax.train import batches as batches_lib
from r1jax.train import losses, packing
from r1jax.train.logprobs import nograd_logprobs
from r1jax.train.batches import PackedRollout, RolloutBatch, SFTBatch
from r1jax.train.state import (ScheduleInputs, TrainState, init_state, make_optimizer,
                               schedule_inputs, state_shardings)
from r1jax.train.update import UpdateStep, jit_donated

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SFTSettings:
  """How `sft_step` runs: micro-batches per update, logit chunk, distillation's KL weight."""

  microbatches: int = 1
  chunk: int = 128  # positions per logits chunk (losses.chunked_logprobs)
  kd_weight: float = 0.5  # distillation batches: w·KL_topk + (1 − w)·CE

  def __post_init__(self):
    if self.microbatches < 1 or self.chunk < 1:
      raise ValueError(f"sft microbatches and chunk must be >= 1, got {self.microbatches}, "
                       f"{self.chunk}")
    if not 0.0 <= self.kd_weight <= 1.0:
      raise ValueError(f"kd_weight must be in [0, 1], got {self.kd_weight}")


class Trainer:
  """Train state construction and the jitted policy updates (GRPO, SFT, distillation), for one
  model and mesh. `grpo` configures `rl_step`, `sft` configures `sft_step`."""

  def __init__(self, model_cfg: ModelConfig, opt_cfg: OptConfig, mesh: Mesh,
               grpo: GRPOConfig | None = None, sft: SFTSettings = SFTSettings()):
    self.cfg, self.opt, self.grpo, self.sft, self.mesh = model_cfg, opt_cfg, grpo, sft, mesh
    self.tx = make_optimizer(opt_cfg)  # its tree; the updates build it from self.sched
    self.sched = schedule_inputs(opt_cfg)
    self._rep = NamedSharding(mesh, PartitionSpec())
    abstract = checkpoint.abstract_params(model_cfg, mesh)
    self.param_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    self.state_shardings = state_shardings(self.tx, abstract, self.param_shardings, mesh)
    self.update = UpdateStep(opt_cfg, self.param_shardings)
    self.init_state = jax.jit(lambda p: init_state(self.tx, p),
                              in_shardings=(self.param_shardings,),
                              out_shardings=self.state_shardings, donate_argnums=0)
    self.init_state.__doc__ = "TrainState from params (donated: the state owns them now)."
    self.init_state_random = jax.jit(
        lambda key: init_state(self.tx, model.init_params(model_cfg, key)),
        out_shardings=self.state_shardings)
    self._cache: dict[tuple, Callable] = {}

  # --- batches -------------------------------------------------------------

  def _splits(self, batch: Any) -> tuple[int, int]:
    """(M, A): mini-batches and micro-batches this batch type is split into."""
    if isinstance(batch, (RolloutBatch, PackedRollout)):
      if self.grpo is None:
        raise ValueError("a GRPO batch needs a Trainer built with a GRPOConfig")
      return self.grpo.minibatches, self.grpo.microbatches
    return 1, self.sft.microbatches

  def batch_shardings(self, batch: Any) -> Any:
    """Shardings for a batch: rows over (data, fsdp) as far as a micro-batch divides."""
    return batches_lib.batch_shardings(batch, math.prod(self._splits(batch)), self.mesh)

  def pack(self, batch: RolloutBatch) -> tuple[PackedRollout, dict[str, float]]:
    """The host rows the update trains on, and packing stats: samples packed tightly
    (`grpo.pack`) or one sequence a row; the loss and gradient are the same either way."""
    self._splits(batch)  # needs a GRPOConfig
    if self.grpo.pack:
      return packing.pack_rollout(batch, self.grpo, self.grpo.pack_len, self.rows_multiple)
    return packing.one_per_row(batch, self.grpo), {}

  def put_batch(self, batch: Any) -> Any:
    """A host batch → the mesh, laid out for its step, in one transfer (single-host). A
    RolloutBatch goes as one sequence a row (`pack` chooses the layout the RL loop uses)."""
    splits = math.prod(self._splits(batch))  # a clear error for a batch this trainer cannot run
    if isinstance(batch, RolloutBatch):
      batch = packing.one_per_row(batch, self.grpo)
    return batches_lib.put_batch(batch, splits, self.mesh)

  def _split(self, x: jax.Array, m: int, a: int) -> jax.Array:
    return batches_lib.split_rows(x, m, a, self.mesh)

  def _jit_step(self, name: str, fn: Callable, batch: Any, *arg_shardings: Any):
    """A donated step for this batch layout and these extra arguments (cached per shapes)."""
    key = (name, jax.tree.structure(batch),
           tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(batch)),
           tuple(a is None for a in arg_shardings))
    if key not in self._cache:
      self._cache[key] = jit_donated(fn, self.state_shardings,
                                     (self.batch_shardings(batch), *arg_shardings), self._rep,
                                     self.sched)
    return self._cache[key]

  # --- steps ---------------------------------------------------------------

  def rl_step(self, state: TrainState, batch: PackedRollout,
              ref_params: model.Params | None = None) -> tuple[TrainState, Metrics]:
    """μ·M GRPO updates on one placed batch of packed rows (`put_batch`); the state is donated.

    The reference's logprobs are the batch's, or computed here from `ref_params`
    (train/logprobs.py, RefSource.UPDATE), or absent at β = 0."""
    if not isinstance(batch, PackedRollout):
      raise TypeError(f"rl_step takes packed rows (Trainer.pack / put_batch), got "
                      f"{type(batch).__name__}")
    m, a = self._splits(batch)
    batches_lib.check_batch(batch, m * a)
    if batch.ref_logp is not None and ref_params is not None:
      raise ValueError("the reference's logprobs come from the batch or from ref_params, "
                       "not both")
    if self.grpo.beta and batch.ref_logp is None and ref_params is None:
      raise ValueError("grpo.beta > 0 needs ref_params or batch.ref_logp")
    return self.rl_program(batch, ref_params is not None)(state, batch, ref_params)

  def rl_program(self, batch: PackedRollout, with_ref: bool):
    """The jitted GRPO update `rl_step` runs for this batch layout (concrete or abstract
    rows: an ahead-of-time compile lowers it), with or without the reference's params."""
    return self._jit_step("rl", self._rl_update, batch,
                          self.param_shardings if with_ref else None)

  @property
  def rows_multiple(self) -> int:
    """Devices the rows of a micro-batch spread over: packed row counts round up to it."""
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  def compiled_rl_shapes(self) -> int:
    """How many RL step shapes compiled so far (packed row counts add shapes)."""
    return sum(1 for key in self._cache if key[0] == "rl")

  def sft_step(self, state: TrainState, batch: SFTBatch) -> tuple[TrainState, Metrics]:
    """One optimizer update on the masked next-token loss; the state is donated."""
    batches_lib.check_batch(batch, self.sft.microbatches)
    return self.sft_program(batch)(state, batch)

  def sft_program(self, batch: SFTBatch):
    """The jitted update `sft_step` runs for this batch layout (concrete or abstract)."""
    return self._jit_step("sft", self._sft_update, batch)

  @property
  def _prox_forward(self) -> bool:
    """Decoupled loss over several updates: the starting policy's logprobs need their own
    forward pass (with one update they are the loss's own, detached: `_prox`)."""
    g = self.grpo
    return g.decoupled and g.mu * g.minibatches > 1

  def _prox(self, x: dict, logp: jax.Array) -> jax.Array | None:
    """The decoupled loss's starting-policy logprobs for this micro-batch, or None."""
    if not self.grpo.decoupled:
      return None
    return x["prox_logp"] if "prox_logp" in x else jax.lax.stop_gradient(logp)

  def _rl_update(self, state: TrainState, batch: PackedRollout, ref_params: Any,
                 sched: ScheduleInputs):
    """μ passes × M mini-batches, each one update over its A micro-batches. The packer's
    weights already hold each mini-batch's denominator, so micro-batch losses sum to it."""
    g, cfg = self.grpo, self.cfg
    m, a = g.minibatches, g.microbatches
    mb = {f.name: self._split(getattr(batch, f.name), m, a)
          for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None}
    if ref_params is not None:
      mb["ref_logp"] = nograd_logprobs(ref_params, cfg, g, mb, self.mesh)
    if self._prox_forward:
      mb["prox_logp"] = nograd_logprobs(state.params, cfg, g, mb, self.mesh)

    def micro_loss(params, x):
      logp, ent = losses.token_logprobs_and_entropy(
          params, cfg, x["tokens"], batches_lib.attention_plan(x, self.mesh, cfg), 1,
          g.temperature, g.logits_chunk, x["positions"])
      y = {k: v[:, 1:] for k, v in x.items()}  # aligned with the scored tokens
      loss, sums = losses.grpo_loss(logp, y["old_logp"], y["advantages"], y["loss_mask"],
                                    y["weights"], g, y.get("ref_logp"), self._prox(y, logp))
      sums["entropy"] = jnp.sum(jnp.where(y["loss_mask"], ent, 0.0))
      return loss, sums

    def update(state, mini):
      state, loss, sums, metrics = self.update(state, mini, micro_loss, sched)
      return state, losses.grpo_metrics(loss, sums, metrics)

    state, metrics = jax.lax.scan(lambda st, _: jax.lax.scan(update, st, mb), state, None,
                                  length=g.mu)
    return state, jax.tree.map(lambda v: v.reshape(-1), metrics)

  def _sft_update(self, state: TrainState, batch: SFTBatch, sched: ScheduleInputs):
    a = self.sft.microbatches
    micro = {name: self._split(getattr(batch, name), 1, a)[0]
             for name in ("tokens", "mask", "loss_mask", "positions", "segment_ids", "top_ids",
                          "top_logprobs", "teacher_mask")
             if getattr(batch, name) is not None}
    ntok = jnp.sum(batch.loss_mask[:, 1:], dtype=jnp.float32)
    micro["denom"] = jnp.broadcast_to(jnp.maximum(ntok, 1.0), (a,))

    def micro_loss(params, x):
      plan = batches_lib.attention_plan(x, self.mesh, self.cfg)
      if "top_ids" in x:
        return losses.distill_loss(
            params, self.cfg, x["tokens"], plan, x["loss_mask"], x["top_ids"],
            x["top_logprobs"], x["teacher_mask"], self.sft.kd_weight, x["denom"], self.sft.chunk,
            x.get("positions"))
      return losses.sft_loss(params, self.cfg, x["tokens"], plan, x["loss_mask"], x["denom"],
                             self.sft.chunk, x.get("positions"))

    state, loss, sums, metrics = self.update(state, micro, micro_loss, sched)
    ntok = jnp.maximum(sums["tokens"], 1.0)
    metrics.update(loss=loss, tokens=sums["tokens"], nll=sums["nll"] / ntok)
    if "entropy" in sums:
      metrics.update(entropy=sums["entropy"] / ntok)
    if "kl" in sums:
      metrics.update(kd_kl=sums["kl"] / jnp.maximum(sums["kd_tokens"], 1.0))
    return state, metrics
