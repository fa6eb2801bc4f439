"""Reward models as a reward spec declares them, and the normalisation of their scores.

Plain data and numpy (no JAX): reward workers import the spec code, and they must stay light.
`rewards/reward_model.py:load_models` turns the declarations into loaded models.

  models: [{"name": "helpful",                        # the name components use
            "path": "/runs/rm_helpful/reward_model",   # the reward_model stage's output
            "tokenizer": "/models/Qwen2.5-1.5B",       # its tokenizer (file or HF folder)
            "template": "chatml",                     # the chat template it was trained with
            "view": "summary",                        # full | summary | reasoning
            "max_len": 1024, "batch_size": 32,      # rows a forward (all processes')
            "norm": "validation",                     # none | running | validation |
                                                      #   {"mean": m, "std": s}
            "scale": 1.0}]
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from r1jax.core.storage import Path
from r1jax.rewards import registry

NORM_FILE = "norm.json"  # beside a saved RM: its held-out score mean / std and pair accuracy
MODEL_KEYS = {"name", "path", "tokenizer", "template", "view", "max_len", "batch_size", "norm",
              "scale"}


@dataclasses.dataclass
class RewardNorm:
  """Puts a reward model's scores on the rule rewards' scale: r' = (r − mean) / std.

  mode "none": raw scores. "affine": a fixed mean / std, e.g. the RM's scores on its
  held-out responses (the reward_model stage's norm.json). "running": the mean / std of every score
  seen so far in this run (Welford; the current batch included; in several processes every
  process's scores, in process order), for an RM whose scale on the policy's responses is
  unknown in advance; it restarts with the process.
  """

  mode: str = "none"
  mean: float = 0.0
  std: float = 1.0
  count: int = 0
  _m2: float = 0.0

  def __post_init__(self):
    if self.mode not in ("none", "affine", "running"):
      raise ValueError(f"normalisation mode must be none, affine or running, got {self.mode!r}")
    if self.mode == "affine" and not self.std > 0:
      raise ValueError(f"affine normalisation needs std > 0, got {self.std}")

  def __call__(self, scores: np.ndarray) -> np.ndarray:
    self.update(scores)
    return self.apply(scores)

  def update(self, scores: np.ndarray) -> None:
    """Running mode: adds the finite scores to the statistics, in order (the others: none)."""
    if self.mode == "running":
      for v in np.asarray(scores, np.float64)[np.isfinite(scores)]:
        self.count += 1
        delta = v - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (v - self.mean)
      self.std = float(np.sqrt(self._m2 / (self.count - 1))) if self.count > 1 else 1.0

  def apply(self, scores: np.ndarray) -> np.ndarray:
    x = np.asarray(scores, np.float64)
    return x if self.mode == "none" else (x - self.mean) / max(self.std, 1e-6)


def norm_from(value: Any, folder: str | Path | None = None,
              encoding: dict | None = None) -> RewardNorm:
  """A RewardNorm from its spec value: 'none', 'running', {"mean", "std"}, or 'validation'
  (the fixed affine the reward_model stage saved as `folder`/norm.json from its held-out
  scores; `encoding`, e.g. the spec's {template}, must be what it scored with).
  Without `folder`, 'validation' is only checked for form."""
  if value == "validation":
    if folder is None:
      return RewardNorm("none")
    path = Path(folder) / NORM_FILE
    if not path.exists():
      raise FileNotFoundError(
          f"{path} does not exist: the reward_model stage writes it when data.eval is set. "
          "Train the RM with held-out pairs, or set norm to 'running' or {mean, std}")
    facts = json.loads(path.read_text())
    differ = {k: (facts[k], v) for k, v in (encoding or {}).items()
              if k in facts and facts[k] != v}
    if differ:
      raise ValueError(f"{path}: the RM's validation scores were taken with other settings "
                       f"(saved, spec): {differ}; its mean / std would not fit these scores")
    return RewardNorm("affine", float(facts["mean"]), float(facts["std"]))
  if isinstance(value, str) and value in ("none", "running"):
    return RewardNorm(value)
  if isinstance(value, dict) and set(value) == {"mean", "std"}:
    return RewardNorm("affine", float(value["mean"]), float(value["std"]))
  raise ValueError("reward model norm must be 'none', 'running', 'validation' or "
                   f"{{mean, std}}, got {value!r}")


def check_model_specs(specs: Any) -> list[dict]:
  """The `models` list of a reward spec, validated without loading anything."""
  out = []
  for i, m in enumerate(specs or []):
    m = dict(m)
    if "name" not in m or "path" not in m or "tokenizer" not in m:
      raise ValueError(f"rewards.models[{i}] needs name, path and tokenizer, got {sorted(m)}")
    unknown = set(m) - MODEL_KEYS
    if unknown:
      raise ValueError(f"rewards.models[{i}] ({m['name']}): unknown keys {sorted(unknown)}; "
                       f"allowed: {sorted(MODEL_KEYS)}")
    if m.get("view", "full") not in registry.VIEWS:
      raise ValueError(f"rewards.models[{i}] ({m['name']}): view must be one of "
                       f"{registry.VIEWS}")
    norm_from(m.get("norm", "none"))
    out.append(m)
  names = [m["name"] for m in out]
  if len(set(names)) != len(names):
    raise ValueError(f"rewards.models names must be unique, got {names}")
  return out


class _Unloaded:
  """Stands for a declared model while a spec is only validated."""

  def __init__(self, name: str):
    self.name = name

  def launch(self, *_, **__):
    raise RuntimeError(f"reward model {self.name!r} was declared but not loaded: build the "
                       "scorer with models=reward_model.load_models(spec['models'], mesh)")

  __call__ = launch


def placeholder(spec: dict) -> registry.RewardDef:
  """A declared, not loaded, model's registry entry (name, inputs, view)."""
  return registry.RewardDef(_Unloaded(spec["name"]), ("prompt",), "device",
                            spec.get("view", "full"))
