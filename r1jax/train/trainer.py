"""The policy's jitted steps on a mesh: GRPO and SFT losses fed to the one shared update.

One `Trainer.rl_step(state, batch, ref_params)` consumes one rollout batch:
1. Reference logprobs: the batch's, if the RL loop precomputed them (with
   `Trainer.rollout_logprobs`, overlapping the host rewards); else one no-grad
   forward of the reference params per micro-batch; none at all when β = 0.
2. Old logprobs: the sampler's, so μ = 1 still has a real ratio (it measures
   sampler/trainer mismatch) — or the pre-update policy's if configured.
3. Split: N rows → M mini-batches × A micro-batches of n rows (batches.split_rows).
4. μ passes × M mini-batches, each one `UpdateStep` (train/update.py) with the GRPO
   loss: exact mini-batch gradients, clipping, the non-finite skip and the step count.
`sft_step` is the same update with the masked next-token loss. Every metric comes back
per optimizer update, shape (μ·M,), with no host sync.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.core import model, sharding
from r1jax.core.config import GRPOConfig, ModelConfig, OptConfig
from r1jax.generation.sampler import Rollout
from r1jax.train import batches as batches_lib
from r1jax.train import losses
from r1jax.train.batches import PackedRollout, RolloutBatch, SFTBatch
from r1jax.train.state import TrainState, init_state, lr_schedule, make_optimizer, state_shardings
from r1jax.train.update import UpdateStep, jit_donated

Metrics = dict[str, jax.Array]


class Trainer:
  """Train state construction and the jitted steps, for one policy model and mesh."""

  def __init__(self, model_cfg: ModelConfig, opt_cfg: OptConfig, mesh: Mesh,
               grpo_cfg: GRPOConfig | None = None, sft_microbatches: int = 1,
               sft_chunk: int = 128, kd_weight: float = 0.5):
    self.cfg, self.opt, self.grpo, self.mesh = model_cfg, opt_cfg, grpo_cfg, mesh
    self.sft_microbatches, self.sft_chunk = int(sft_microbatches), int(sft_chunk)
    if not 0.0 <= kd_weight <= 1.0:
      raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
    self.kd_weight = float(kd_weight)  # distillation batches: w·KL_topk + (1 − w)·CE
    self.tx = make_optimizer(opt_cfg)
    self.schedule = lr_schedule(opt_cfg)
    self._rep = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(lambda: model.init_params(model_cfg, jax.random.key(0)))
    self.param_shardings = sharding.tree_shardings(model.param_axes(model_cfg), abstract, mesh)
    self.state_shardings = state_shardings(self.tx, abstract, self.param_shardings, mesh)
    self.update = UpdateStep(self.tx, self.schedule, self.param_shardings)
    self.init_state = jax.jit(lambda p: init_state(self.tx, p),
                              in_shardings=(self.param_shardings,),
                              out_shardings=self.state_shardings, donate_argnums=0)
    self.init_state.__doc__ = "TrainState from params (donated: the state owns them now)."
    self.init_state_random = jax.jit(
        lambda key: init_state(self.tx, model.init_params(model_cfg, key)),
        out_shardings=self.state_shardings)
    self._cache: dict[Any, Callable] = {}

  # --- reference -----------------------------------------------------------

  def make_ref(self, params: model.Params) -> model.Params:
    """A copy of params in grpo.ref_dtype: the frozen reference (never donated)."""
    dtype = jnp.dtype(self.grpo.ref_dtype if self.grpo else "float32")
    if "make_ref" not in self._cache:
      # An explicit copy: jit would otherwise forward the policy's own buffers,
      # which the next (donating) step invalidates.
      self._cache["make_ref"] = jax.jit(
          lambda p: jax.tree.map(lambda a: jnp.copy(a).astype(dtype), p),
          in_shardings=(self.param_shardings,), out_shardings=self.param_shardings)
    return self._cache["make_ref"](params)

  def maybe_reset_ref(self, ref_params: Any, state: TrainState, iteration: int) -> Any:
    """The reference, replaced by the policy every grpo.ref_reset_every RL iterations."""
    every = self.grpo.ref_reset_every if self.grpo else 0
    if ref_params is None:  # β = 0: there is no reference to reset
      return None
    if every and iteration > 0 and iteration % every == 0:
      return self.make_ref(state.params)
    return ref_params

  # --- batches -------------------------------------------------------------

  def _splits(self, batch: Any) -> tuple[int, int]:
    """(M, A): mini-batches and micro-batches this batch type is split into."""
    if isinstance(batch, (RolloutBatch, PackedRollout)):
      if self.grpo is None:
        raise ValueError("rl_step needs a Trainer built with a GRPOConfig")
      return self.grpo.minibatches, self.grpo.microbatches
    return 1, self.sft_microbatches

  def batch_shardings(self, batch: Any) -> Any:
    """Shardings for a batch: rows over (data, fsdp) as far as a micro-batch divides."""
    return batches_lib.batch_shardings(batch, math.prod(self._splits(batch)), self.mesh)

  def put_batch(self, batch: Any) -> Any:
    """A host batch → the mesh, laid out for its step, in one transfer (single-host)."""
    return batches_lib.put_batch(batch, math.prod(self._splits(batch)), self.mesh)

  def _split(self, x: jax.Array, m: int, a: int) -> jax.Array:
    return batches_lib.split_rows(x, m, a, self.mesh)

  def _jit_step(self, name: str, fn: Callable, batch: Any, ref_is_none: bool = True):
    """A donated step for this batch layout (cached per shapes)."""
    key = (name, jax.tree.structure(batch),
           tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(batch)), ref_is_none)
    if key not in self._cache:
      args = (self.batch_shardings(batch),)
      if name == "rl":
        args += (None if ref_is_none else self.param_shardings,)
      self._cache[key] = jit_donated(fn, self.state_shardings, args, self._rep)
    return self._cache[key]

  # --- steps ---------------------------------------------------------------

  def rl_step(self, state: TrainState, batch: RolloutBatch | PackedRollout,
              ref_params: model.Params | None = None) -> tuple[TrainState, Metrics]:
    """μ·M GRPO updates on one rollout batch, padded or packed (train/packing.py), laid out
    by `put_batch`; the state is donated."""
    m, a = self._splits(batch)
    batches_lib.check_batch(batch, m * a)
    if self.grpo.beta and batch.ref_logp is None and ref_params is None:
      raise ValueError("grpo.beta > 0 needs ref_params or batch.ref_logp")
    if not self.grpo.beta and batch.ref_logp is None:
      ref_params = None  # β = 0: the reference is never run
    packed = isinstance(batch, PackedRollout)
    step = self._jit_step("rl", self._rl_update_packed if packed else self._rl_update, batch,
                          ref_params is None)
    return step(state, batch, ref_params)

  @property
  def rows_multiple(self) -> int:
    """Devices the rows of a micro-batch spread over: packed row counts round up to it."""
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  def compiled_rl_shapes(self) -> int:
    """How many RL step shapes compiled so far (packed row counts add shapes)."""
    return sum(1 for key in self._cache if key[0] == "rl")

  def sft_step(self, state: TrainState, batch: SFTBatch) -> tuple[TrainState, Metrics]:
    """One optimizer update on the masked next-token loss; the state is donated."""
    batches_lib.check_batch(batch, self.sft_microbatches)
    return self._jit_step("sft", self._sft_update, batch)(state, batch)

  def logprobs(self, params: model.Params, batch: RolloutBatch) -> jax.Array:
    """Teacher-forced (N, T) logp of the completions, micro-batch by micro-batch, no grad."""
    m, a = self._splits(batch)
    batches_lib.check_batch(batch, m * a)
    key = ("logp", jax.tree.structure(batch),
           tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(batch)))
    if key not in self._cache:
      t = batch.completion_mask.shape[1]
      out = NamedSharding(self.mesh, PartitionSpec(
          *batches_lib.row_axes(batch.tokens.shape[0] // (m * a), self.mesh), None))
      self._cache[key] = jax.jit(
          lambda p, b: self._logprobs(p, b.tokens, b.mask, t, m, a),
          in_shardings=(self.param_shardings, self.batch_shardings(batch)), out_shardings=out)
    return self._cache[key](params, batch)

  def rollout_logprobs(self, params: model.Params, rollout: Rollout, group: int) -> jax.Array:
    """(N, T) logp of a sampler Rollout's completions (device arrays in, device array out).

    The RL loop dispatches this for the reference right after sampling, so the device runs it
    while the host scores; the rows never leave the mesh on the way.
    """
    m, a = self.grpo.minibatches, self.grpo.microbatches
    n, t = rollout.tokens.shape
    key = ("rollout_logp", tuple(rollout.prompt_tokens.shape), n, t, group)
    if key not in self._cache:
      row = batches_lib.row_axes(n // (m * a), self.mesh)
      out = NamedSharding(self.mesh, PartitionSpec(*row, None))

      def fn(p, r: Rollout):
        tokens = jnp.concatenate([jnp.repeat(r.prompt_tokens, group, axis=0), r.tokens], axis=1)
        mask = jnp.concatenate([jnp.repeat(r.prompt_mask, group, axis=0), r.mask], axis=1)
        tokens, mask = (jax.lax.with_sharding_constraint(x, NamedSharding(
            self.mesh, PartitionSpec(*row, None))) for x in (tokens, mask))
        return self._logprobs(p, tokens, mask, t, m, a)

      self._cache[key] = jax.jit(fn, out_shardings=out)
    return self._cache[key](params, rollout)

  def _logprobs(self, params, tokens, mask, t: int, m: int, a: int):
    tok, msk = (self._split(x, m, a) for x in (tokens, mask))
    logp = self._nograd_logp(params, tok, msk, t)
    return jnp.moveaxis(logp, 2, 0).reshape(tokens.shape[0], -1)

  def _nograd_logp(self, params, tokens_MxAxn, mask_MxAxn, t: int) -> jax.Array:
    """(M, A, n, T) completion logp, one micro-batch at a time (bounded logits memory)."""
    g = self.grpo
    s = tokens_MxAxn.shape[-1] - t
    ma = tokens_MxAxn.shape[:2]
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    logp = jax.lax.map(
        lambda xs: losses.token_logprobs(params, self.cfg, xs[0], xs[1], s, g.temperature,
                                         g.logits_chunk),
        (flat(tokens_MxAxn), flat(mask_MxAxn)))
    return jax.lax.stop_gradient(logp.reshape(*ma, *logp.shape[1:]))

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

  def _rl_update(self, state: TrainState, batch: RolloutBatch, ref_params: Any):
    g, cfg = self.grpo, self.cfg
    m, a = g.minibatches, g.microbatches
    t = batch.completion_mask.shape[1]
    s = batch.tokens.shape[1] - t
    split = lambda x: None if x is None else self._split(x, m, a)
    mb = {"tokens": split(batch.tokens), "mask": split(batch.mask),
          "loss_mask": split(losses.effective_mask(batch.completion_mask, batch.truncated, g)),
          "old_logp": split(batch.old_logp), "adv": split(batch.advantages),
          "ref_logp": split(batch.ref_logp)}
    if mb["ref_logp"] is None and ref_params is not None:
      mb["ref_logp"] = self._nograd_logp(ref_params, mb["tokens"], mb["mask"], t)
    if self._prox_forward:
      mb["prox_logp"] = self._nograd_logp(state.params, mb["tokens"], mb["mask"], t)
    mb = {name: x for name, x in mb.items() if x is not None}

    def micro_loss(params, x):
      logp, ent = losses.token_logprobs_and_entropy(params, cfg, x["tokens"], x["mask"], s,
                                                    g.temperature, g.logits_chunk)
      loss, sums = losses.grpo_loss(logp, x["old_logp"], x["adv"], x["loss_mask"], g,
                                    x.get("ref_logp"), x["denom"], self._prox(x, logp))
      sums["entropy"] = jnp.sum(jnp.where(x["loss_mask"], ent, 0.0))
      return loss, sums

    def update(state, mini):  # one mini-batch: (A, n, ...) leaves
      denom = losses.loss_denominator(mini["loss_mask"].reshape(-1, t), g.loss_mode)
      mini = dict(mini, denom=jnp.broadcast_to(denom, (a,)))
      state, loss, sums, metrics = self.update(state, mini, micro_loss)
      return state, losses.grpo_metrics(loss, sums, metrics)

    state, metrics = jax.lax.scan(lambda st, _: jax.lax.scan(update, st, mb), state, None,
                                  length=g.mu)
    return state, jax.tree.map(lambda v: v.reshape(-1), metrics)

  def _packed_nograd_logp(self, params, mb: dict) -> jax.Array:
    """(M, A, n, L) logp of packed tokens (column 0 zero), micro-batch by micro-batch."""
    g = self.grpo
    ma = mb["tokens"].shape[:2]
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    lanes = batches_lib.row_lanes(mb["tokens"].shape[2], self.mesh)
    logp = jax.lax.map(
        lambda xs: losses.packed_logprobs_and_entropy(params, self.cfg, *xs[:3], g.temperature,
                                                      g.logits_chunk, lanes, xs[3])[0],
        (flat(mb["tokens"]), flat(mb["positions"]), flat(mb["segment_ids"]),
         None if "sample_ids" not in mb else flat(mb["sample_ids"])))
    logp = jnp.pad(logp, ((0, 0), (0, 0), (1, 0)))
    return jax.lax.stop_gradient(logp.reshape(*ma, *logp.shape[1:]))

  def _rl_update_packed(self, state: TrainState, batch: PackedRollout, ref_params: Any):
    """`_rl_update` on packed rows: the packer's weights already hold each mini-batch's
    denominator, so micro-batch losses sum to the mini-batch's as on the padded path."""
    g, cfg = self.grpo, self.cfg
    m, a = g.minibatches, g.microbatches
    fields = ("tokens", "positions", "segment_ids", "sample_ids", "loss_mask", "weights",
              "old_logp", "advantages", "ref_logp")
    mb = {k: self._split(getattr(batch, k), m, a) for k in fields
          if getattr(batch, k) is not None}
    if "ref_logp" not in mb and ref_params is not None:
      mb["ref_logp"] = self._packed_nograd_logp(ref_params, mb)
    if self._prox_forward:
      mb["prox_logp"] = self._packed_nograd_logp(state.params, mb)

    lanes = batches_lib.row_lanes(mb["tokens"].shape[2], self.mesh)

    def micro_loss(params, x):
      logp, ent = losses.packed_logprobs_and_entropy(
          params, cfg, x["tokens"], x["positions"], x["segment_ids"], g.temperature,
          g.logits_chunk, lanes, x.get("sample_ids"))
      y = {k: v[:, 1:] for k, v in x.items()}  # aligned with the scored tokens
      loss, sums = losses.packed_grpo_loss(logp, y["old_logp"], y["advantages"],
                                           y["loss_mask"], y["weights"], g, y.get("ref_logp"),
                                           self._prox(y, logp))
      sums["entropy"] = jnp.sum(jnp.where(y["loss_mask"], ent, 0.0))
      return loss, sums

    def update(state, mini):
      state, loss, sums, metrics = self.update(state, mini, micro_loss)
      return state, losses.grpo_metrics(loss, sums, metrics)

    state, metrics = jax.lax.scan(lambda st, _: jax.lax.scan(update, st, mb), state, None,
                                  length=g.mu)
    return state, jax.tree.map(lambda v: v.reshape(-1), metrics)

  def _sft_update(self, state: TrainState, batch: SFTBatch):
    a = self.sft_microbatches
    micro = {name: self._split(getattr(batch, name), 1, a)[0]
             for name in ("tokens", "mask", "loss_mask", "positions", "segment_ids", "top_ids",
                          "top_logprobs", "teacher_mask")
             if getattr(batch, name) is not None}
    ntok = jnp.sum(batch.loss_mask[:, 1:], dtype=jnp.float32)
    micro["denom"] = jnp.broadcast_to(jnp.maximum(ntok, 1.0), (a,))
    lanes = batches_lib.row_lanes(micro["tokens"].shape[1], self.mesh)

    def micro_loss(params, x):
      if "top_ids" in x:
        return losses.distill_loss(
            params, self.cfg, x["tokens"], x["mask"], x["loss_mask"], x["top_ids"],
            x["top_logprobs"], x["teacher_mask"], self.kd_weight, x["denom"], self.sft_chunk,
            x.get("positions"), x.get("segment_ids"), lanes)
      return losses.sft_loss(params, self.cfg, x["tokens"], x["mask"], x["loss_mask"],
                             x["denom"], self.sft_chunk, x.get("positions"),
                             x.get("segment_ids"), lanes)

    state, loss, sums, metrics = self.update(state, micro, micro_loss)
    ntok = jnp.maximum(sums["tokens"], 1.0)
    metrics.update(loss=loss, tokens=sums["tokens"], nll=sums["nll"] / ntok)
    if "entropy" in sums:
      metrics.update(entropy=sums["entropy"] / ntok)
    if "kl" in sums:
      metrics.update(kd_kl=sums["kl"] / jnp.maximum(sums["kd_tokens"], 1.0))
    return state, metrics
