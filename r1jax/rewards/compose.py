"""Reward composition: a spec (plain data, for the config) -> per-sample totals and components.

The spec, e.g. `config.rewards`:
  task_field: "task"          # sample field holding its task type; routes samples as R1's
  default_task: "math"        #   all-scenario stage does (math / code / general)
  timeout_s: 10.0, fallback: 0.0, num_workers: 2, worker_memory_mb: 4096   # the pool
  components: [               # one dict per reward; unknown keys are errors
    {"name": "accuracy", "weight": 1.0, "tasks": ["math"], "fields": {"gold": "answer"}},
    {"name": "code", "tasks": ["code"], "fields": {"tests": "tests"}, "timeout_s": 90},
    {"name": "format", "weight": 0.5, "kwargs": {"require_answer_tag": True}},
    {"name": "language", "key": "lang_en", "weight": 0.1, "kwargs": {"lang": "en"}},
  ]
Routing by task, as R1's all-scenario stage does, may instead be one readable group:
  by_task: {"math": {"accuracy": 1.0, "format": 0.5, "language": 0.1, "safety": 1.0},
            "general": {"helpful": 1.0, "safety": 1.0}}
which names, per task, the component keys that judge it and their weights (a component's own
`weight` / `tasks` are then not used). A sample whose task is in no group is an error.
A component applies to the samples whose task is in its `tasks` (default: every task). `fields`
maps the reward's per-sample inputs to dataset fields (default: same name), `kwargs` are fixed
arguments, `key` names it in the logs (default: name). The total is the weighted sum of the
components that apply; components that do not apply are NaN in the per-component arrays.

Overlap: `submit` queues the pool rewards and returns at once (call it as soon as the rollout's
tokens are on the host); `PendingRewards.result()` runs the inline and batch rewards in this
thread while the workers run, then collects everything, just before the advantages.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Mapping, Sequence

import numpy as np

from r1jax.core.background import Pending
from r1jax.rewards import pool as pool_lib
from r1jax.rewards import registry
from r1jax.rewards import model_specs

_log = logging.getLogger(__name__)
_COMPONENT_KEYS = {"name", "key", "weight", "tasks", "fields", "kwargs", "timeout_s", "fallback",
                   "view"}
_SPEC_KEYS = {"components", "task_field", "default_task", "timeout_s", "fallback", "num_workers",
              "worker_memory_mb", "by_task", "models"}


def _plain(x: Any) -> Any:
  """ConfigDict / FrozenConfigDict / tuples -> dicts and lists, recursively."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


@dataclasses.dataclass(frozen=True)
class Component:
  """One validated entry of the spec."""

  key: str
  reward: registry.RewardDef
  weight: float
  tasks: frozenset[str] | None  # None: every task
  fields: dict[str, str]  # reward input -> sample field
  kwargs: dict[str, Any]
  timeout_s: float
  fallback: float
  view: str
  task_weights: dict[str, float] | None = None  # by_task routing: the weight per task

  def weight_for(self, task: str) -> float:
    return self.weight if self.task_weights is None else self.task_weights.get(task, 0.0)


def _check_finite(value: Any, key: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
    raise TypeError(f"reward {key!r} returned {type(value).__name__}, not a number")
  if not math.isfinite(value):
    raise ValueError(f"reward {key!r} returned {value}")
  return float(value)


def _every_process(c: Component) -> bool:
  """A device reward every process must launch and collect, rows or none (a reward model in
  several processes: its forward is one program over all of their rows)."""
  return bool(getattr(c.reward.fn, "every_process", False))


def _call_reward(fn, text: str, kwargs: dict[str, Any], key: str) -> float:
  """Runs one per-sample reward (in a worker or inline) and checks that it returned a number."""
  return _check_finite(fn(text, **kwargs), key)


def parse_spec(spec: Any, models: dict[str, registry.RewardDef] | None = None
               ) -> tuple[dict[str, Any], list[Component]]:
  """Validates a reward spec; returns (pool/routing settings, components).

  Reward models declared in spec["models"] are `models` (loaded by RewardScorer), or, when
  only validating, placeholders that check the names and views without loading weights.
  """
  spec = _plain(spec)
  if not isinstance(spec, dict):
    raise ValueError(f"reward spec must be a mapping, got {type(spec).__name__}")
  unknown = set(spec) - _SPEC_KEYS
  if unknown:
    raise ValueError(f"unknown reward spec keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
  settings = {"task_field": "task", "default_task": "math", "timeout_s": 10.0, "fallback": 0.0,
              "num_workers": None, "worker_memory_mb": 4096,
              **{k: v for k, v in spec.items() if k not in ("components", "models")}}
  declared = {m["name"]: m for m in model_specs.check_model_specs(spec.get("models"))}
  if models is None:
    models = {name: model_specs.placeholder(m) for name, m in declared.items()}
  elif set(models) != set(declared):
    raise ValueError(f"loaded reward models {sorted(models)} are not the declared ones "
                     f"{sorted(declared)}")
  entries = spec.get("components")
  if not entries or not isinstance(entries, list):
    raise ValueError("reward spec needs a non-empty list `components`")
  components = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict) or "name" not in entry:
      raise ValueError(f"reward component {i} must be a dict with a `name`, got {entry!r}")
    unknown = set(entry) - _COMPONENT_KEYS
    if unknown:
      raise ValueError(f"reward component {entry['name']!r}: unknown keys {sorted(unknown)}; "
                       f"allowed: {sorted(_COMPONENT_KEYS)}")
    reward = models[entry["name"]] if entry["name"] in models else registry.get(entry["name"])
    key = entry.get("key", entry["name"])
    fields = dict(entry.get("fields") or {})
    kwargs = dict(entry.get("kwargs") or {})
    accepted = reward.parameters()
    if accepted is not None:
      bad = (set(fields) | set(kwargs)) - accepted
      if bad:
        raise ValueError(f"reward component {key!r}: {reward.fn.__name__} has no arguments "
                         f"{sorted(bad)}; it accepts {sorted(accepted)}")
    both = set(fields) & set(kwargs)
    if both:
      raise ValueError(f"reward component {key!r}: {sorted(both)} given as both field and kwarg")
    for name in reward.inputs:
      if name not in kwargs:
        fields.setdefault(name, name)
    tasks = entry.get("tasks")
    if isinstance(tasks, str):
      tasks = [tasks]
    components.append(Component(
        key=key, reward=reward, weight=float(entry.get("weight", 1.0)),
        tasks=None if tasks is None else frozenset(tasks), fields=fields, kwargs=kwargs,
        timeout_s=float(entry.get("timeout_s", reward.timeout_s)),
        fallback=float(entry.get("fallback", settings["fallback"])),
        view=entry.get("view", reward.view)))
    if components[-1].view not in registry.VIEWS:
      raise ValueError(f"reward component {key!r}: view must be one of {registry.VIEWS}")
  keys = [c.key for c in components]
  if len(set(keys)) != len(keys):
    raise ValueError(f"reward component keys must be unique (set `key`), got {keys}")
  if spec.get("by_task") is not None:
    components = _route(spec["by_task"], components, entries)
  return settings, components


def _route(by_task: Any, components: list[Component], entries: list[dict]) -> list[Component]:
  """Components with their tasks and per-task weights taken from a by_task group."""
  if not isinstance(by_task, dict) or not by_task:
    raise ValueError("rewards.by_task must map each task to {component key: weight}")
  keys = {c.key for c in components}
  for task, group in by_task.items():
    if not isinstance(group, dict) or not group:
      raise ValueError(f"rewards.by_task[{task!r}] must be a non-empty {{key: weight}} map")
    unknown = set(group) - keys
    if unknown:
      raise ValueError(f"rewards.by_task[{task!r}] names {sorted(unknown)}, which are not "
                       f"component keys ({sorted(keys)})")
  out = []
  for c, entry in zip(components, entries):
    if "tasks" in entry or "weight" in entry:
      raise ValueError(f"reward component {c.key!r}: with rewards.by_task, set its tasks and "
                       "weights there, not on the component")
    weights = {t: float(g[c.key]) for t, g in by_task.items() if c.key in g}
    if not weights:
      raise ValueError(f"reward component {c.key!r} judges no task in rewards.by_task")
    out.append(dataclasses.replace(c, tasks=frozenset(weights), task_weights=weights))
  return out


@dataclasses.dataclass(frozen=True)
class RewardBatch:
  """Rewards of one batch of N samples (N = B·G in RL)."""

  total_N: np.ndarray  # float32 [N]: weighted sum of the components that apply
  components: dict[str, np.ndarray]  # key -> float32 [N] unweighted; NaN where not applicable
  failed: dict[str, np.ndarray]  # key -> bool [N]: raised / timed out / crashed -> fallback
  seconds: float  # wall time from submit to result
  pool_cpu_s: float  # CPU time the pool workers spent on this batch
  tasks: tuple[str, ...] = ()  # (N,) each sample's task
  device_s: float = 0.0  # host time launching device (reward-model) rewards and waiting on them
  device_keys: frozenset[str] = frozenset()  # the components that are device rewards

  def metrics(self) -> dict[str, float]:
    """Scalars for logging: mean of each component where it applies, failure counts, total;
    with several tasks, the same per task (`reward/<task>/<key>`)."""
    out = {"reward/total": float(np.mean(self.total_N)) if self.total_N.size else 0.0,
           "reward/seconds": self.seconds, "reward/pool_cpu_s": self.pool_cpu_s,
           "reward/device_s": self.device_s}
    mean = lambda v: float(np.mean(v)) if v.size else float("nan")
    for key, values in self.components.items():
      applies = ~np.isnan(values)
      out[f"reward/{key}"] = mean(values[applies])
      out[f"reward/{key}_failures"] = float(self.failed[key].sum())
    tasks = np.asarray(self.tasks)
    if len(set(self.tasks)) > 1:
      for task in sorted(set(self.tasks)):
        rows = tasks == task
        out[f"reward/{task}/total"] = mean(self.total_N[rows])
        out[f"reward/{task}/samples"] = float(rows.sum())
        for key, values in self.components.items():
          v = values[rows]
          if (~np.isnan(v)).any():
            out[f"reward/{task}/{key}"] = mean(v[~np.isnan(v)])
    return out


class PendingRewards(Pending[RewardBatch]):
  """Rewards being computed for one batch (core/background.py); `result()` blocks until all
  are in."""

  def __init__(self, scorer: RewardScorer, samples: list[Mapping[str, Any]],
               tasks: list[str]):
    self._scorer, self._samples, self._tasks = scorer, samples, tasks
    self._start = time.monotonic()
    self._futures = {}  # (component index, sample index) -> Future
    self._device = {}  # component index -> (sample indices, launched device scoring or error)
    for ci, c in enumerate(scorer.components):
      if c.reward.kind != "pool":
        continue
      for si in self._applicable(c):
        text, kwargs = scorer.arguments(c, samples[si])
        self._futures[ci, si] = scorer.pool.submit(
            _call_reward, c.reward.fn, text, kwargs, c.key, timeout_s=c.timeout_s,
            fallback=c.fallback)
    # Reward models: dispatched to the device now, collected after the host rewards ran.
    t0 = time.monotonic()
    for ci, c in enumerate(scorer.components):
      if c.reward.kind == "device":
        idx = self._applicable(c)
        texts, columns = self._columns(c, idx)
        try:
          self._device[ci] = (idx, c.reward.fn.launch(texts, **columns, **c.kwargs)
                              if idx or _every_process(c) else None)
        except Exception as e:  # pylint: disable=broad-except
          self._device[ci] = (idx, e)
    self._device_s = time.monotonic() - t0

  def _applicable(self, c: Component) -> list[int]:
    return [i for i, t in enumerate(self._tasks) if c.tasks is None or t in c.tasks]

  def _run_inline(self, c: Component, idx: list[int], values, failed) -> None:
    for si in idx:
      text, kwargs = self._scorer.arguments(c, self._samples[si])
      try:
        values[si] = _call_reward(c.reward.fn, text, kwargs, c.key)
      except Exception as e:  # pylint: disable=broad-except  (a reward bug must not kill RL)
        _log.warning("reward %s failed on sample %d: %s: %s", c.key, si, type(e).__name__, e)
        values[si], failed[si] = c.fallback, True

  def _columns(self, c: Component, idx: list[int]) -> tuple[list[str], dict[str, list]]:
    """The texts (in c's view) and per-sample input columns of the samples idx."""
    texts, columns = [], {name: [] for name in c.fields}
    for si in idx:
      text, kwargs = self._scorer.arguments(c, self._samples[si])
      texts.append(text)
      for name in c.fields:
        columns[name].append(kwargs[name])
    return texts, columns

  def _collect_device(self, ci: int, values, failed) -> None:
    """A reward model's scores; a non-finite score (or a failed call) is a failure, counted
    and given the fallback: RL masks such samples out of the update."""
    c = self._scorer.components[ci]
    idx, launched = self._device[ci]
    if not idx and launched is None:
      return
    try:
      if isinstance(launched, Exception):
        raise launched
      out = np.asarray(launched.result(), np.float64)  # every process's part, when launched
      if out.shape != (len(idx),):
        raise ValueError(f"returned {out.shape} rewards for {len(idx)} samples")
    except Exception as e:  # pylint: disable=broad-except
      _log.warning("device reward %s failed: %s: %s", c.key, type(e).__name__, e)
      values[idx], failed[idx] = c.fallback, True
      return
    bad = ~np.isfinite(out)
    if bad.any():
      _log.warning("device reward %s: %d non-finite scores masked", c.key, int(bad.sum()))
    values[idx] = np.where(bad, c.fallback, out)
    failed[np.asarray(idx, np.int64)[bad]] = True

  def _run_batch(self, c: Component, idx: list[int], values, failed) -> None:
    texts, columns = self._columns(c, idx)
    try:
      out = list(c.reward.fn(texts, **columns, **c.kwargs)) if idx else []
      if len(out) != len(idx):
        raise ValueError(f"returned {len(out)} rewards for {len(idx)} samples")
      values[idx] = [_check_finite(v, c.key) for v in out]
    except Exception as e:  # pylint: disable=broad-except
      _log.warning("batch reward %s failed: %s: %s", c.key, type(e).__name__, e)
      values[idx], failed[idx] = c.fallback, True

  def _collect(self) -> RewardBatch:
    """Runs inline and batch rewards here (overlapping the workers), then waits for the pool."""
    n = len(self._samples)
    components, failed = {}, {}
    for ci, c in enumerate(self._scorer.components):
      values = np.full(n, np.nan, np.float32)
      fails = np.zeros(n, bool)
      idx = self._applicable(c)
      if c.reward.kind == "inline":
        self._run_inline(c, idx, values, fails)
      elif c.reward.kind == "batch":
        self._run_batch(c, idx, values, fails)
      components[c.key], failed[c.key] = values, fails
    t0 = time.monotonic()
    for ci in self._device:
      c = self._scorer.components[ci]
      self._collect_device(ci, components[c.key], failed[c.key])
    device_s = self._device_s + time.monotonic() - t0
    pool_cpu_s = 0.0
    for (ci, si), future in self._futures.items():
      outcome = future.result()
      pool_cpu_s += outcome.cpu_s
      key = self._scorer.components[ci].key
      # A broken pool stops the caller (RL stops the run): no reward was computed at all.
      components[key][si] = outcome.value_or_raise()
      failed[key][si] = not outcome.ok
    total = np.zeros(n, np.float32)
    for c in self._scorer.components:
      w = np.asarray([c.weight_for(t) for t in self._tasks], np.float32)
      total += w * np.nan_to_num(components[c.key], nan=0.0)
    return RewardBatch(total, components, failed, time.monotonic() - self._start, pool_cpu_s,
                       tuple(self._tasks), device_s,
                       frozenset(self._scorer.components[ci].key for ci in self._device))


class RewardScorer:
  """Scores batches of samples with the rewards of a spec, pool rewards in worker processes."""

  def __init__(self, spec: Any, pool: pool_lib.RewardPool | None = None,
               models: dict[str, registry.RewardDef] | None = None):
    """models: the spec's declared reward models, loaded (rewards/reward_model.py:
    load_models); a spec that declares some cannot score without them."""
    plain = _plain(spec)
    if isinstance(plain, dict) and plain.get("models") and models is None:
      raise ValueError("the reward spec declares reward models: load them first, "
                       "RewardScorer(spec, models=reward_model.load_models(spec['models'], mesh))")
    self.settings, self.components = parse_spec(spec, models)
    self.tasks = None if any(c.tasks is None for c in self.components) else frozenset().union(
        *(c.tasks for c in self.components))
    needs_pool = any(c.reward.kind == "pool" for c in self.components)
    self._own_pool = pool is None and needs_pool
    self.pool = pool if pool is not None or not needs_pool else pool_lib.RewardPool(
        num_workers=self.settings["num_workers"], timeout_s=self.settings["timeout_s"],
        fallback=self.settings["fallback"], memory_mb=self.settings["worker_memory_mb"])

  def arguments(self, c: Component, sample: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The text and keyword arguments component c gets for one sample."""
    kwargs = dict(c.kwargs)
    for arg, field in c.fields.items():
      kwargs[arg] = sample[field]
    return registry.view_text(sample["completion"], c.view), kwargs

  def _task_of(self, i: int, sample: Mapping[str, Any]) -> str:
    if not isinstance(sample, Mapping) or not isinstance(sample.get("completion"), str):
      raise ValueError(f"sample {i} must be a mapping with a str `completion`")
    task = sample.get(self.settings["task_field"], self.settings["default_task"])
    if self.tasks is not None and task not in self.tasks:
      raise ValueError(f"sample {i} has task {task!r}, which no reward component handles "
                       f"(known: {sorted(self.tasks)})")
    for c in self.components:
      if c.tasks is None or task in c.tasks:
        missing = [f for f in c.fields.values() if f not in sample]
        if missing:
          raise ValueError(f"sample {i} (task {task!r}) lacks fields {missing} that reward "
                           f"{c.key!r} reads")
    return task

  def check_tasks(self, tasks: Sequence[str], source: str = "data") -> None:
    """Every task of a prompt set has components that judge it: a clear error before work."""
    if self.tasks is None:
      return
    counts: dict[str, int] = {}
    for t in tasks:
      counts[t] = counts.get(t, 0) + 1
    unjudged = {t: n for t, n in counts.items() if t not in self.tasks}
    if unjudged:
      raise ValueError(f"{source}: rows of tasks {unjudged} (task: count) have no reward "
                       f"components; the spec judges {sorted(self.tasks)}. Add them to "
                       "rewards.by_task (or a component's tasks), or drop those rows.")

  def submit(self, samples: Sequence[Mapping[str, Any]]) -> PendingRewards:
    """Starts scoring; returns at once. Each sample: {"completion": str, task field, inputs…}."""
    samples = list(samples)
    tasks = [self._task_of(i, s) for i, s in enumerate(samples)]
    return PendingRewards(self, samples, tasks)

  def score(self, samples: Sequence[Mapping[str, Any]]) -> RewardBatch:
    """submit + result."""
    return self.submit(samples).result()

  def close(self) -> None:
    if self._own_pool:
      self.pool.close()

  def __enter__(self) -> RewardScorer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def reward_inputs(problems: Sequence[Mapping[str, Any]], texts: Sequence[str],
                  lengths_N: Sequence[int], group: int) -> list[dict[str, Any]]:
  """Scorer samples for N = B·G completions: problem i // G's fields + completion + length."""
  out = []
  for i, text in enumerate(texts):
    p = problems[i // group]
    out.append({**p.get("meta", {}), **{k: v for k, v in p.items() if k != "meta"},
                "completion": text, "num_tokens": int(lengths_N[i])})
  return out
