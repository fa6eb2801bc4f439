"""Named reward functions that a reward spec (see compose.py) may refer to.

Three kinds, by where they run:
- pool (default): fn(text, **inputs, **kwargs) -> float in a RewardPool worker with a hard
  timeout. fn must be a module-level function (it is pickled by name).
- inline: the same signature, run in the trainer thread; only for cheap linear-time functions
  that cannot hang (format, language, length), since nothing can time them out there.
- batch: fn(texts: list[str], **input_lists, **kwargs) -> list[float], run once per batch in the
  trainer thread. This is the hook for model-based rewards (helpfulness on the summary,
  safety on the whole response): `register("helpfulness", rm_fn, kind="batch", view="summary")`.
- device: an object with fn.launch(texts, **input_lists, **kwargs) -> pending, pending.result()
  -> list[float]: a model on the accelerator (rewards/reward_model.py:RewardModel). It is
  launched when the batch is submitted and collected after the host rewards ran, so the
  device forward overlaps them; a non-finite score counts as a failure.
`view` picks the text a reward judges: the full response, its reasoning, or its summary.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from r1jax.rewards import code as code_lib
from r1jax.rewards import format as format_lib
from r1jax.rewards import language
from r1jax.rewards import length as length_lib
from r1jax.rewards import math as math_lib

KINDS = ("pool", "inline", "batch", "device")
VIEWS = ("full", "reasoning", "summary")


@dataclasses.dataclass(frozen=True)
class RewardDef:
  """A registered reward: how to call it and what it reads."""

  fn: Callable[..., Any]
  inputs: tuple[str, ...] = ()  # per-sample arguments read from dataset fields
  kind: str = "pool"  # one of KINDS
  view: str = "full"  # one of VIEWS
  timeout_s: float = 10.0  # hard per-sample limit (pool kind)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"reward kind must be one of {KINDS}, got {self.kind!r}")
    if self.view not in VIEWS:
      raise ValueError(f"reward view must be one of {VIEWS}, got {self.view!r}")

  def parameters(self) -> set[str] | None:
    """Keyword arguments fn accepts besides the text; None if it takes **kwargs."""
    params = list(inspect.signature(self.fn).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
      return None
    return {p.name for p in params}


REGISTRY: dict[str, RewardDef] = {}


def register(name: str, fn: Callable[..., Any], *, inputs: tuple[str, ...] = (),
             kind: str = "pool", view: str = "full", timeout_s: float = 10.0,
             overwrite: bool = False) -> RewardDef:
  """Adds a reward under `name`; refuses to replace one silently."""
  if name in REGISTRY and not overwrite:
    raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
  if not callable(fn):
    raise TypeError(f"reward {name!r}: fn must be callable, got {type(fn).__name__}")
  if kind == "device" and not callable(getattr(fn, "launch", None)):
    raise TypeError(f"device reward {name!r} needs a launch(texts, ...) method")
  if kind == "pool" and (getattr(fn, "__qualname__", "<") != getattr(fn, "__name__", "")
                         or "<" in getattr(fn, "__qualname__", "<")):
    raise ValueError(f"pool reward {name!r} must be a module-level function (it is pickled "
                     "by name into worker processes); use kind='inline' for closures")
  reward = RewardDef(fn, tuple(inputs), kind, view, timeout_s)
  accepted = reward.parameters()
  missing = set() if accepted is None else set(reward.inputs) - accepted
  if missing:
    raise ValueError(f"reward {name!r}: fn has no parameters {sorted(missing)}")
  REGISTRY[name] = reward
  return reward


def get(name: str) -> RewardDef:
  """The reward registered as `name`, or a ValueError listing the known ones."""
  if name not in REGISTRY:
    raise ValueError(f"unknown reward {name!r}; registered: {sorted(REGISTRY)}")
  return REGISTRY[name]


def view_text(completion: str, view: str) -> str:
  """The part of a completion a reward judges: full, reasoning (CoT) or summary (after </think>)."""
  if view == "full":
    return completion
  if view == "reasoning":
    return language.reasoning_text(completion)
  if view == "summary":
    return math_lib.answer_region(completion)
  raise ValueError(f"view must be one of {VIEWS}, got {view!r}")


register("accuracy", math_lib.accuracy_reward, inputs=("gold",), timeout_s=10.0)
register("code", code_lib.code_reward, inputs=("tests",), timeout_s=90.0)
register("code_binary", code_lib.code_reward_binary, inputs=("tests",), timeout_s=90.0)
register("cosine_length", length_lib.cosine_length_reward, inputs=("gold", "length"))
register("format", format_lib.format_reward, kind="inline")
register("tag_count", format_lib.tag_count_reward, kind="inline")
register("language", language.language_consistency_reward, kind="inline")
register("overlong", length_lib.overlong_penalty, inputs=("length",), kind="inline")
