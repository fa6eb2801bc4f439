"""The sharded, donated GRPO and SFT train steps, and the state they update.

One `Trainer.rl_step(state, batch, ref_params)` consumes one rollout batch:
1. Reference logprobs: the batch's, if the RL loop precomputed them (with
   `Trainer.logprobs`, overlapping the host rewards); else one no-grad forward
   of the reference params per micro-batch; none at all when β = 0.
2. Old logprobs: the sampler's, so μ = 1 still has a real ratio (it measures
   sampler/trainer mismatch) — or the pre-update policy's if configured.
3. Split: N rows → M mini-batches × K micro-batches of n rows; row r goes to
   micro-batch r mod (M·K). Each micro-batch is thus spread evenly over the
   data-parallel devices that hold contiguous row blocks: no resharding.
4. μ passes × M mini-batches, each one optimizer update. A scan over the K
   micro-batches accumulates the exact mini-batch gradient, because every loss
   denominator is taken over the whole mini-batch first.
5. A non-finite loss or gradient leaves the state untouched (params, optimizer,
   step) and counts in metrics["skipped"]; it is never applied.
Every metric comes back per optimizer update, shape (μ·M,), with no host sync.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r1jax import losses, model, sharding
from r1jax.config import GRPOConfig, ModelConfig, OptConfig

Metrics = dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything one update changes."""

  params: model.Params  # sharded by model.param_axes
  opt_state: Any  # optax state: param-shaped leaves sharded like params, the rest replicated
  step: jax.Array  # () int32: optimizer updates applied (skipped ones excluded)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RolloutBatch:
  """One rollout, rows grouped [prompt0 × G, prompt1 × G, …] (S = P − T)."""

  tokens: jax.Array  # (N, P) int32: left-padded prompt (S) then right-padded completion (T)
  mask: jax.Array  # (N, P) bool: real token, False on padding (positions derive from it)
  completion_mask: jax.Array  # (N, T) bool: real completion token, stop token included
  old_logp: jax.Array  # (N, T) f32: the sampler's logp of each completion token
  advantages: jax.Array  # (N,) f32: from losses.group_advantages
  truncated: jax.Array | None = None  # (N,) bool: hit T without a stop (grpo.mask_truncated)
  ref_logp: jax.Array | None = None  # (N, T) f32 reference logp; None: the step computes it


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SFTBatch:
  """Next-token prediction on packed or padded sequences."""

  tokens: jax.Array  # (N, P) int32
  mask: jax.Array  # (N, P) bool: real token (attention), False on padding
  loss_mask: jax.Array  # (N, P) bool: token j is a target (predicted from tokens < j)
  positions: jax.Array | None = None  # (N, P) int32 per-document positions (packed rows)
  segment_ids: jax.Array | None = None  # (N, P) int32 document per token, 0 = padding (packed)


def lr_schedule(o: OptConfig) -> Callable[[jax.Array], jax.Array]:
  """lr(step): linear warmup lr·(step+1)/warmup, then constant or cosine to final_lr_ratio·lr."""

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    lr = o.lr * (jnp.minimum(1.0, (s + 1) / o.warmup_steps) if o.warmup_steps else 1.0)
    if o.schedule == "cosine":
      frac = jnp.clip((s - o.warmup_steps) / (o.total_steps - o.warmup_steps), 0.0, 1.0)
      lr = lr * (o.final_lr_ratio + (1 - o.final_lr_ratio) * 0.5 * (1 + jnp.cos(math.pi * frac)))
    return lr

  return schedule


def make_optimizer(o: OptConfig) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW (decay on matrices only: norms and biases excluded)."""

  def decay_mask(params):
    flat = model.flatten(params)
    return model.unflatten({n: "norm" not in n and "bias" not in n for n in flat})

  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity(),
      optax.scale_by_adam(o.b1, o.b2, o.eps),
      optax.add_decayed_weights(o.weight_decay, decay_mask) if o.weight_decay else optax.identity(),
      optax.scale_by_learning_rate(lr_schedule(o)))


def _check_batch(batch: Any, rows_per_split: int) -> None:
  """Clear errors for inconsistent shapes, before anything is traced."""
  if batch.tokens.ndim != 2:
    raise ValueError(f"batch.tokens must be (N, P), got shape {tuple(batch.tokens.shape)}")
  n, p = batch.tokens.shape
  want = {"mask": (n, p)}
  if isinstance(batch, RolloutBatch):
    t = batch.completion_mask.shape[-1]
    if batch.completion_mask.ndim != 2 or not 1 <= t < p:
      raise ValueError(f"completion_mask {batch.completion_mask.shape} must be (N, T), T < P={p}")
    want.update(completion_mask=(n, t), old_logp=(n, t), advantages=(n,), truncated=(n,),
                ref_logp=(n, t))
  else:
    want.update(loss_mask=(n, p), positions=(n, p), segment_ids=(n, p))
  for name, shape in want.items():
    x = getattr(batch, name)
    if x is not None and tuple(x.shape) != shape:
      raise ValueError(f"batch.{name} has shape {tuple(x.shape)}, expected {shape}")
  if n % rows_per_split:
    raise ValueError(f"batch of {n} rows does not split into {rows_per_split} "
                     "(mini-batches × micro-batches)")


class Trainer:
  """Train state construction and the jitted steps, for one model and mesh."""

  def __init__(self, model_cfg: ModelConfig, opt_cfg: OptConfig, mesh: Mesh,
               grpo_cfg: GRPOConfig | None = None, sft_microbatches: int = 1,
               sft_chunk: int = 128):
    self.cfg, self.opt, self.grpo, self.mesh = model_cfg, opt_cfg, grpo_cfg, mesh
    self.sft_microbatches, self.sft_chunk = int(sft_microbatches), int(sft_chunk)
    self.tx = make_optimizer(opt_cfg)
    self.schedule = lr_schedule(opt_cfg)
    self._rep = NamedSharding(mesh, P())
    abstract = jax.eval_shape(lambda: model.init_params(model_cfg, jax.random.key(0)))
    self.param_shardings = sharding.tree_shardings(model.param_axes(model_cfg), abstract, mesh)
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, abstract), self.param_shardings,
        transform_non_params=lambda _: self._rep)
    self.state_shardings = TrainState(self.param_shardings, opt_shardings, self._rep)
    self.init_state = jax.jit(self._init, in_shardings=(self.param_shardings,),
                              out_shardings=self.state_shardings, donate_argnums=0)
    self.init_state.__doc__ = "TrainState from params (donated: the state owns them now)."
    self.init_state_random = jax.jit(
        lambda key: self._init(model.init_params(model_cfg, key)),
        out_shardings=self.state_shardings)
    self._cache: dict[Any, Callable] = {}

  def _init(self, params: model.Params) -> TrainState:
    return TrainState(params, self.tx.init(params), jnp.zeros((), jnp.int32))

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
    if isinstance(batch, RolloutBatch):
      if self.grpo is None:
        raise ValueError("rl_step needs a Trainer built with a GRPOConfig")
      return self.grpo.minibatches, self.grpo.microbatches
    return 1, self.sft_microbatches

  def _row_spec(self, n_micro: int) -> tuple:
    """Mesh axes for the row dim: the batch axes that divide a micro-batch."""
    return tuple(sharding.batch_spec(1, n_micro, self.mesh))

  def batch_shardings(self, batch: Any) -> Any:
    """Shardings for a batch: rows over (data, fsdp) as far as a micro-batch divides."""
    m, k = self._splits(batch)
    row = self._row_spec(batch.tokens.shape[0] // (m * k))
    return jax.tree.map(lambda x: NamedSharding(self.mesh, P(*row, *[None] * (x.ndim - 1))),
                        batch)

  def put_batch(self, batch: Any) -> Any:
    """Host arrays → device, laid out for the step (single-host)."""
    _check_batch(batch, math.prod(self._splits(batch)))
    return jax.device_put(batch, self.batch_shardings(batch))

  def _split(self, x: jax.Array, m: int, k: int) -> jax.Array:
    """(N, ...) → (M, K, n, ...), row i·M·K + j·K + l in mini-batch j, micro-batch l."""
    n = x.shape[0] // (m * k)
    x = jnp.moveaxis(x.reshape(n, m, k, *x.shape[1:]), 0, 2)
    spec = P(None, None, *self._row_spec(n), *[None] * (x.ndim - 3))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def _jit(self, name: str, fn: Callable, batch: Any, state_arg: bool, ref_arg: bool,
           ref_is_none: bool = True) -> Callable:
    """fn jitted with explicit shardings for this batch layout (cached per shape)."""
    key = (name, jax.tree.structure(batch),
           tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(batch)), ref_is_none)
    if key not in self._cache:
      first = self.state_shardings if state_arg else self.param_shardings
      args = (first, self.batch_shardings(batch))
      if ref_arg:
        args += (None if ref_is_none else self.param_shardings,)
      if state_arg:  # a step: the state is donated and comes back in place
        out = (self.state_shardings, self._rep)
      else:  # logprobs (N, T), rows laid out like the batch
        n_micro = batch.tokens.shape[0] // math.prod(self._splits(batch))
        out = NamedSharding(self.mesh, P(*self._row_spec(n_micro), None))
      self._cache[key] = jax.jit(fn, in_shardings=args, out_shardings=out,
                                 donate_argnums=(0,) if state_arg else ())
    return self._cache[key]

  # --- steps ---------------------------------------------------------------

  def rl_step(self, state: TrainState, batch: RolloutBatch,
              ref_params: model.Params | None = None) -> tuple[TrainState, Metrics]:
    """μ·M GRPO updates on one rollout batch (laid out by `put_batch`); the state is donated."""
    m, k = self._splits(batch)
    _check_batch(batch, m * k)
    if self.grpo.beta and batch.ref_logp is None and ref_params is None:
      raise ValueError("grpo.beta > 0 needs ref_params or batch.ref_logp")
    if not self.grpo.beta and batch.ref_logp is None:
      ref_params = None  # β = 0: the reference is never run
    step = self._jit("rl", self._rl_update, batch, True, True, ref_params is None)
    return step(state, batch, ref_params)

  def sft_step(self, state: TrainState, batch: SFTBatch) -> tuple[TrainState, Metrics]:
    """One optimizer update on the masked next-token loss; the state is donated."""
    _check_batch(batch, self.sft_microbatches)
    return self._jit("sft", self._sft_update, batch, True, False)(state, batch)

  def logprobs(self, params: model.Params, batch: RolloutBatch) -> jax.Array:
    """Teacher-forced (N, T) logp of the completions, micro-batch by micro-batch, no grad."""
    m, k = self._splits(batch)
    _check_batch(batch, m * k)
    return self._jit("logp", self._logprobs, batch, False, False)(params, batch)

  def _logprobs(self, params, batch):
    m, k = self._splits(batch)
    tok, msk = (self._split(x, m, k) for x in (batch.tokens, batch.mask))
    logp = self._nograd_logp(params, tok, msk, batch.completion_mask.shape[1])
    return jnp.moveaxis(logp, 2, 0).reshape(batch.tokens.shape[0], -1)

  def _nograd_logp(self, params, tokens_MxKxnxP, mask_MxKxnxP, t: int) -> jax.Array:
    g = self.grpo
    s = tokens_MxKxnxP.shape[-1] - t
    mk = tokens_MxKxnxP.shape[:2]
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    logp = jax.lax.map(
        lambda xs: losses.token_logprobs(params, self.cfg, xs[0], xs[1], s, g.temperature,
                                         g.logits_chunk),
        (flat(tokens_MxKxnxP), flat(mask_MxKxnxP)))
    return jax.lax.stop_gradient(logp.reshape(*mk, *logp.shape[1:]))

  def _apply(self, state: TrainState, grads: Any, loss: jax.Array) -> tuple[TrainState, Metrics]:
    """One optimizer update, or none at all if the loss or gradient is not finite."""
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    new = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
    return new, {"grad_norm": grad_norm, "lr": self.schedule(state.step),
                 "skipped": (~ok).astype(jnp.int32)}

  def _accumulate(self, state: TrainState, loss_fn: Callable, micro: Any):
    """Σ over the leading (micro-batch) axis of loss_fn's value, grad and metric sums."""
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    zeros = jax.lax.with_sharding_constraint(zeros, self.param_shardings)

    def body(acc, mb):
      (loss, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params, mb)
      return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g), (loss, sums)

    grads, (loss_K, sums_K) = jax.lax.scan(body, zeros, micro)
    sums = {k: (jnp.min(v) if k == "ratio_min" else jnp.max(v) if k == "ratio_max"
                else jnp.sum(v)) for k, v in sums_K.items()}
    return grads, jnp.sum(loss_K), sums

  def _rl_update(self, state: TrainState, batch: RolloutBatch, ref_params: Any):
    g, cfg = self.grpo, self.cfg
    m, k = g.minibatches, g.microbatches
    t = batch.completion_mask.shape[1]
    s = batch.tokens.shape[1] - t
    split = lambda x: None if x is None else self._split(x, m, k)
    mb = {"tokens": split(batch.tokens), "mask": split(batch.mask),
          "loss_mask": split(losses.effective_mask(batch.completion_mask, batch.truncated, g)),
          "old_logp": split(batch.old_logp), "adv": split(batch.advantages),
          "ref_logp": split(batch.ref_logp)}
    if mb["ref_logp"] is None and ref_params is not None:
      mb["ref_logp"] = self._nograd_logp(ref_params, mb["tokens"], mb["mask"], t)
    if g.recompute_old_logp:
      mb["old_logp"] = self._nograd_logp(state.params, mb["tokens"], mb["mask"], t)
    mb = {name: x for name, x in mb.items() if x is not None}

    def micro_loss(params, x):
      logp, ent = losses.token_logprobs_and_entropy(params, cfg, x["tokens"], x["mask"], s,
                                                    g.temperature, g.logits_chunk)
      loss, sums = losses.grpo_loss(logp, x["old_logp"], x["adv"], x["loss_mask"], g,
                                    x.get("ref_logp"), x["denom"])
      sums["entropy"] = jnp.sum(jnp.where(x["loss_mask"], ent, 0.0))
      return loss, sums

    def update(state, mini):  # one mini-batch: (K, n, ...) leaves
      denom = losses.loss_denominator(mini["loss_mask"].reshape(-1, t), g.loss_mode)
      mini = dict(mini, denom=jnp.broadcast_to(denom, (k,)))
      grads, loss, sums = self._accumulate(state, micro_loss, mini)
      state, metrics = self._apply(state, grads, loss)
      tokens = jnp.maximum(sums["tokens"], 1.0)
      metrics.update({name: v / tokens for name, v in sums.items()
                      if name not in ("tokens", "ratio_min", "ratio_max")})
      metrics.update(loss=loss, tokens=sums["tokens"], ratio_min=sums["ratio_min"],
                     ratio_max=sums["ratio_max"], ratio_mean=metrics.pop("ratio"),
                     clip_frac_low=metrics.pop("clip_low"),
                     clip_frac_high=metrics.pop("clip_high"))
      if "clip_dual" in metrics:
        metrics["clip_frac_dual"] = metrics.pop("clip_dual")
      return state, metrics

    state, metrics = jax.lax.scan(lambda st, _: jax.lax.scan(update, st, mb), state, None,
                                  length=g.mu)
    return state, jax.tree.map(lambda v: v.reshape(-1), metrics)

  def _sft_update(self, state: TrainState, batch: SFTBatch):
    k = self.sft_microbatches
    micro = {name: self._split(getattr(batch, name), 1, k)[0]
             for name in ("tokens", "mask", "loss_mask", "positions", "segment_ids")
             if getattr(batch, name) is not None}
    ntok = jnp.sum(batch.loss_mask[:, 1:], dtype=jnp.float32)
    micro["denom"] = jnp.broadcast_to(jnp.maximum(ntok, 1.0), (k,))

    def micro_loss(params, x):
      return losses.sft_loss(params, self.cfg, x["tokens"], x["mask"], x["loss_mask"],
                             x["denom"], self.sft_chunk, x.get("positions"),
                             x.get("segment_ids"))

    grads, loss, sums = self._accumulate(state, micro_loss, micro)
    state, metrics = self._apply(state, grads, loss)
    metrics.update(loss=loss, tokens=sums["tokens"],
                   entropy=sums["entropy"] / jnp.maximum(sums["tokens"], 1.0))
    return state, metrics


def make_trainer(model_cfg: ModelConfig, opt_cfg: OptConfig, mesh: Mesh,
                 grpo_cfg: GRPOConfig | None = None, **kw) -> Trainer:
  """The Trainer for this model on this mesh (RL steps need grpo_cfg)."""
  return Trainer(model_cfg, opt_cfg, mesh, grpo_cfg, **kw)
