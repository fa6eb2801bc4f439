"""Group-relative advantages and DAPO group selection: host numpy, between rollout and update.

Rows are grouped [prompt0 × G, prompt1 × G, …]. The advantage of completion i of a group is
A_i = (r_i − mean_G r) / (std r + eps): the std of its group (DeepSeekMath / TRL), of the
whole rollout's raw rewards (TRL scale_rewards="batch"), or none at all (Dr.GRPO). Computed
in float64 and rounded once to the float32 the update consumes; nothing here touches the device.
The RL stage's per-rollout algorithm sits here too: failed samples out of the baseline,
advantages per reward component, and which groups the update may use.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from r1jax.core.config import ADV_SCALES, REWARD_NORMS, GRPOConfig
from r1jax.rewards.compose import RewardBatch


def _normalise(r_N: np.ndarray, group_size: int, scale: str, eps: float,
               ddof: int) -> np.ndarray:
  r_BxG = r_N.reshape(-1, group_size)
  adv_BxG = r_BxG - np.mean(r_BxG, axis=1, keepdims=True)
  if scale == "group":
    adv_BxG = adv_BxG / (np.std(r_BxG, axis=1, ddof=ddof, keepdims=True) + eps)
  elif scale == "batch":
    adv_BxG = adv_BxG / (np.std(r_N, ddof=ddof) + eps)
  return adv_BxG.reshape(-1)


def group_advantages(rewards: Any, group_size: int, scale: str = "group", eps: float = 1e-4,
                     ddof: int = 1, reward_norm: str = "sum",
                     weights_C: Any = None) -> np.ndarray:
  """adv_N (f32, computed in f64) = (r − mean_G r) / (std r + eps).

  rewards: (N,) or (N, C) components combined with weights_C (default ones).
  scale: "group", "batch" or "none" (see the module docstring); the mean is always the
  group's. reward_norm="per_component" normalises each component, then sums.
  """
  r = np.asarray(rewards, np.float64)
  if r.ndim == 1:
    r = r[:, None]
  if r.ndim != 2:
    raise ValueError(f"rewards must be (N,) or (N, C), got shape {r.shape}")
  n, c = r.shape
  if scale not in ADV_SCALES:
    raise ValueError(f"advantage scale {scale!r} not in {ADV_SCALES}")
  if reward_norm not in REWARD_NORMS:
    raise ValueError(f"reward_norm {reward_norm!r} not in {REWARD_NORMS}")
  if group_size < 1 or n % group_size:
    raise ValueError(f"group size {group_size} does not divide the {n} rewards")
  if scale != "none" and ddof and (group_size if scale == "group" else n) <= ddof:
    raise ValueError(f"std with ddof={ddof} needs more than {ddof} samples per "
                     f"{scale} (group_size={group_size}, N={n})")
  w_C = np.ones((c,)) if weights_C is None else np.asarray(weights_C, np.float64)
  if w_C.shape != (c,):
    raise ValueError(f"weights {w_C.shape} must have one entry per reward component ({c})")
  if reward_norm == "sum":
    adv_N = _normalise(r @ w_C, group_size, scale, eps, ddof)
  else:
    adv_N = w_C @ np.stack([_normalise(x, group_size, scale, eps, ddof) for x in r.T])
  return adv_N.astype(np.float32)


def informative_groups(rewards_N: Any, group_size: int) -> np.ndarray:
  """(B,) bool per prompt: whether its G rewards differ (DAPO dynamic sampling keeps those)."""
  r_BxG = np.asarray(rewards_N, np.float32).reshape(-1, group_size)
  return np.any(r_BxG != r_BxG[:, :1], axis=1)


def select_groups(keep_per_rollout: Sequence[np.ndarray],
                  batch: int) -> tuple[list[tuple[int, int]], int]:
  """DAPO refill: (rollout, group) pairs for one batch of `batch` groups, and how many are live.

  Informative groups come first, in rollout order; when fewer than `batch` were found, the
  first rollout's leading groups fill the rest as masked filler (no loss tokens), so the
  update's row count, and its compiled shape, never changes.
  """
  chosen = [(ri, int(gi)) for ri, keep in enumerate(keep_per_rollout)
            for gi in np.flatnonzero(keep)][:batch]
  live = len(chosen)
  return chosen + [(0, gi) for gi in range(batch - live)], live


# --- one rollout's rewards → the update's advantages and groups (the RL stage's algorithm)


def failed_rows(rewards: RewardBatch) -> np.ndarray:
  """(N,) samples a device reward (a reward model) could not score: NaN, error."""
  out = np.zeros(len(rewards.total_N), bool)
  for key, failed in rewards.failed.items():
    if key in rewards.device_keys:
      out |= failed
  return out


def fill_failed(r: np.ndarray, bad: np.ndarray, g: int) -> np.ndarray:
  """Rewards with failed samples set to their group's mean over the others, so a sample kept
  out of the loss does not move its group's baseline either."""
  if not bad.any():
    return r
  r = r.copy()
  for lo in range(0, len(r), g):
    ok = ~bad[lo:lo + g]
    fill = r[lo:lo + g][ok].mean(axis=0) if ok.any() else 0.0
    r[lo:lo + g][~ok] = fill
  return r


def rollout_advantages(rewards: RewardBatch, grpo: GRPOConfig,
                       components: Sequence[Any]) -> np.ndarray:
  """Group-normalised advantages of one rollout (per reward component first if configured;
  `components`: the scorer's, with `key` and `weight`)."""
  if grpo.reward_norm == "per_component":
    r = np.stack([np.nan_to_num(rewards.components[c.key]) for c in components], axis=1)
    weights = [c.weight for c in components]
  else:
    r, weights = rewards.total_N, None
  r = fill_failed(r, failed_rows(rewards), grpo.group_size)
  return group_advantages(r, grpo.group_size, scale=grpo.adv_scale, eps=grpo.adv_eps,
                          ddof=grpo.adv_ddof, reward_norm=grpo.reward_norm, weights_C=weights)


def keep_groups(rewards: RewardBatch, grpo: GRPOConfig, dynamic: bool, b: int) -> np.ndarray:
  """(B,) groups the update may use: all, or with dynamic sampling (DAPO) those whose rewards
  vary (in any component, with per-component normalisation)."""
  if not dynamic:
    return np.ones(b, bool)
  g = grpo.group_size
  if grpo.reward_norm != "per_component":
    return informative_groups(rewards.total_N, g)
  return np.any([informative_groups(np.nan_to_num(v), g)
                 for v in rewards.components.values()], axis=0)

