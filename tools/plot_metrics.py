"""Renders a run's metrics.jsonl to PNG curves, one file per key group, step on x.

  python tools/plot_metrics.py --metrics=WORKDIR/metrics.jsonl --out=WORKDIR/plots
  python tools/plot_metrics.py --metrics=... --out=... --keys='kl,eval/*/pass@1'

Groups follow the key conventions in r1jax/core/metrics.py: reward components, accuracy (train and
eval pass@1 / cons@k), response length, reflective words, KL / clip / entropy, time. `--keys`
(comma-separated, shell-style wildcards) draws just those keys into keys.png.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from r1jax.core.metrics import read_metrics
from r1jax.core.plots import plot

_METRICS = flags.DEFINE_string("metrics", None, "A metrics.jsonl written by MetricsWriter.")
_OUT = flags.DEFINE_string("out", None, "Folder for the PNG files (created).")
_KEYS = flags.DEFINE_list("keys", None, "Only these keys (wildcards allowed), into keys.png.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _METRICS.value or not _OUT.value:
    raise app.UsageError("--metrics and --out are required")
  if not Path(_METRICS.value).is_file():
    raise app.UsageError(f"{_METRICS.value} does not exist")
  records = read_metrics(_METRICS.value)
  if not records:
    raise app.UsageError(f"{_METRICS.value} holds no records")
  paths = plot(records, _OUT.value, _KEYS.value)
  print(json.dumps({"steps": len(records), "pngs": [str(p) for p in paths]}))


if __name__ == "__main__":
  app.run(main)
