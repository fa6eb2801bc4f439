"""Metric curves as PNGs: one file per key group (rewards, accuracy, length, reflection, …).

Groups follow the key conventions in r1jax/metrics.py. tools/plot_metrics.py is the CLI; the
pipeline stage calls `plot` directly at the end of a run.
"""

from __future__ import annotations

import fnmatch
import io
import math
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from r1jax.core.storage import Path

_REWARD_EXTRAS = ("reward/total", "reward/seconds", "reward/pool_cpu_s")

# (file stem, which keys, one subplot per key (True) or all on one axis)
GROUPS: tuple[tuple[str, Callable[[str], bool], bool], ...] = (
    ("reward", lambda k: k == "reward/total" or (
        k.startswith("reward/") and not k.endswith("_failures") and k not in _REWARD_EXTRAS),
     False),
    ("accuracy", lambda k: k.split("/")[-1] == "accuracy" or "pass@" in k or "cons@" in k, False),
    ("response_length", lambda k: k.startswith("response_length/"), False),
    ("reflective_words", lambda k: k.startswith("reflect/"), False),
    ("kl_clip_entropy", lambda k: k in ("kl", "entropy", "approx_kl_old")
     or k.startswith("clip_frac"), True),
    ("time", lambda k: k.startswith("time/") or k == "tokens_per_s", True),
)


def _series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the records that hold `key`; NaN stays NaN (a gap in the line)."""
  steps, values = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      steps.append(r["step"])
      values.append(float(v))
  return steps, values


def _draw(records: Sequence[dict], keys: Sequence[str], title: str, path: Path,
          separate: bool) -> Path:
  rows = len(keys) if separate else 1
  fig, axes = plt.subplots(rows, 1, figsize=(8, 2.2 * rows + 1.3 * (not separate)),
                           sharex=True, squeeze=False)
  for i, key in enumerate(keys):
    ax = axes[i if separate else 0][0]
    steps, values = _series(records, key)
    ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
    if separate:
      ax.set_ylabel(key, fontsize=8)
  for (ax,) in axes:
    ax.grid(alpha=0.3)
  if not separate:
    axes[0][0].legend(fontsize=7, ncol=2)
  axes[-1][0].set_xlabel("step")
  fig.suptitle(title)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  Path(path).write_bytes(png.getvalue())  # local or gs://
  plt.close(fig)
  return path


def plot(records: Sequence[dict], out_dir: str | Path,
         keys: Sequence[str] | None = None) -> list[Path]:
  """Writes the PNGs for these records; returns their paths (a group with no data is skipped)."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  present = []
  for r in records:
    present += [k for k, v in r.items() if k not in ("step", "time") and k not in present
                and isinstance(v, (int, float)) and not isinstance(v, bool)]
  # A key whose every value is NaN has nothing to draw.
  present = [k for k in present if any(not math.isnan(v) for v in _series(records, k)[1])]
  if keys:
    chosen = [k for k in present if any(fnmatch.fnmatchcase(k, p) for p in keys)]
    if not chosen:
      raise ValueError(f"no key matches {list(keys)}; keys: {present}")
    return [_draw(records, chosen, "keys", out_dir / "keys.png", separate=len(chosen) > 1)]
  paths = []
  for name, match, separate in GROUPS:
    chosen = [k for k in present if match(k)]
    if chosen:
      paths.append(_draw(records, chosen, name, out_dir / f"{name}.png", separate))
  return paths
