"""Compile a stage's programs for a TPU slice ahead of time, on this host, and print one JSON
line per program: per-chip memory against HBM, compile seconds, FLOPs, the roofline bound.

  JAX_PLATFORMS=cpu python tools/aot_compile.py \\
      --config=experiments/r1_zero_qwen2p5_7b_math.py --topology=v5p:2x2x2 [--num_slices=N] \\
      [--config.sampler.max_new_tokens=8192 ...] [--programs=prefill,decode_segment] \\
      [--out=benchmarks/aot/NAME.jsonl]

Needs libtpu (pip install -e ".[tpu]"); JAX_PLATFORMS=cpu keeps JAX from looking for a TPU.
Exits 1 when a program does not compile or needs more than 90 % of a chip's HBM.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # pylint: disable=g-import-not-at-top

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from r1jax.stages import aot  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file: experiments/NAME.py[:arg].", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:4x4, v5p:2x2x4, v6e:4x4.")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON lines here.")
_ONLY = flags.DEFINE_list("programs", [], "Compile only these programs (default: all), e.g. "
                          "prefill,decode_segment.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  del argv
  bad, lines = False, []
  try:
    for report in aot.compile_stage(_CONFIG.value, _TOPOLOGY.value, _SLICES.value,
                                    _ONLY.value):
      line = json.dumps(report, default=float)
      print(line, flush=True)
      lines.append(line)
      bad |= "error" in report or not report.get("fits", False)
  except (RuntimeError, ValueError) as e:
    print(f"aot_compile: {e}", file=sys.stderr)
    return 2
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  return 1 if bad else 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
