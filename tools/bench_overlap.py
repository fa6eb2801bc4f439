"""Benchmark: seconds per RL iteration with grpo.overlap off / "rewards" / "rollout". One JSON line.

Runs the `rl` stage of a finished tiny_zero pipeline (as tools/rerun_stage.py does) for
--steps iterations per mode, in one process, without held-out evals or checkpoints between,
and reports each mode's median seconds per iteration (the `time` stamps of consecutive
metric lines: everything an iteration costs) and its speed-up over no overlap.

--verifier_s adds that many seconds of waiting to every reward batch, without using a core:
a remote verifier or a sandbox service. tiny_zero's own rewards take ~16 ms a batch, so
without it there is next to nothing on the host to hide, and on a 2-core CPU the overlapped
work contends with the update for the same cores; with it, the run shows what the
scheduling hides where the host would otherwise wait (stages/rl_ahead.py).

  python tools/bench_overlap.py --from_workdir=/tmp/tz --steps=40
  python tools/bench_overlap.py --from_workdir=/tmp/tz --steps=40 --verifier_s=0.5

Any RL stage of any finished pipeline (--config, --stage), at a chosen device count and
compute dtype; --modes="" times no overlap only (benchmarks/tiny_r1: the update's layout):

  python tools/bench_overlap.py --config=experiments/tiny_r1.py:seed=1 --stage=zero \
      --from_workdir=/tmp/r1 --steps=30 --modes="" --cpu_devices=1 --compute_dtype=bfloat16
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from bench_common import cpu_devices_flag, use_cpu_devices

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parents[1] / "experiments" / "tiny_zero.py"),
    "The pipeline experiment whose RL stage (--stage) runs.")
_STAGE = flags.DEFINE_string("stage", "rl", "The pipeline's RL stage to run.")
_DTYPE = flags.DEFINE_string("compute_dtype", "", "The model's compute dtype (\"\": the stage's).")
_FROM = flags.DEFINE_string("from_workdir", None, "The finished pipeline's working directory.")
_STEPS = flags.DEFINE_integer("steps", 40, "RL iterations per mode.")
_MODES = flags.DEFINE_list("modes", ["", "rewards", "rollout"], "grpo.overlap values.")
_VERIFIER = flags.DEFINE_float("verifier_s", 0.0, "Seconds each reward batch also waits.")
_CPU_DEVICES = cpu_devices_flag()
flags.mark_flags_as_required(["from_workdir"])


def slow_verifier(seconds: float) -> None:
  """Every reward batch waits `seconds` more after its results are in (no core used)."""
  from r1jax.rewards import compose
  score = compose.RewardScorer.score

  def waiting(self, samples):
    out = score(self, samples)
    time.sleep(seconds)
    return out

  compose.RewardScorer.score = waiting


def run_mode(mode: str, workdir: Path) -> dict:
  from r1jax import stages
  from r1jax.core.metrics import read_metrics
  from r1jax.stages import pipeline

  c = pipeline.resolve(_CONFIG.value[_STAGE.value], Path(_FROM.value).absolute())
  c.unlock()
  if _DTYPE.value:
    c.model.compute_dtype = _DTYPE.value
  c.steps = _STEPS.value
  c.grpo.overlap = mode
  c.eval.benchmarks = ""  # timing only: no held-out evals
  c.ckpt.update(every=0, every_minutes=0.0)
  c.log_every = 0
  c.lock()
  stages.run(c, str(workdir))
  rows = [r for r in read_metrics(workdir / "metrics.jsonl") if "time/update" in r]
  # Iteration 1 compiles; from 3 on, an overlapped iteration overlaps the one before.
  steps = [b["time"] - a["time"] for a, b in zip(rows[2:], rows[3:])]
  med = lambda key: round(statistics.median(r.get(key, 0.0) for r in rows[2:]), 3)
  return {"step_s": round(statistics.median(steps), 3), "rollout_s": med("time/rollout"),
          "reward_s": med("time/reward"), "update_s": med("time/update"),
          "ahead_rollout_s": med("ahead/rollout_s"), "ahead_reward_s": med("ahead/reward_s")}


def main(argv):
  del argv
  use_cpu_devices(_CPU_DEVICES.value)
  import jax
  if _VERIFIER.value:
    slow_verifier(_VERIFIER.value)
  result, modes = {}, _MODES.value or [""]
  with tempfile.TemporaryDirectory() as tmp:
    for mode in modes:
      out = run_mode(mode, Path(tmp) / (mode or "off"))
      result.update({f"{mode or 'off'}_{k}": v for k, v in out.items()})
  base = result.get("off_step_s")
  for mode in modes:
    if mode and base:
      result[f"{mode}_speedup"] = round(base / result[f"{mode}_step_s"], 3)
  result.update(stage=_STAGE.value, compute_dtype=_DTYPE.value or "stage's",
                steps=_STEPS.value, verifier_s=_VERIFIER.value, devices=jax.device_count(),
                machine=f"{platform.machine()} {jax.local_devices()[0].platform} "
                        f"{__import__('os').cpu_count()} cores")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
