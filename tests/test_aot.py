"""Ahead-of-time compilation for a real TPU slice (v5e:2x2, described by libtpu on this host):
a small model's GRPO update, reference log-probs and decode programs compile, with the splash
kernel's Mosaic calls where attention runs over uncached rows; the command line reports a
program that does not fit, naming the arrays that dominate it."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1jax.core import chips
from r1jax.core.config import model_group
from r1jax.stages import aot
from r1jax.stages.generate import generate_config
from r1jax.stages.reward_model import reward_model_config
from r1jax.stages.rl import rl_config
from r1jax.stages.sft import sft_config

REPO = Path(__file__).resolve().parents[1]
# CI installs the `tpu` extra, so there a missing libtpu fails these tests instead of skipping.
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None and not os.environ.get("CI"),
    reason="libtpu not installed (pip install -e '.[tpu]')")
SMALL = dict(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=64, mlp_dim=256,
             vocab_size=512, max_position=1024, param_dtype="float32",
             compute_dtype="bfloat16")


def _small(c):
  """A stage config on the small model, FSDP over the slice."""
  c.model = model_group(**SMALL)
  c.mesh.shape = (1, -1, 1)
  return c


@pytest.fixture(scope="module")
def rl_reports():
  c = _small(rl_config(steps=1))
  c.data.batch, c.data.max_prompt_tokens = 4, 128
  c.sampler.max_new_tokens = 256
  c.grpo.update(group_size=4, minibatches=2, beta=0.01)
  c.sampler.mesh = (2, 1, 2)  # decode: rows over 2, tensor-parallel pairs
  return {r["program"]: r for r in aot.compile_stage(c, "v5e:2x2")}


@needs_libtpu
def test_rl_programs_compile_for_v5e_with_the_splash_kernel(rl_reports):
  assert set(rl_reports) == {"grpo_update", "ref_logprobs", "decode_layout", "prefill",
                             "decode_segment"}
  for name, r in rl_reports.items():
    assert "error" not in r, (name, r)
    assert r["chips"] == 4 and r["chip"] == "TPU v5e" and r["mesh"]["fsdp"] == 4
    assert r["fits"] and 0 < r["total_gib"] < r["hbm_gib"], (name, r)
    assert r["roofline_s"] >= 0 and r["compile_s"] > 0
  # The update's forward and backward attend by splash (Mosaic calls), as do the reference's
  # log-probs and the prefill; each decode step by the decode kernel (384 slots: 3 blocks).
  assert rl_reports["grpo_update"]["mosaic_calls"] >= 2
  assert rl_reports["ref_logprobs"]["mosaic_calls"] >= 1
  assert rl_reports["prefill"]["mosaic_calls"] >= 1
  assert rl_reports["decode_segment"]["mosaic_calls"] >= 1
  layout = rl_reports["decode_layout"]
  assert layout["decode_mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
  # Both layouts a chip: the trainer's quarter of the f32 weights (4 bytes × P/4), the decode
  # half in bf16 (2 × P/2); the reshard brings that half less the eighth a chip held: 3/8 of
  # the weights in bf16, 0.75 P bytes.
  assert layout["train_layout_gib"] == pytest.approx(layout["decode_layout_gib"], rel=0.15)
  assert layout["reshard_moved_gib"] == pytest.approx(0.75 * layout["train_layout_gib"],
                                                      rel=0.1)
  assert rl_reports["decode_segment"]["decode_mesh"] == layout["decode_mesh"]
  assert "decode_mesh" not in rl_reports["grpo_update"]
  # While it samples, the stage keeps the train state and the reference on the chips.
  assert rl_reports["decode_segment"]["resident_gib"] > rl_reports["grpo_update"]["resident_gib"]
  assert rl_reports["grpo_update"]["tflops"] > rl_reports["ref_logprobs"]["tflops"] > 0


@needs_libtpu
def test_sft_update_compiles_with_the_kernel():
  c = _small(sft_config(steps=1))
  c.data.batch, c.data.seq_len = 4, 256
  (report,) = aot.compile_stage(c, "v5e:2x2")
  assert report["program"] == "sft_update" and report["fits"], report
  assert report["mosaic_calls"] >= 2


@needs_libtpu
def test_reward_model_and_generate_programs_compile():
  """The reward_model stage's update (splash in its forward and backward) and the generate
  stage's decode programs (the prefill by splash, each decode step by the decode kernel)."""
  c = _small(reward_model_config(steps=1))
  c.data.batch, c.data.max_len = 4, 256
  (report,) = aot.compile_stage(c, "v5e:2x2")
  assert report["program"] == "rm_update" and report["fits"], report
  assert report["mosaic_calls"] >= 2 and report["tflops"] > 0
  g = _small(generate_config())
  g.data.max_prompt_tokens, g.sampler.max_new_tokens = 128, 256
  g.k, g.batch_prompts = 2, 4
  reports = {r["program"]: r for r in aot.compile_stage(g, "v5e:2x2")}
  assert set(reports) == {"decode_layout", "prefill", "decode_segment"}
  assert all(r["fits"] for r in reports.values()), reports
  assert reports["decode_layout"]["reshard_moved_gib"] == 0  # one mesh: nothing moves
  assert reports["prefill"]["mosaic_calls"] >= 1 and reports["decode_segment"]["mosaic_calls"] >= 1


def test_chips_and_bad_requests():
  assert chips.chip_of("v5p:2x2x4").hbm_bytes == 95 * chips.GIB
  with pytest.raises(ValueError, match="generation"):
    chips.chip_of("v9x:2x2")
  seconds, by = chips.roofline_s(2 * 197e12, 1.0, chips.CHIPS["v5e"])
  assert by == "compute" and seconds == pytest.approx(2.0)
  real_find_spec = importlib.util.find_spec
  with pytest.MonkeyPatch.context() as m:  # no libtpu: the tool says how to get it
    m.setattr(importlib.util, "find_spec",
              lambda name, *a: None if name == "libtpu" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match=r"pip install -e \"\.\[tpu\]\""):
      chips.topology_devices("v5e:2x2")
  c = sft_config(steps=1)
  c.stage = "eval"
  with pytest.raises(ValueError, match="stage 'eval'"):
    next(aot.compile_stage(c, "v5e:2x2"))


@needs_libtpu
def test_tool_reports_a_program_that_does_not_fit(tmp_path):
  """The command line on a model whose decode cache (1,024 rows × 16,896 slots × 1 layer ×
  16 kv heads × 128) is 33 GiB a chip, over v5e's 16: a JSON line per program asked for, the
  programs that do not fit named with the arrays that dominate them (the cache), exit 1."""
  out = tmp_path / "aot.jsonl"
  shape = dict(hidden=256, layers=1, heads=16, kv_heads=16, head_dim=128, mlp_dim=512,
               vocab_size=1024, max_position=17408)
  cmd = [sys.executable, "tools/aot_compile.py",
         "--config=experiments/r1_zero_qwen2p5_1p5b_gsm8k.py", "--topology=v5e:2x2",
         f"--out={out}", "--config.data.batch=64", "--config.sampler.max_new_tokens=16384",
         "--programs=prefill,decode_segment",
         *[f"--config.model.{k}={v}" for k, v in shape.items()]]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 1 and out.exists(), done.stderr[-3000:]
  reports = {r["program"]: r for r in map(json.loads, out.read_text().splitlines())}
  assert set(reports) == {"prefill", "decode_segment"}  # --programs: the others not compiled
  for name in ("prefill", "decode_segment"):  # the cache is the first's output, the second's input
    assert not reports[name].get("fits", False), reports[name]
    top = reports[name]["dominant_gib"][0]
    assert ".cache." in top[0] and top[1] > 1.0, reports[name]["dominant_gib"]


def test_table_renders_reports_and_names_a_misfit(tmp_path):
  """tools/aot_table.py: one row per program, the decode layout's line, a misfit's arrays."""
  sys.path.insert(0, str(REPO / "tools"))
  import aot_table  # pylint: disable=import-outside-toplevel
  head = {"stage": "rl", "topology": "v5e:2x2", "chips": 4, "chip": "TPU v5e",
          "mesh": {"data": 1, "fsdp": 4, "tensor": 1}, "params_b": 0.5, "hbm_gib": 16.0}
  mem = dict(argument_gib=1.0, output_gib=0.5, temp_gib=2.0, resident_gib=0.0, compile_s=3.0,
             tflops=12.0, roofline_s=0.25, bound_by="compute", mosaic_calls=2)
  rows = [{**head, **mem, "program": "decode_layout", "total_gib": 1.5, "hbm_share": 0.094,
           "fits": True, "decode_mesh": {"data": 2, "fsdp": 1, "tensor": 2},
           "train_layout_gib": 0.25, "decode_layout_gib": 0.5, "reshard_moved_gib": 0.375},
          {**head, **mem, "program": "prefill", "total_gib": 15.5, "hbm_share": 0.97,
           "fits": False, "largest_part": "outputs",
           "dominant_gib": [["['out'].cache.k[0]", 7.5], ["['out'].cache.v[0]", 7.5]]}]
  path = tmp_path / "small_v5e-4.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  text = aot_table.table(path)
  assert "### `small_v5e-4`: 0.50B params on v5e:2x2 (4 × TPU v5e, 16 GiB each)" in text
  cells = "| 1.00 | 0.50 | 2.00 | 0.00 |"
  assert f"| decode_layout (decode mesh (2, 1, 2)) {cells} **1.50** | 9 % | ✓" in text
  assert f"| prefill {cells} **15.50** | 97 % | ✗ | 3 s | 12 | 0.25 s" in text
  assert "the reshard brings 0.38 GiB to a chip" in text
  assert "prefill does not fit (largest part: outputs)" in text and "cache.k[0]` 7.5" in text
