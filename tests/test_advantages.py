"""Host advantages and DAPO selection against a float64, one-group-at-a-time restatement."""

import numpy as np
import pytest

from r1jax.train import advantages

TOL = 1e-6  # relative: float64 rounded to f32 vs float64


def rel_err(got, want) -> float:
  """max |got − want| / max |want|: relative to the array's scale."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def np_advantages(r, g, scale, eps, ddof, reward_norm="sum", w=None):
  """Group advantages, one group at a time, in float64."""
  r = np.asarray(r, np.float64).reshape(len(r), -1)
  w = np.ones(r.shape[1]) if w is None else np.asarray(w, np.float64)

  def norm(x):
    out = np.empty_like(x)
    for b in range(len(x) // g):
      grp = x[b * g:(b + 1) * g]
      std = {"group": np.std(grp, ddof=ddof), "batch": np.std(x, ddof=ddof), "none": None}[scale]
      out[b * g:(b + 1) * g] = (grp - grp.mean()) / (1.0 if std is None else std + eps)
    return out

  if reward_norm == "sum":
    return norm(r @ w)
  return sum(w[c] * norm(r[:, c]) for c in range(r.shape[1]))


@pytest.mark.parametrize("scale,reward_norm,ddof", [
    ("group", "sum", 1), ("group", "sum", 0), ("batch", "sum", 1), ("none", "sum", 1),
    ("group", "per_component", 1), ("batch", "per_component", 1)])
def test_advantages_match_float64(scale, reward_norm, ddof):
  rng = np.random.default_rng(4)
  r = rng.random((24, 3)).astype(np.float32)
  r[:6] = 1.0  # one constant group: advantage exactly 0, not NaN
  w = np.array([1.0, 0.5, 2.0], np.float32)
  got = advantages.group_advantages(r, 6, scale, 1e-4, ddof, reward_norm, w)
  assert isinstance(got, np.ndarray) and got.dtype == np.float32  # host numpy, never jax
  want = np_advantages(r, 6, scale, 1e-4, ddof, reward_norm, w)
  assert rel_err(got, want) <= TOL, rel_err(got, want)
  assert np.all(got[:6] == 0) or scale == "batch"
  one = advantages.group_advantages(r[:, 0], 6, scale, 1e-4, ddof)
  assert rel_err(one, np_advantages(r[:, 0], 6, scale, 1e-4, ddof)) <= TOL


def test_advantage_errors_and_informative_groups():
  with pytest.raises(ValueError, match="does not divide"):
    advantages.group_advantages(np.zeros(10), 4)
  with pytest.raises(ValueError, match="ddof=1"):
    advantages.group_advantages(np.zeros(4), 1)
  with pytest.raises(ValueError, match="scale"):
    advantages.group_advantages(np.zeros(4), 2, scale="global")
  with pytest.raises(ValueError, match="reward_norm"):
    advantages.group_advantages(np.zeros(4), 2, reward_norm="mean")
  with pytest.raises(ValueError, match="one entry per reward component"):
    advantages.group_advantages(np.zeros((4, 2)), 2, weights_C=[1.0])
  keep = advantages.informative_groups(np.array([1, 1, 0, 1, 0, 0.0]), 2)
  assert keep.tolist() == [False, True, False]


def test_select_groups_takes_informative_first_then_filler():
  keeps = [np.array([False, True, False]), np.array([True, False, True])]
  chosen, live = advantages.select_groups(keeps, 3)
  assert chosen == [(0, 1), (1, 0), (1, 2)] and live == 3
  chosen, live = advantages.select_groups([np.array([False, True, False])], 3)
  assert live == 1 and chosen == [(0, 1), (0, 0), (0, 1)]  # filler: rollout 0's first groups
  chosen, live = advantages.select_groups(keeps, 2)  # more informative than needed
  assert chosen == [(0, 1), (1, 0)] and live == 2
