"""Token logprobs, the SFT loss and the GRPO surrogate with k3 KL (advantages: advantages.py).

Dimension letters in tensor names: the table in r1jax/__init__.py.

Definitions (TRL's GRPOTrainer is the per-token reference):
- logp: log_softmax(logits / temperature)[token] of the *untruncated*
  temperature-scaled distribution, in f32 from `model.unembed` — the sampler's
  definition, so a sampler's old logprobs and ours agree for the same params.
- ratio ρ = exp(logp − old_logp); objective per token
  min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), and with dual-clip (Ye et al. 2020)
  max(that, c·A) where A < 0; loss = −objective + β·k3, with
  k3 = exp(ref − logp) − (ref − logp) − 1.
- Decoupled (`GRPOConfig.decoupled`: recomputed old logprobs, or one-step off-policy
  rollouts): ρ is taken against `prox_logp`, the policy the update starts from, and the
  objective is weighted by the truncated importance weight min(exp(prox − old), tis_cap)
  of the sampler's logprobs `old` (no gradient; the k3 term is not weighted).
- Token aggregation (`loss_mode`), every one exact under micro-batching because
  the denominator is taken over the whole mini-batch (the token weights of
  train/packing.py, the loss's only reader of the mode):
  "grpo" Σ_i (Σ_t ℓ_it / |o_i|) / #sequences; "bnpo" Σ ℓ / #tokens (DAPO);
  "dr_grpo" Σ ℓ / (N·T), N the mini-batch's rows and T the padded completion
  width (the sampler pads to the max length, so the normaliser is constant).
- Advantages: group mean always; std (ddof 1, + 1e-4) of the group, of the whole
  rollout's raw rewards (TRL scale_rewards="batch") or none (Dr.GRPO).

Where we differ from TRL, on purpose:
- "grpo" averages over the sequences that have at least one loss token, not over
  all rows: masked rows (truncated completions, dropped groups) then do not
  shrink the step. Unmasked batches give TRL's value exactly.
- Advantages with several reward components may normalise each component then
  sum (`reward_norm="per_component"`); TRL only sums then normalises.
- Values at masked positions are replaced by zeros before `exp`, so garbage
  (even NaN / inf) in padding never reaches the loss or its gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.core import model
from r1jax.core.attention import AttentionPlan
from r1jax.core.config import GRPOConfig, ModelConfig


# --- teacher-forced logprobs ---------------------------------------------------


def _chunk_logp(params: model.Params, h_NxWxD: jax.Array, tgt_NxW: jax.Array, cfg: ModelConfig,
                temperature: float) -> tuple[jax.Array, jax.Array]:
  """Logprob of each target and the entropy, for one chunk of positions."""
  lsm_NxWxV = jax.nn.log_softmax(model.unembed(params, h_NxWxD, cfg) / temperature, axis=-1)
  return _target_logp(lsm_NxWxV, tgt_NxW), -jnp.sum(jnp.exp(lsm_NxWxV) * lsm_NxWxV, axis=-1)


def _target_logp(lsm_NxWxV: jax.Array, tgt_NxW: jax.Array) -> jax.Array:
  # A one-hot reduction instead of a gather: stays local when V is sharded.
  hit_NxWxV = jnp.arange(lsm_NxWxV.shape[-1]) == tgt_NxW[..., None]
  return jnp.sum(jnp.where(hit_NxWxV, lsm_NxWxV, 0.0), axis=-1)


def _chunked(fn, chunk: int, *xs_NxT: jax.Array) -> tuple[jax.Array, ...]:
  """fn over chunks of `chunk` positions of (N, T, …) arrays, rematerialised: only one
  chunk's N·chunk·V logits is ever live, in the forward and the backward; (N, T) outputs."""
  n, t = xs_NxT[0].shape[:2]
  c = max(1, min(chunk, t))
  to_chunks = lambda x: jnp.pad(x, ((0, 0), (0, -t % c)) + ((0, 0),) * (x.ndim - 2)).reshape(
      n, -1, c, *x.shape[2:]).swapaxes(0, 1)
  outs = jax.lax.map(jax.checkpoint(lambda x: fn(*x)), tuple(map(to_chunks, xs_NxT)))
  return tuple(o.swapaxes(0, 1).reshape(n, -1)[:, :t] for o in outs)


def chunked_logprobs(params: model.Params, h_NxTxD: jax.Array, tgt_NxT: jax.Array,
                     cfg: ModelConfig, temperature: float = 1.0,
                     chunk: int = 128) -> tuple[jax.Array, jax.Array]:
  """(logp_NxT, entropy_NxT) of targets given the hidden state that predicts each, over
  chunks of `chunk` positions (`_chunked`)."""
  return _chunked(lambda h, y: _chunk_logp(params, h, y, cfg, temperature), chunk, h_NxTxD,
                  tgt_NxT)


def _hidden(params: model.Params, cfg: ModelConfig, tokens_NxQ: jax.Array, plan: AttentionPlan,
            positions_NxQ: jax.Array | None) -> jax.Array:
  if tokens_NxQ.ndim != 2 or plan.valid_BxT.shape != tokens_NxQ.shape:
    raise ValueError(f"tokens {tokens_NxQ.shape} and the attention plan's rows "
                     f"{plan.valid_BxT.shape} must be equal (N, Q)")
  return model.hidden_states(params, tokens_NxQ, cfg, plan, positions_NxQ)


def token_logprobs_and_entropy(params: model.Params, cfg: ModelConfig, tokens_NxQ: jax.Array,
                               plan: AttentionPlan, completion_start: int = 1,
                               temperature: float = 1.0, chunk: int = 128,
                               positions_NxQ: jax.Array | None = None
                               ) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced (logp, entropy) of tokens[:, completion_start:], each (N, Q − start).

  Token j is scored by the hidden state at j − 1. Rows are padded (positions from the plan's
  real tokens) or packed (train/packing.py: per-sequence positions; the plan holds the segment
  and sample ids). Values at padding positions are finite but meaningless: mask them.
  """
  s = int(completion_start)
  if not 1 <= s < tokens_NxQ.shape[-1]:
    raise ValueError(f"completion_start={s} must be in [1, {tokens_NxQ.shape[-1]})")
  h_NxQxD = _hidden(params, cfg, tokens_NxQ, plan, positions_NxQ)
  return chunked_logprobs(params, h_NxQxD[:, s - 1:-1], tokens_NxQ[:, s:], cfg, temperature,
                          chunk)


# --- SFT -----------------------------------------------------------------------


def sft_loss(params: model.Params, cfg: ModelConfig, tokens_NxQ: jax.Array, plan: AttentionPlan,
             loss_mask_NxQ: jax.Array, denom: jax.Array | float | None = None,
             chunk: int = 128, positions_NxQ: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked next-token cross-entropy: Σ −logp over loss_mask / denom (default: its count).

  loss_mask[:, j] marks token j as a target (predicted from tokens < j);
  position 0 has no context and is never a target. Packed rows pass their
  per-document positions, and their plan its segment ids, so documents never see each other.
  """
  if loss_mask_NxQ.shape != tokens_NxQ.shape:
    raise ValueError(f"loss_mask {loss_mask_NxQ.shape} must match tokens {tokens_NxQ.shape}")
  logp_NxT, ent_NxT = token_logprobs_and_entropy(params, cfg, tokens_NxQ, plan, 1, 1.0,
                                                 chunk, positions_NxQ)
  m_NxT = loss_mask_NxQ[:, 1:].astype(bool)
  ntok = jnp.sum(m_NxT, dtype=jnp.float32)
  denom = jnp.maximum(ntok, 1.0) if denom is None else denom
  nll = -jnp.sum(jnp.where(m_NxT, logp_NxT, 0.0))
  sums = {"nll": nll, "entropy": jnp.sum(jnp.where(m_NxT, ent_NxT, 0.0)), "tokens": ntok}
  return nll / denom, sums


# --- logit distillation -----------------------------------------------------------


def _chunk_kd(params: model.Params, h_NxWxD: jax.Array, tgt_NxW: jax.Array,
              ids_NxWxk: jax.Array, tlp_NxWxk: jax.Array, cfg: ModelConfig
              ) -> tuple[jax.Array, jax.Array]:
  """(logp of each target, top-k forward KL) for one chunk of positions.

  The teacher is known on its top k tokens only: p_i = exp(tlp_i) and the rest mass
  r = 1 − Σ p_i. The student is read on the same k + 1 bins: q_i at the same ids and
  q_rest = 1 − Σ q_i (a log-sum-exp over the other ids, exact even when q_rest is tiny).
  KL = Σ_i p_i (log p_i − log q_i) + r (log r − log q_rest), with 0·log 0 = 0.
  """
  lsm_NxWxV = jax.nn.log_softmax(model.unembed(params, h_NxWxD, cfg), axis=-1)
  v = lsm_NxWxV.shape[-1]
  logp_NxW = _target_logp(lsm_NxWxV, tgt_NxW)
  lq_NxWxk = jnp.take_along_axis(lsm_NxWxV, ids_NxWxk, axis=-1)
  n, w, _ = ids_NxWxk.shape
  in_top_NxWxV = jnp.zeros((n, w, v), bool).at[
      jnp.arange(n)[:, None, None], jnp.arange(w)[None, :, None], ids_NxWxk].set(True)
  lq_rest_NxW = jax.nn.logsumexp(jnp.where(in_top_NxWxV, -jnp.inf, lsm_NxWxV), axis=-1)
  p_NxWxk = jnp.exp(tlp_NxWxk)
  r_NxW = jnp.clip(1.0 - jnp.sum(p_NxWxk, axis=-1), 0.0, 1.0)
  kl_top = jnp.sum(p_NxWxk * (tlp_NxWxk - lq_NxWxk), axis=-1)
  safe_r = jnp.where(r_NxW > 0, r_NxW, 1.0)
  kl_rest = jnp.where(r_NxW > 0, r_NxW * (jnp.log(safe_r) - jnp.maximum(lq_rest_NxW, -1e30)),
                      0.0)
  return logp_NxW, kl_top + kl_rest


def distill_loss(params: model.Params, cfg: ModelConfig, tokens_NxQ: jax.Array,
                 plan: AttentionPlan, loss_mask_NxQ: jax.Array, top_ids_NxQxk: jax.Array,
                 top_logp_NxQxk: jax.Array, teacher_mask_NxQ: jax.Array, kd_weight: float,
                 denom: jax.Array | float | None = None, chunk: int = 128,
                 positions_NxQ: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Σ over targets of w·KL_topk(teacher ‖ student) + (1 − w)·CE, / denom.

  top_ids / top_logp[:, j] are the teacher's k likeliest tokens (and log-probs) for the
  distribution over token j, as `loss_mask[:, j]` marks token j; where teacher_mask[:, j] is
  False (no teacher record, e.g. an appended EOS) the target's CE is used alone.
  """
  if top_ids_NxQxk.shape[:2] != tokens_NxQ.shape or top_logp_NxQxk.shape != top_ids_NxQxk.shape:
    raise ValueError(f"teacher top-k {top_ids_NxQxk.shape} / {top_logp_NxQxk.shape} must be "
                     f"(N, Q, k) with (N, Q) = {tokens_NxQ.shape}")
  h_NxQxD = _hidden(params, cfg, tokens_NxQ, plan, positions_NxQ)
  logp_NxT, kl_NxT = _chunked(lambda *x: _chunk_kd(params, *x, cfg), chunk, h_NxQxD[:, :-1],
                              tokens_NxQ[:, 1:], top_ids_NxQxk[:, 1:], top_logp_NxQxk[:, 1:])
  m_NxT = loss_mask_NxQ[:, 1:].astype(bool)
  kd_NxT = m_NxT & teacher_mask_NxQ[:, 1:].astype(bool)
  ntok = jnp.sum(m_NxT, dtype=jnp.float32)
  denom = jnp.maximum(ntok, 1.0) if denom is None else denom
  per_tok = jnp.where(kd_NxT, kd_weight * kl_NxT + (1.0 - kd_weight) * -logp_NxT, -logp_NxT)
  total = jnp.sum(jnp.where(m_NxT, per_tok, 0.0))
  sums = {"nll": -jnp.sum(jnp.where(m_NxT, logp_NxT, 0.0)), "tokens": ntok,
          "kl": jnp.sum(jnp.where(kd_NxT, kl_NxT, 0.0)),
          "kd_tokens": jnp.sum(kd_NxT, dtype=jnp.float32)}
  return total / denom, sums


# --- GRPO surrogate ------------------------------------------------------------


def _is_weight(prox_NxT: jax.Array, old_NxT: jax.Array, m: jax.Array, cap: float):
  """(w, capped): the truncated importance weight min(π_prox / π_sampler, cap), or 1 (cap 0)."""
  if not cap:
    return jnp.ones(m.shape, jnp.float32), jnp.zeros(m.shape, bool)
  log_w = jnp.where(m, jax.lax.stop_gradient(prox_NxT - old_NxT), 0.0)
  capped = log_w > np.log(cap)
  return jnp.exp(jnp.minimum(log_w, np.log(cap))), capped


def per_token_loss(logp_NxT: jax.Array, old_logp_NxT: jax.Array, adv_NxT: jax.Array,
                   mask_NxT: jax.Array, grpo: GRPOConfig,
                   ref_logp_NxT: jax.Array | None = None,
                   prox_logp_NxT: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ℓ_NxT = −objective + β·k3 (zero off the mask) and per-token stats for metrics.

  Every input is per token: a packed row holds several samples, each with its advantage.
  With `prox_logp` (decoupled), the ratio is against it and the objective is weighted by
  the truncated importance weight of the sampler's `old_logp` (module docstring)."""
  m = mask_NxT.astype(bool)
  lp = jnp.where(m, logp_NxT, 0.0)
  base = old_logp_NxT if prox_logp_NxT is None else prox_logp_NxT
  log_ratio = lp - jnp.where(m, jax.lax.stop_gradient(base), 0.0)
  ratio = jnp.exp(log_ratio)
  a = adv_NxT.astype(jnp.float32)
  obj = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - grpo.eps_low, 1 + grpo.eps_high) * a)
  stats = {"ratio": ratio, "approx_kl_old": ratio - 1 - log_ratio,
           "clip_low": (ratio < 1 - grpo.eps_low) & (a < 0),
           "clip_high": (ratio > 1 + grpo.eps_high) & (a > 0)}
  if grpo.dual_clip:
    floor = grpo.dual_clip * a
    stats["clip_dual"] = (a < 0) & (obj < floor)
    obj = jnp.where(a < 0, jnp.maximum(obj, floor), obj)
  if prox_logp_NxT is not None:
    w, stats["is_capped"] = _is_weight(prox_logp_NxT, old_logp_NxT, m, grpo.tis_cap)
    stats["is_weight"] = w
    obj = w * obj
  stats["surrogate"] = obj
  loss = -obj
  if ref_logp_NxT is not None:
    d = jnp.where(m, jax.lax.stop_gradient(ref_logp_NxT), 0.0) - lp
    k3 = jnp.exp(d) - d - 1
    stats["kl"] = k3
    if grpo.beta:  # with β = 0 a given reference is only a metric
      loss = loss + grpo.beta * k3
  return jnp.where(m, loss, 0.0), {k: jnp.where(m, v, 0) for k, v in stats.items()}


def grpo_loss(logp_NxT: jax.Array, old_logp_NxT: jax.Array, adv_NxT: jax.Array,
              mask_NxT: jax.Array, weights_NxT: jax.Array, grpo: GRPOConfig,
              ref_logp_NxT: jax.Array | None = None, prox_logp_NxT: jax.Array | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar GRPO loss Σ w·ℓ and metric sums.

  The token weights come from train/packing.py, the one place `loss_mode` is read: each
  token's share of its mini-batch's aggregate (1 / |o_i| / #sequences for "grpo", 1 / #tokens
  for "bnpo", 1 / (N·T) for "dr_grpo"). Micro-batch losses therefore sum to the mini-batch's,
  and packed rows give the loss and gradient of one sequence a row.
  """
  _check_shapes(logp_NxT, old_logp_NxT=old_logp_NxT, adv_NxT=adv_NxT, mask_NxT=mask_NxT,
                weights_NxT=weights_NxT, ref_logp_NxT=ref_logp_NxT, prox_logp_NxT=prox_logp_NxT)
  loss_NxT, stats = per_token_loss(logp_NxT, old_logp_NxT, adv_NxT, mask_NxT, grpo,
                                   ref_logp_NxT, prox_logp_NxT)
  return jnp.sum(weights_NxT * loss_NxT), _loss_sums(stats, mask_NxT)


def _loss_sums(stats: dict[str, jax.Array], mask_NxT: jax.Array) -> dict[str, jax.Array]:
  m = mask_NxT.astype(bool)
  sums = {k: jnp.sum(v, dtype=jnp.float32) for k, v in stats.items()}
  sums["tokens"] = jnp.sum(m, dtype=jnp.float32)
  sums["ratio_min"] = jnp.min(jnp.where(m, stats["ratio"], jnp.inf))
  sums["ratio_max"] = jnp.max(jnp.where(m, stats["ratio"], -jnp.inf))
  return sums


def _check_shapes(logp_NxT: jax.Array, **others: jax.Array | None) -> None:
  if logp_NxT.ndim != 2:
    raise ValueError(f"logp must be (N, T), got {logp_NxT.shape}")
  for name, x in others.items():
    if x is not None and x.shape != logp_NxT.shape:
      raise ValueError(f"{name.removesuffix('_NxT')} has shape {x.shape}, expected "
                       f"{logp_NxT.shape} like logp")


def grpo_metrics(loss: jax.Array, sums: dict[str, jax.Array],
                 update_metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """One GRPO update's metrics: token sums as per-token means, ratio extremes, clip fractions."""
  out = dict(update_metrics)
  tokens = jnp.maximum(sums["tokens"], 1.0)
  out.update({name: v / tokens for name, v in sums.items()
              if name not in ("tokens", "ratio_min", "ratio_max")})
  out.update(loss=loss, tokens=sums["tokens"], ratio_min=sums["ratio_min"],
             ratio_max=sums["ratio_max"], ratio_mean=out.pop("ratio"),
             clip_frac_low=out.pop("clip_low"), clip_frac_high=out.pop("clip_high"))
  if "clip_dual" in out:
    out["clip_frac_dual"] = out.pop("clip_dual")
  if "is_capped" in out:  # decoupled: the sampler's weight, and how often it hit the cap
    out["is_weight_mean"], out["is_capped_frac"] = out.pop("is_weight"), out.pop("is_capped")
  return out
