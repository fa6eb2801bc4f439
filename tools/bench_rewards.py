"""Benchmark: are host rewards hidden behind device work? Prints one JSON line.

A step is: submit the batch's rewards, run a simulated device step of X s (a background thread
sleeping, as an accelerator would be busy while the host thread waits), collect the rewards.
Rewards cost Y s per batch (measured alone first). Overlapped, a step should take about
max(X, Y) + small; run serially it takes X + Y. hidden_fraction = (X + Y - T) / min(X, Y) is the
share of the smaller cost that overlap hid (goal >= 0.9). The batch is MATH-500 completions in
the R1-Zero format, half right, scored by accuracy (math-verify, pool) + format + language.

  python tools/bench_rewards.py --batch 256 --workers 2 [--device_s X]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from r1jax.rewards import compose  # pylint: disable=g-import-not-at-top,wrong-import-position

SPEC = {"components": [
    {"name": "accuracy", "fields": {"gold": "answer"}},
    {"name": "format", "weight": 0.5},
    {"name": "language", "weight": 0.1, "kwargs": {"lang": "en"}},
]}


def make_batch(data_dir: Path, batch: int) -> list[dict]:
  """R1-Zero-style completions for MATH-500 problems; odd ones carry a neighbour's answer."""
  with open(data_dir / "math500" / "test.jsonl") as f:
    rows = [json.loads(line) for line in f]
  out = []
  for i in range(batch):
    row, other = rows[i % len(rows)], rows[(i + 1) % len(rows)]
    answer = row["answer"] if i % 2 == 0 else other["answer"]
    reasoning = row["solution"].replace("\\boxed", "")  # Realistic length, no early answer.
    out.append({"completion": f"<think>{reasoning}</think> <answer>\\boxed{{{answer}}}</answer>",
                "answer": row["answer"]})
  return out


def device_step(seconds: float) -> threading.Thread:
  """Starts a simulated device step: the accelerator is busy, the host thread is free."""
  t = threading.Thread(target=time.sleep, args=(seconds,))
  t.start()
  return t


def timed_step(scorer, batch: list[dict], device_s: float, overlap: bool):
  start = time.monotonic()
  if overlap:
    pending = scorer.submit(batch)  # As soon as the rollout's tokens reach the host.
    device = device_step(device_s)
    result = pending.result()  # Just before the advantages are needed.
    device.join()
  else:
    result = scorer.score(batch)
    device_step(device_s).join()
  return time.monotonic() - start, result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256, help="completions per step")
  parser.add_argument("--workers", type=int, default=2, help="reward pool processes")
  parser.add_argument("--steps", type=int, default=5, help="measured steps per mode")
  parser.add_argument("--device_s", type=float, default=None,
                      help="simulated device step; default: one batch's measured reward time")
  parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
  args = parser.parse_args()
  batch = make_batch(args.data, args.batch)
  load_before = os.getloadavg()[0]  # Other work on the machine skews Y; report it.
  with compose.RewardScorer(dict(SPEC, num_workers=args.workers)) as scorer:
    scorer.score(batch)  # Warm the workers up (imports, parser caches).
    x = timed_step(scorer, batch, 0.0, False)[0] if args.device_s is None else args.device_s
    # Interleave the three measurements step by step, so that load from other work on the
    # machine, which drifts over seconds, hits all of them alike; report medians.
    alone, serial, overlapped, cpu, failures = [], [], [], [], 0
    for _ in range(args.steps):
      seconds, result = timed_step(scorer, batch, 0.0, overlap=False)
      alone.append(seconds)
      cpu.append(result.pool_cpu_s)
      failures += int(sum(f.sum() for f in result.failed.values()))
      serial.append(timed_step(scorer, batch, x, False)[0])
      overlapped.append(timed_step(scorer, batch, x, True)[0])
    y, serial, overlapped, cpu = map(statistics.median, (alone, serial, overlapped, cpu))
    accuracy = float(result.components["accuracy"].mean())
  print(json.dumps({
      "bench": "rewards", "batch": args.batch, "workers": args.workers, "steps": args.steps,
      "device_s": round(x, 4), "reward_s": round(y, 4),
      "step_serial_s": round(serial, 4), "step_overlapped_s": round(overlapped, 4),
      "ideal_s": round(max(x, y), 4), "overhead_s": round(overlapped - max(x, y), 4),
      "hidden_fraction": round((x + y - overlapped) / min(x, y), 4) if min(x, y) > 0 else None,
      "samples_per_s": round(args.batch / y, 1),
      # Load-independent: what the workers could do with their cores to themselves.
      "worker_cpu_ms_per_sample": round(1e3 * cpu / args.batch, 3),
      "samples_per_s_if_idle": round(args.workers * args.batch / cpu, 1),
      "mean_accuracy": round(accuracy, 4),
      "failures": failures, "cpus": os.cpu_count(), "load_1m": round(load_before, 2),
      "machine": platform.machine(),
      "python": platform.python_version()}))


if __name__ == "__main__":
  main()
