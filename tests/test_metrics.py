"""MetricsWriter (JSONL + TensorBoard), read-back, reflective words, progress line."""

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.core import metrics


def _masked_crc(data: bytes) -> int:
  # tensorboardX imports torch: here, not at collection, where every xdist worker pays it
  from tensorboardX.crc32c import crc32c  # pylint: disable=import-outside-toplevel
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tb_scalars(folder) -> dict[str, list[tuple[int, float]]]:
  """Parses every event file's TFRecord framing (checking both CRCs) into tag -> [(step, v)];
  each file opens with TensorBoard's version event, and every event has a wall time."""
  from tensorboardX.proto.event_pb2 import Event  # pylint: disable=import-outside-toplevel
  out: dict[str, list] = {}
  files = sorted(folder.glob("events.out.tfevents.*"))
  assert files, f"no event files in {folder}"
  for path in files:
    data, i = path.read_bytes(), 0
    assert Event.FromString(data[12:12 + struct.unpack("<Q", data[:8])[0]]).file_version == (
        "brain.Event:2")
    while i < len(data):
      header = data[i:i + 8]
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[i + 8:i + 12])[0] == _masked_crc(header)
      body = data[i + 12:i + 12 + length]
      assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == _masked_crc(body)
      i += 16 + length
      event = Event.FromString(body)
      assert event.wall_time > 1e9
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_jsonl_and_tensorboard_round_trip(tmp_path):
  with metrics.MetricsWriter(tmp_path, process_index=0) as w:
    w.write(1, {"reward/total": 0.5, "kl": np.float32(1e-3), "accuracy": jnp.asarray(0.25),
                "tokens": np.int64(7), "flag": True})
    w.write(2, {"reward/total": float("nan"), "kl": np.inf, "accuracy": jnp.asarray([0.5])})
  lines = tmp_path.joinpath("metrics.jsonl").read_text().splitlines()
  assert len(lines) == 2
  strict = [json.loads(l, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
            for l in lines]
  assert strict[0]["step"] == 1 and strict[0]["kl"] == pytest.approx(1e-3)
  assert strict[0]["tokens"] == 7.0 and strict[0]["flag"] == 1.0
  assert strict[1]["reward/total"] is None and strict[1]["kl"] is None
  assert strict[1]["accuracy"] == 0.5
  tb = _tb_scalars(tmp_path / metrics.TB_DIR)
  assert tb["accuracy"] == [(1, 0.25), (2, 0.5)]
  assert tb["reward/total"][0] == (1, 0.5) and math.isnan(tb["reward/total"][1][1])
  assert tb["kl"][1] == (2, math.inf)


def test_resume_appends_and_merges(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False, process_index=0) as w:
    w.write(1, {"a": 1.0})
    w.write(2, {"a": 2.0})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "a"')  # a crash mid-line
  with metrics.MetricsWriter(tmp_path, tensorboard=False, process_index=0) as w:
    w.write(2, {"a": 20.0})  # resumed from a checkpoint before step 2
    w.write(2, {"eval/x/pass@1": 0.1})
    w.write(3, {"a": float("nan")})
  raw = metrics.read_metrics(tmp_path / "metrics.jsonl", merge=False)
  assert [r["step"] for r in raw] == [1, 2, 2, 2, 3]
  merged = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in merged] == [1, 2, 3]
  assert merged[1]["a"] == 20.0 and merged[1]["eval/x/pass@1"] == 0.1
  assert math.isnan(merged[2]["a"])
  assert not (tmp_path / metrics.TB_DIR).exists()


def test_only_process_zero_writes(tmp_path):
  w = metrics.MetricsWriter(tmp_path / "run", process_index=1)
  w.write(1, {"a": 1.0})
  w.close()
  assert not (tmp_path / "run").exists()


def test_bad_values_rejected(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False, process_index=0) as w:
    with pytest.raises(TypeError, match="scalar"):
      w.write(1, {"a": np.zeros(3)})
    with pytest.raises(TypeError):
      w.write(1, {"a": "text"})


def test_reflection_counts():
  texts = ["Wait, wait. But that is WRONG; let me check (checking is not a word match).",
           "however: mistakes and errors are plurals; retry verify evaluate error butter",
           ""]
  c = metrics.reflection_counts(texts)
  assert c["reflect/wait"] == pytest.approx(2 / 3)
  assert c["reflect/but"] == pytest.approx(1 / 3)  # "butter" is not "but"
  assert c["reflect/check"] == pytest.approx(1 / 3)  # "checking" is not "check"
  assert c["reflect/mistake"] == 0.0 and c["reflect/error"] == pytest.approx(1 / 3)
  assert c["reflect/total"] == pytest.approx(10 / 3)
  assert set(c) == {f"reflect/{w}" for w in metrics.REFLECTIVE_WORDS} | {"reflect/total"}
  assert metrics.reflection_counts([])["reflect/total"] == 0.0


def test_response_stats_and_timer():
  s = metrics.response_stats(np.array([3, 5, 10]))
  assert s == {"response_length/mean": 6.0, "response_length/max": 10.0,
               "response_length/min": 3.0}
  assert math.isnan(metrics.response_stats([])["response_length/mean"])
  t = metrics.StepTimer()
  with t("rollout"):
    pass
  with t("rollout"):
    pass
  m = t.metrics()
  assert set(m) == {"time/rollout"} and m["time/rollout"] >= 0 and not t.metrics()


def test_progress_line():
  line = metrics.progress_line(12, {
      "reward/total": 0.53, "reward/accuracy": 0.5, "reward/format": 0.8,
      "reward/accuracy_failures": 0.0, "reward/seconds": 1.0, "accuracy": 0.5,
      "kl": 1.2e-3, "entropy": jnp.float32(1.35), "clip_frac_low": 0.01, "clip_frac_high": 0.02,
      "response_length/mean": 312.4, "response_length/max": 1024, "tokens_per_s": 12345.0,
      "time/rollout": 2.0, "time/reward": 0.3, "time/update": 0.8, "note": "ignored"})
  assert line == ("step 12 | reward 0.53 (accuracy 0.5, format 0.8) | acc 0.5 | kl 1.2e-03 | "
                  "ent 1.35 | clip 0.03 | len 312/1024 | 12k tok/s | "
                  "3.1s (rollout 2.0 reward 0.3 update 0.8)")
  assert metrics.progress_line(0, {}) == "step 0"
  assert "kl nan" in metrics.progress_line(1, {"kl": float("nan")})


def test_progress_line_stays_one_short_line():
  """Per-task reward means (all-scenario RL: every task's every component) stay in the
  metrics, not on the console line; the line carries the step of the total and the ETA."""
  m = {"reward/total": 0.75, "reward/device_s": 0.37, "reward/masked_samples": 0.0,
       "reward/accuracy": 0.958, "reward/helpful": -0.551}
  for task in ("general", "math", "unsafe"):
    m.update({f"reward/{task}/total": 1.0, f"reward/{task}/samples": 24.0,
              f"reward/{task}/accuracy": 0.9, f"reward/{task}/helpful": 0.1})
  line = metrics.progress_line(3, m, total=300, eta_s=1234.0)
  assert line == "step 3/300 | reward 0.75 (accuracy 0.958, helpful -0.551) | ETA 21 min"
  assert metrics.progress_line(3, {}, 300, 42.0) == "step 3/300 | ETA 42s"
  assert metrics.progress_line(3, {}, 300, 3.6e4).endswith("ETA 10.0 h")


def _png_ok(path) -> bool:
  data = path.read_bytes()
  return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


@pytest.mark.slow
def test_a_run_does_not_import_torch():
  """Writing TensorBoard files must not pull in torch (seconds and ~0.5 GB at every start)."""
  code = ("import sys; import r1jax.main, r1jax.stages.rl, r1jax.stages.sft, "
          "r1jax.stages.generate, r1jax.stages.reward_model; "
          "print(sorted(m for m in ('torch', 'tensorboardX', 'transformers') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_plot_metrics_tool(tmp_path):
  rng = np.random.default_rng(0)
  with metrics.MetricsWriter(tmp_path, tensorboard=False, process_index=0) as w:
    for step in range(1, 21):
      texts = ["wait " * step + "but check", "however"]
      w.write(step, {"reward/total": step / 20, "reward/accuracy": step / 25,
                     "reward/accuracy_failures": 0.0, "accuracy": step / 25,
                     "kl": rng.random() * 1e-3, "entropy": 1.0, "clip_frac_low": 0.01,
                     "clip_frac_high": np.nan if step == 3 else 0.02,
                     **metrics.response_stats([step * 10, step * 20]),
                     **metrics.reflection_counts(texts), "time/rollout": 1.0})
      if step % 10 == 0:
        w.write(step, {"eval/math500/pass@1": step / 100, "eval/math500/cons@4": step / 90})
  # The default groups through the function the tool calls (a subprocess costs ~5 s of
  # imports); the tool's command line below, with --keys and with a missing file.
  from r1jax.core.plots import plot  # pylint: disable=import-outside-toplevel
  paths = plot(metrics.read_metrics(tmp_path / "metrics.jsonl"), tmp_path / "png", None)
  names = {Path(p).name for p in paths}
  assert names == {"reward.png", "accuracy.png", "response_length.png",
                   "reflective_words.png", "kl_clip_entropy.png", "time.png"}
  assert all(_png_ok(tmp_path / "png" / n) for n in names)
  out = subprocess.run([sys.executable, "tools/plot_metrics.py",
                        f"--metrics={tmp_path / 'metrics.jsonl'}", f"--out={tmp_path / 'k'}",
                        "--keys=kl,eval/*/pass@1"], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert [p.name for p in (tmp_path / "k").iterdir()] == ["keys.png"]
  assert _png_ok(tmp_path / "k" / "keys.png")
  bad = subprocess.run([sys.executable, "tools/plot_metrics.py", "--metrics=missing.jsonl",
                        f"--out={tmp_path / 'x'}"], capture_output=True, text=True)
  assert bad.returncode != 0 and "missing.jsonl does not exist" in bad.stderr


def test_worst_drop_of_a_held_out_curve(tmp_path):
  """A curve logged across a resume (steps 150 and 200 twice: the newer values count) and a
  NaN eval: the worst fall below an earlier peak, where it was, the best and the final."""
  path = tmp_path / "metrics.jsonl"
  with metrics.MetricsWriter(tmp_path, tensorboard=False, process_index=0) as w:
    for step, v in ((0, 0.2), (50, 0.6), (100, 0.9), (150, 0.3), (200, float("nan"))):
      w.write(step, {"eval/held_out/pass@1": v, "loss": 1.0})
    for step, v in ((150, 0.8), (200, 0.5), (250, 0.85)):  # resumed from step 100
      w.write(step, {"eval/held_out/pass@1": v, "eval/held_out/cons@k": 0.1})
  drops = metrics.worst_drops(metrics.read_metrics(path))
  assert drops == {"eval/held_out/pass@1": {
      "drop": pytest.approx(0.4), "peak_step": 100, "trough_step": 200, "best": 0.9,
      "best_step": 100, "final": 0.85}}
  assert metrics.worst_drops([{"step": 0, "eval/x/pass@1": 0.5}])["eval/x/pass@1"]["drop"] == 0
  assert metrics.worst_drops([{"step": 0, "loss": 1.0}]) == {}
