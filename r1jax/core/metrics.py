"""Training metrics: an append-only JSONL log, TensorBoard event files, a console progress line.

Key conventions (what `progress_line` and tools/plot_metrics.py look for):
  reward/total, reward/<component>      rewards.compose.RewardBatch.metrics()
  accuracy, kl, entropy, clip_frac_low / clip_frac_high (or clip_frac), loss, grad_norm, lr
  response_length/{mean,max,min}         response_stats(lengths)
  reflect/<word>, reflect/total          reflection_counts(texts): R1's behaviour analytics
  tokens_per_s, time/{rollout,reward,update,step}   StepTimer
  eval/<benchmark>/{pass@1,cons@k,...}   evaluate.summary_metrics(report)
Only process 0 writes, so a multi-host run logs once. A non-finite value is `null` in the JSONL
(strict JSON, readable by any parser) and NaN / ±inf in TensorBoard, which draws it as a gap.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import re
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

from r1jax.core import storage
from r1jax.core import tb_events
from r1jax.core.storage import Path

_log = logging.getLogger(__name__)

# DeepSeek-R1 §4: the reflective words whose frequency rises 5-7x during RL.
REFLECTIVE_WORDS = ("wait", "mistake", "however", "but", "retry", "error", "verify", "wrong",
                    "evaluate", "check")
_WORDS_RE = re.compile(r"\b(" + "|".join(REFLECTIVE_WORDS) + r")\b", re.IGNORECASE)
JSONL_NAME = "metrics.jsonl"
TB_DIR = "tensorboard"


def to_float(value: Any) -> float:
  """A Python float from a number, numpy / jax scalar or one-element array; else TypeError."""
  if isinstance(value, (bool, int, float)):
    return float(value)
  try:
    array = np.asarray(value)  # jax arrays transfer to the host here
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(f"metric value {value!r} is not a number") from e
  if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
    raise TypeError(f"metric value must be a numeric scalar, got dtype {array.dtype} "
                    f"shape {array.shape}")
  return float(array.reshape(()))


class MetricsWriter:
  """Writes `{"step", "time", key: value}` lines to WORKDIR/metrics.jsonl (+ TensorBoard)."""

  def __init__(self, workdir: str | Path, tensorboard: bool = True,
               process_index: int | None = None):
    if process_index is None:
      process_index = jax.process_index()
    self.active = process_index == 0
    self.path = storage.path(workdir) / JSONL_NAME
    self._file = self._tb = None
    if not self.active:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    # A run killed mid-write leaves a partial last line; start ours on a fresh line.
    needs_newline = self.path.exists() and storage.size(self.path) > 0 and (
        self.path.read_bytes()[-1:] != b"\n")
    self._file = storage.Appender(self.path, upload_every_s=storage.LOG_UPLOAD_S)
    if needs_newline:
      self._file.write("\n")
    if tensorboard:
      self._tb = tb_events.EventWriter(storage.path(workdir) / TB_DIR)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs one step's scalars; call it again with the same step to add more keys."""
    if not self.active:
      return
    values = {str(k): to_float(v) for k, v in metrics.items()}
    record = {"step": int(step), "time": round(time.time(), 3)}
    record.update({k: v if math.isfinite(v) else None for k, v in values.items()})
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()  # a crash must not lose the steps before it
    if self._tb is not None:
      self._tb.add_scalars(int(step), values)

  def sync(self) -> None:
    """Every line written so far in the file (on an object store a log is uploaded at most
    every `storage.LOG_UPLOAD_S`): before reading it back."""
    if self._file is not None:
      self._file.flush(force=True)

  def close(self) -> None:
    """Flushes and closes both files; later writes are an error."""
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    self._file = self._tb = None
    self.active = False

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(path: str | Path, merge: bool = True) -> list[dict[str, Any]]:
  """Records from a metrics.jsonl; `merge` joins each step's records (a later value wins).

  After a resume a step may be logged twice; merging keeps the newest values. A line a crash
  cut short is skipped with a warning. JSON nulls (non-finite values) read back as NaN.
  """
  records = []
  with storage.path(path).open("r", encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        _log.warning("%s:%d: skipping a malformed line", path, i)
        continue
      records.append({k: (math.nan if v is None else v) for k, v in record.items()})
  if not merge:
    return records
  by_step: dict[int, dict[str, Any]] = {}
  for record in records:
    by_step.setdefault(record["step"], {}).update(record)
  return [by_step[s] for s in sorted(by_step)]


def worst_drops(records: Sequence[Mapping[str, Any]], suffix: str = "/pass@1"
                ) -> dict[str, dict[str, float]]:
  """Each held-out curve's (`eval/…<suffix>`) worst mid-run drop: the largest fall below an
  earlier peak, with the peak's and the trough's steps, and its best and final values. A
  stable RL stage keeps `drop` small; `best - final` is what best-checkpoint selection
  would win back. `records`: `read_metrics`' merged ones (a resumed step's newest value)."""
  out = {}
  keys = sorted({k for r in records for k in r if k.startswith("eval/") and k.endswith(suffix)})
  for key in keys:
    curve = [(r["step"], float(r[key])) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not curve:
      continue
    peak = curve[0]
    worst = {"drop": 0.0, "peak_step": curve[0][0], "trough_step": curve[0][0]}
    for step, v in curve:
      if v > peak[1]:
        peak = (step, v)
      if peak[1] - v > worst["drop"]:
        worst = {"drop": peak[1] - v, "peak_step": peak[0], "trough_step": step}
    best = max(curve, key=lambda sv: sv[1])
    out[key] = {**worst, "best": best[1], "best_step": best[0], "final": curve[-1][1]}
  return out


def reflection_counts(texts: Sequence[str], prefix: str = "reflect/") -> dict[str, float]:
  """Mean occurrences per response of each reflective word (whole words, any case), + total."""
  counts = collections.Counter()
  for text in texts:
    counts.update(m.lower() for m in _WORDS_RE.findall(text))
  n = max(len(texts), 1)
  out = {f"{prefix}{w}": counts[w] / n for w in REFLECTIVE_WORDS}
  out[f"{prefix}total"] = sum(counts.values()) / n
  return out


def response_stats(lengths: Iterable[int] | np.ndarray,
                   prefix: str = "response_length/") -> dict[str, float]:
  """Mean / max / min response length (tokens); NaN for an empty batch."""
  x = np.asarray(list(lengths) if not isinstance(lengths, np.ndarray) else lengths, np.float64)
  if x.size == 0:
    return {f"{prefix}{s}": math.nan for s in ("mean", "max", "min")}
  return {f"{prefix}mean": float(x.mean()), f"{prefix}max": float(x.max()),
          f"{prefix}min": float(x.min())}


class StepTimer:
  """Wall time per phase: `with timer("rollout"): ...`, then `timer.metrics()` (time/<phase>)."""

  def __init__(self):
    self.seconds: dict[str, float] = collections.defaultdict(float)

  @contextlib.contextmanager
  def __call__(self, phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[phase] += time.perf_counter() - start

  def metrics(self) -> dict[str, float]:
    out = {f"time/{k}": v for k, v in self.seconds.items()}
    self.seconds.clear()
    return out


def _fmt(x: float) -> str:
  """4 significant characters or so: 0.532, 12.4, 1.2e-03, 3.1k, nan."""
  if not math.isfinite(x):
    return str(x)
  a = abs(x)
  if a == 0:
    return "0"
  if a >= 1e4:
    return f"{x / 1e3:.0f}k" if a < 1e6 else f"{x:.2e}"
  if a >= 100:
    return f"{x:.0f}"
  if a >= 0.01:
    return f"{x:.3g}"
  return f"{x:.1e}"


_SKIP_REWARD_KEYS = ("total", "seconds", "pool_cpu_s", "device_s", "masked_samples")


def _eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  if seconds < 90:
    return f"{seconds:.0f}s"
  return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def progress_line(step: int, metrics: Mapping[str, Any], total: int | None = None,
                  eta_s: float | None = None) -> str:
  """One compact console line with whichever of the conventional keys are present: the
  step (of `total`), the reward and each component's mean over the batch (per-task means
  stay in the metrics files and TensorBoard, so the line stays one line), and the ETA."""
  m = {k: to_float(v) for k, v in metrics.items()
       if isinstance(v, (int, float, np.number, np.ndarray)) or hasattr(v, "dtype")}
  parts = [f"step {step}" + (f"/{total}" if total else "")]
  components = [f"{k[7:]} {_fmt(v)}" for k, v in m.items()
                if k.startswith("reward/") and k.count("/") == 1 and not k.endswith("_failures")
                and k[7:] not in _SKIP_REWARD_KEYS]
  if "reward/total" in m or components:
    total_r = _fmt(m["reward/total"]) if "reward/total" in m else "-"
    parts.append(f"reward {total_r}" + (f" ({', '.join(components)})" if components else ""))
  for key, label in (("accuracy", "acc"), ("kl", "kl"), ("entropy", "ent"), ("loss", "loss")):
    if key in m:
      parts.append(f"{label} {_fmt(m[key])}")
  clip = m.get("clip_frac")
  if clip is None and ("clip_frac_low" in m or "clip_frac_high" in m):
    clip = m.get("clip_frac_low", 0.0) + m.get("clip_frac_high", 0.0)
  if clip is not None:
    parts.append(f"clip {_fmt(clip)}")
  if "response_length/mean" in m:
    parts.append(f"len {_fmt(m['response_length/mean'])}/"
                 f"{_fmt(m.get('response_length/max', math.nan))}")
  if "reflect/total" in m:
    parts.append(f"reflect {_fmt(m['reflect/total'])}")
  if "tokens_per_s" in m:
    parts.append(f"{_fmt(m['tokens_per_s'])} tok/s")
  times = {k[5:]: v for k, v in m.items() if k.startswith("time/")}
  if times:
    total = times.pop("step", sum(times.values()))
    split = " ".join(f"{k} {v:.1f}" for k, v in times.items())
    parts.append(f"{total:.1f}s" + (f" ({split})" if split else ""))
  if eta_s is not None:
    parts.append(f"ETA {_eta(eta_s)}")
  return " | ".join(parts)
