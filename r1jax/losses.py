"""Token logprobs, the SFT loss, group advantages and the GRPO surrogate with k3 KL.

Dimension letters used in tensor names across r1jax:
  B prompts (or sequences, outside RL)   G group size (completions per prompt)
  N = B·G sequences                      S prompt tokens (left-padded)
  T completion tokens (right-padded)     P = S + T whole-sequence tokens
  C reward components                    V vocab
  W positions per logits chunk           U chunks
  D model width   H heads   K kv heads   L layers

Definitions (TRL's GRPOTrainer is the per-token reference):
- logp: log_softmax(logits / temperature)[token] of the *untruncated*
  temperature-scaled distribution, in f32 from `model.unembed` — the sampler's
  definition, so a sampler's old logprobs and ours agree for the same params.
- ratio ρ = exp(logp − old_logp); objective per token
  min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), and with dual-clip (Ye et al. 2020)
  max(that, c·A) where A < 0; loss = −objective + β·k3, with
  k3 = exp(ref − logp) − (ref − logp) − 1.
- Token aggregation (`loss_mode`), every one exact under micro-batching because
  the denominator is taken over the whole mini-batch (`loss_denominator`):
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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import model
from r1jax.config import ADV_SCALES, LOSS_MODES, GRPOConfig, ModelConfig


# --- teacher-forced logprobs ---------------------------------------------------


def _chunk_logp(params: model.Params, h_NxWxD: jax.Array, tgt_NxW: jax.Array, cfg: ModelConfig,
                temperature: float) -> tuple[jax.Array, jax.Array]:
  """Logprob of each target and the entropy, for one chunk of positions."""
  logits_NxWxV = model.unembed(params, h_NxWxD, cfg) / temperature
  lsm_NxWxV = jax.nn.log_softmax(logits_NxWxV, axis=-1)
  # A one-hot reduction instead of a gather: stays local when V is sharded.
  hit_NxWxV = jnp.arange(lsm_NxWxV.shape[-1]) == tgt_NxW[..., None]
  logp_NxW = jnp.sum(jnp.where(hit_NxWxV, lsm_NxWxV, 0.0), axis=-1)
  ent_NxW = -jnp.sum(jnp.exp(lsm_NxWxV) * lsm_NxWxV, axis=-1)
  return logp_NxW, ent_NxW


def chunked_logprobs(params: model.Params, h_NxTxD: jax.Array, tgt_NxT: jax.Array,
                     cfg: ModelConfig, temperature: float = 1.0,
                     chunk: int = 128) -> tuple[jax.Array, jax.Array]:
  """(logp_NxT, entropy_NxT) of targets given the hidden state that predicts each.

  Scans over chunks of `chunk` positions with a rematerialised body, so only
  one chunk's N·chunk·V f32 logits is ever live, in the forward and backward.
  """
  n, t, d = h_NxTxD.shape
  c = max(1, min(chunk, t))
  pad = -t % c
  h_NxTxD = jnp.pad(h_NxTxD, ((0, 0), (0, pad), (0, 0)))
  tgt_NxT = jnp.pad(tgt_NxT, ((0, 0), (0, pad)))
  h_UxNxWxD = h_NxTxD.reshape(n, -1, c, d).swapaxes(0, 1)
  tgt_UxNxW = tgt_NxT.reshape(n, -1, c).swapaxes(0, 1)
  body = jax.checkpoint(lambda x: _chunk_logp(params, x[0], x[1], cfg, temperature))
  logp_UxNxW, ent_UxNxW = jax.lax.map(body, (h_UxNxWxD, tgt_UxNxW))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(n, -1)[:, :t]
  return unchunk(logp_UxNxW), unchunk(ent_UxNxW)


def token_logprobs_and_entropy(params: model.Params, cfg: ModelConfig, tokens_NxP: jax.Array,
                               mask_NxP: jax.Array, completion_start: int,
                               temperature: float = 1.0,
                               chunk: int = 128, positions_NxP: jax.Array | None = None,
                               segment_ids_NxP: jax.Array | None = None,
                               ) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced (logp_NxT, entropy_NxT) of tokens[:, completion_start:].

  Token j is scored by the hidden state at j − 1 (left-padded prompt, so
  position completion_start − 1 is the last prompt token). Values at padding
  positions are finite but meaningless: mask them with the completion mask.
  """
  s = int(completion_start)
  if tokens_NxP.ndim != 2 or mask_NxP.shape != tokens_NxP.shape:
    raise ValueError(f"tokens {tokens_NxP.shape} and mask {mask_NxP.shape} must be equal (N, P)")
  if not 1 <= s < tokens_NxP.shape[1]:
    raise ValueError(f"completion_start={s} must be in [1, {tokens_NxP.shape[1]})")
  h_NxPxD, _ = model.hidden_states(params, tokens_NxP, cfg, mask_BxT=mask_NxP,
                                   positions_BxT=positions_NxP, segment_ids_BxT=segment_ids_NxP)
  return chunked_logprobs(params, h_NxPxD[:, s - 1:-1], tokens_NxP[:, s:], cfg, temperature,
                          chunk)


def token_logprobs(params: model.Params, cfg: ModelConfig, tokens_NxP: jax.Array,
                   mask_NxP: jax.Array, completion_start: int, temperature: float = 1.0,
                   chunk: int = 128) -> jax.Array:
  """Teacher-forced logp_NxT of the completion tokens (see `token_logprobs_and_entropy`)."""
  return token_logprobs_and_entropy(params, cfg, tokens_NxP, mask_NxP, completion_start,
                                    temperature, chunk)[0]


# --- SFT -----------------------------------------------------------------------


def sft_loss(params: model.Params, cfg: ModelConfig, tokens_NxP: jax.Array, mask_NxP: jax.Array,
             loss_mask_NxP: jax.Array, denom: jax.Array | float | None = None,
             chunk: int = 128, positions_NxP: jax.Array | None = None,
             segment_ids_NxP: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked next-token cross-entropy: Σ −logp over loss_mask / denom (default: its count).

  loss_mask[:, j] marks token j as a target (predicted from tokens < j);
  position 0 has no context and is never a target. Packed rows pass their
  per-document positions and segment ids, so documents never see each other.
  """
  if loss_mask_NxP.shape != tokens_NxP.shape:
    raise ValueError(f"loss_mask {loss_mask_NxP.shape} must match tokens {tokens_NxP.shape}")
  logp_NxT, ent_NxT = token_logprobs_and_entropy(params, cfg, tokens_NxP, mask_NxP, 1, 1.0, chunk,
                                                 positions_NxP, segment_ids_NxP)
  m_NxT = loss_mask_NxP[:, 1:].astype(bool)
  ntok = jnp.sum(m_NxT, dtype=jnp.float32)
  denom = jnp.maximum(ntok, 1.0) if denom is None else denom
  nll = -jnp.sum(jnp.where(m_NxT, logp_NxT, 0.0))
  sums = {"nll": nll, "entropy": jnp.sum(jnp.where(m_NxT, ent_NxT, 0.0)), "tokens": ntok}
  return nll / denom, sums


# --- advantages ----------------------------------------------------------------


def _normalise(r_N: jax.Array, group_size: int, scale: str, eps: float, ddof: int) -> jax.Array:
  r_BxG = r_N.reshape(-1, group_size)
  adv_BxG = r_BxG - jnp.mean(r_BxG, axis=1, keepdims=True)
  if scale == "group":
    adv_BxG = adv_BxG / (jnp.std(r_BxG, axis=1, ddof=ddof, keepdims=True) + eps)
  elif scale == "batch":
    adv_BxG = adv_BxG / (jnp.std(r_N, ddof=ddof) + eps)
  return adv_BxG.reshape(-1)


def group_advantages(rewards: Any, group_size: int, scale: str = "group", eps: float = 1e-4,
                     ddof: int = 1, reward_norm: str = "sum",
                     weights_C: Any = None) -> jax.Array:
  """adv_N = (r − mean_G r) / (std r + eps), rows grouped as [prompt0 × G, prompt1 × G, …].

  rewards: (N,) or (N, C) components combined with weights_C (default ones).
  scale: "group" std within each group, "batch" std over all N rewards (TRL
  scale_rewards="batch"), "none" no division (Dr.GRPO). The mean is always the
  group's. reward_norm="per_component" normalises each component then sums.
  """
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim == 1:
    r = r[:, None]
  if r.ndim != 2:
    raise ValueError(f"rewards must be (N,) or (N, C), got shape {r.shape}")
  n, c = r.shape
  if scale not in ADV_SCALES:
    raise ValueError(f"advantage scale {scale!r} not in {ADV_SCALES}")
  if reward_norm not in ("sum", "per_component"):
    raise ValueError(f"reward_norm {reward_norm!r} not in ('sum', 'per_component')")
  if group_size < 1 or n % group_size:
    raise ValueError(f"group size {group_size} does not divide the {n} rewards")
  if scale != "none" and ddof and (group_size if scale == "group" else n) <= ddof:
    raise ValueError(f"std with ddof={ddof} needs more than {ddof} samples per "
                     f"{scale} (group_size={group_size}, N={n})")
  w_C = jnp.ones((c,), jnp.float32) if weights_C is None else jnp.asarray(weights_C, jnp.float32)
  if w_C.shape != (c,):
    raise ValueError(f"weights {w_C.shape} must have one entry per reward component ({c})")
  if reward_norm == "sum":
    return _normalise(r @ w_C, group_size, scale, eps, ddof)
  adv_CxN = jax.vmap(lambda x: _normalise(x, group_size, scale, eps, ddof))(r.T)
  return w_C @ adv_CxN


def informative_groups(rewards_N: Any, group_size: int) -> jax.Array:
  """Per prompt: whether its G rewards differ (DAPO dynamic sampling keeps those)."""
  r_BxG = jnp.asarray(rewards_N, jnp.float32).reshape(-1, group_size)
  return jnp.any(r_BxG != r_BxG[:, :1], axis=1)


# --- GRPO surrogate ------------------------------------------------------------


def per_token_loss(logp_NxT: jax.Array, old_logp_NxT: jax.Array, adv_N: jax.Array,
                   mask_NxT: jax.Array, cfg: GRPOConfig,
                   ref_logp_NxT: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ℓ_NxT = −objective + β·k3 (zero off the mask) and per-token stats for metrics."""
  m = mask_NxT.astype(bool)
  lp = jnp.where(m, logp_NxT, 0.0)
  log_ratio = lp - jnp.where(m, jax.lax.stop_gradient(old_logp_NxT), 0.0)
  ratio = jnp.exp(log_ratio)
  a = adv_N.astype(jnp.float32)[:, None]
  obj = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
  stats = {"ratio": ratio, "approx_kl_old": ratio - 1 - log_ratio,
           "clip_low": (ratio < 1 - cfg.eps_low) & (a < 0),
           "clip_high": (ratio > 1 + cfg.eps_high) & (a > 0)}
  if cfg.dual_clip:
    floor = cfg.dual_clip * a
    stats["clip_dual"] = (a < 0) & (obj < floor)
    obj = jnp.where(a < 0, jnp.maximum(obj, floor), obj)
  stats["surrogate"] = obj
  loss = -obj
  if ref_logp_NxT is not None:
    d = jnp.where(m, jax.lax.stop_gradient(ref_logp_NxT), 0.0) - lp
    k3 = jnp.exp(d) - d - 1
    stats["kl"] = k3
    if cfg.beta:  # with β = 0 a given reference is only a metric
      loss = loss + cfg.beta * k3
  return jnp.where(m, loss, 0.0), {k: jnp.where(m, v, 0) for k, v in stats.items()}


def loss_denominator(mask_NxT: jax.Array, mode: str) -> jax.Array:
  """The mini-batch-wide normaliser of the token-loss sum, for `mode`."""
  m = mask_NxT.astype(bool)
  if mode == "grpo":
    return jnp.maximum(jnp.sum(jnp.any(m, axis=-1), dtype=jnp.float32), 1.0)
  if mode == "bnpo":
    return jnp.maximum(jnp.sum(m, dtype=jnp.float32), 1.0)
  if mode == "dr_grpo":
    return jnp.asarray(float(np.prod(m.shape)), jnp.float32)
  raise ValueError(f"unknown loss mode {mode!r}; known: {LOSS_MODES}")


def token_weights(mask_NxT: jax.Array, mode: str, denom: jax.Array) -> jax.Array:
  """w_NxT with loss = Σ w·ℓ: the mask, / |o_i| for "grpo", / the mini-batch denominator."""
  if mode not in LOSS_MODES:
    raise ValueError(f"unknown loss mode {mode!r}; known: {LOSS_MODES}")
  w = mask_NxT.astype(jnp.float32)
  if mode == "grpo":
    w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1.0)
  return w / denom


def effective_mask(completion_mask_NxT: jax.Array, truncated_N: jax.Array | None,
                   cfg: GRPOConfig) -> jax.Array:
  """The loss mask: completion tokens, minus truncated completions if configured."""
  m = completion_mask_NxT.astype(bool)
  if cfg.mask_truncated and truncated_N is not None:
    m = m & ~truncated_N.astype(bool)[:, None]
  return m


def grpo_loss(logp_NxT: jax.Array, old_logp_NxT: jax.Array, adv_N: jax.Array,
              mask_NxT: jax.Array, cfg: GRPOConfig, ref_logp_NxT: jax.Array | None = None,
              denom: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar GRPO loss and metric sums; `denom` defaults to this batch's own.

  Pass the mini-batch's `loss_denominator` when this is one micro-batch of it:
  the micro-batch losses (and gradients) then sum to the mini-batch's.
  """
  _check_shapes(logp_NxT, old_logp_NxT, adv_N, mask_NxT, ref_logp_NxT)
  denom = loss_denominator(mask_NxT, cfg.loss_mode) if denom is None else denom
  loss_NxT, stats = per_token_loss(logp_NxT, old_logp_NxT, adv_N, mask_NxT, cfg, ref_logp_NxT)
  loss = jnp.sum(token_weights(mask_NxT, cfg.loss_mode, denom) * loss_NxT)
  m = mask_NxT.astype(bool)
  sums = {k: jnp.sum(v, dtype=jnp.float32) for k, v in stats.items()}
  sums["tokens"] = jnp.sum(m, dtype=jnp.float32)
  sums["ratio_min"] = jnp.min(jnp.where(m, stats["ratio"], jnp.inf))
  sums["ratio_max"] = jnp.max(jnp.where(m, stats["ratio"], -jnp.inf))
  return loss, sums


def _check_shapes(logp, old, adv, mask, ref) -> None:
  n_t = logp.shape
  if len(n_t) != 2:
    raise ValueError(f"logp must be (N, T), got {n_t}")
  for name, x in (("old_logp", old), ("mask", mask), ("ref_logp", ref)):
    if x is not None and x.shape != n_t:
      raise ValueError(f"{name} has shape {x.shape}, expected {n_t} like logp")
  if adv.shape != n_t[:1]:
    raise ValueError(f"advantages have shape {adv.shape}, expected ({n_t[0]},)")
