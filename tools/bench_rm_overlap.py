"""Benchmark: does a reward model's forward hide behind the host rule rewards? One JSON line.

All-scenario RL scores each rollout with rule rewards on the host (math-verify in pool
workers, format and language inline) and with reward models on the device. The scorer
launches the RM forward when the batch is submitted and collects it after the host rewards
ran (rewards/compose.py), so a step should take about max(X, Y) + a little:
  X: the RM forward alone (a real r1jax reward model, jitted, `RewardModel.launch`);
  Y: the host rule rewards alone (tools/bench_rewards.py's batch: MATH-500 completions in the
     R1-Zero format, half right), or, with --host=sleep, a host that waits Y s (a remote
     verifier or sandbox service) without using a core;
  T: both in one scorer. hidden_fraction = (X + Y − T) / min(X, Y) (goal ≥ 0.8).
On a CPU-only machine the RM's XLA threads and the reward workers share the same cores, so
real host rewards can only hide as much as the cores left over allow: that case is reported
as measured, beside the sleep case, which shows the scheduling itself. floor_s =
max(X, Y, (RM + host CPU core-seconds) / cores) is the best any overlap could reach, and
hideable_fraction what that floor would hide.

  python tools/bench_rm_overlap.py --host=real --hidden=256 --layers=4
  python tools/bench_rm_overlap.py --host=sleep --host_s=0.5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from bench_rewards import SPEC, make_batch  # pylint: disable=wrong-import-position
from r1jax.core.config import ModelConfig  # pylint: disable=wrong-import-position
from r1jax.core.tokenizer import Tokenizer  # pylint: disable=wrong-import-position
from r1jax.rewards import compose, registry  # pylint: disable=wrong-import-position
from r1jax.rewards import reward_model as rm  # pylint: disable=wrong-import-position


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 3..258: any text, no files."""

  bos_id, eos_id, pad_id = None, 1, 0

  @property
  def vocab_size(self) -> int:
    return 259

  def encode(self, text, add_bos=False):
    return [3 + b for b in text.encode()]

  def decode(self, ids):
    return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")

  def token_id(self, piece):
    return None


def sleeping_reward(seconds_per_sample: float):
  def fn(text: str) -> float:
    time.sleep(seconds_per_sample)
    return 0.0
  return fn


def measure(scorer, batch) -> tuple[float, float]:
  """(wall s, CPU core-seconds: this process's threads, XLA's included, + the pool's)."""
  t0, c0 = time.monotonic(), time.process_time()
  out = scorer.score(batch)
  return time.monotonic() - t0, time.process_time() - c0 + out.pool_cpu_s


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128, help="responses per step")
  parser.add_argument("--workers", type=int, default=2, help="reward pool processes")
  parser.add_argument("--host", choices=("real", "sleep"), default="real")
  parser.add_argument("--host_s", type=float, default=0.5, help="--host=sleep: Y per batch")
  parser.add_argument("--hidden", type=int, default=256, help="reward model width")
  parser.add_argument("--layers", type=int, default=4, help="reward model depth")
  parser.add_argument("--max_len", type=int, default=256, help="tokens per scored response")
  parser.add_argument("--steps", type=int, default=5, help="measured steps per mode")
  parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
  args = parser.parse_args()
  batch = make_batch(args.data, args.batch)
  for row in batch:
    row["question"] = "Solve the problem."
  cfg = ModelConfig(vocab_size=259, hidden=args.hidden, layers=args.layers, heads=4,
                    kv_heads=2, head_dim=args.hidden // 4, mlp_dim=3 * args.hidden,
                    max_position=args.max_len, tie_embeddings=True)
  params = rm.init_rm(cfg, jax.random.key(0))
  params["head"]["w"] = jax.random.normal(jax.random.key(1), (cfg.hidden,))
  model = rm.RewardModel(params, cfg, ByteTokenizer(), template="plain", max_len=args.max_len,
                         batch_size=args.batch)
  registry.register("bench_rm", model, inputs=("prompt",), kind="device", overwrite=True)
  registry.register("bench_host_wait", sleeping_reward(args.host_s / args.batch), kind="inline",
                    overwrite=True)
  rm_c = {"name": "bench_rm", "fields": {"prompt": "question"}}
  host = (SPEC["components"] if args.host == "real" else [{"name": "bench_host_wait"}])
  specs = {"rm": [rm_c], "host": host, "both": [*host, rm_c]}
  scorers = {k: compose.RewardScorer({"components": v, "num_workers": args.workers,
                                      "default_task": "math"}) for k, v in specs.items()}
  try:
    for s in scorers.values():
      measure(s, batch)  # compile the RM, warm the workers
    times = {k: [] for k in scorers}
    cpu = {k: [] for k in scorers}
    for _ in range(args.steps):  # interleaved, so drifting load hits all modes alike
      for k, s in scorers.items():
        wall, core_s = measure(s, batch)
        times[k].append(wall)
        cpu[k].append(core_s)
  finally:
    for s in scorers.values():
      s.close()
  x, y, t = (statistics.median(times[k]) for k in ("rm", "host", "both"))
  # The best any overlap can do: the longer of the two, or all their CPU work spread over
  # every core, whichever is more.
  floor = max(x, y, (statistics.median(cpu["rm"]) + statistics.median(cpu["host"]))
              / (os.cpu_count() or 1))
  print(json.dumps({
      "bench": "rm_overlap", "host": args.host, "batch": args.batch, "workers": args.workers,
      "rm_params": cfg.num_params, "max_len": args.max_len, "steps": args.steps,
      "rm_s": round(x, 4), "host_s": round(y, 4), "step_s": round(t, 4),
      "serial_s": round(x + y, 4), "ideal_s": round(max(x, y), 4),
      "overhead_s": round(t - max(x, y), 4),
      "hidden_fraction": round((x + y - t) / min(x, y), 4) if min(x, y) > 0 else None,
      "rm_core_s": round(statistics.median(cpu["rm"]), 4),
      "host_core_s": round(statistics.median(cpu["host"]), 4),
      "floor_s": round(floor, 4),
      "hideable_fraction": round((x + y - floor) / min(x, y), 4) if min(x, y) > 0 else None,
      "cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2),
      "machine": platform.machine(), "python": platform.python_version()}))


if __name__ == "__main__":
  main()
