"""Markdown tables from `aot_compile.py --out` JSON lines (benchmarks/aot/README.md's).

  python tools/aot_table.py benchmarks/aot/qwen2p5_7b_math_4k_v5p-8.jsonl [more.jsonl ...]

One table per file, one row per program: per-chip memory (GiB) against HBM, compile seconds,
TFLOP, the roofline bound and the Mosaic kernel calls; under it, the decode layout's two
layouts a chip and what its reshard moves, and the arrays that dominate a misfit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_HEAD = ("| program | args | outputs | temp | resident | total / chip | of HBM | fits | compile "
         "| TFLOP | roofline | bound | Mosaic calls |\n"
         "|---|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---|---:|")


def _row(r: dict) -> str:
  if "error" in r:  # the message, less its exception type, and the largest array
    top = r.get("dominant_gib") or []
    big = f"; largest array {top[0][0]} ({top[0][1]:.2f} GiB/chip)" if top else ""
    message = r["error"].split(": ", 1)[-1][:240].replace("|", "/")
    return (f"| {r['program']} |" + " — |" * 6 + " ✗ |" + " — |" * 5 + "\n"
            f"| | *does not compile: {message}{big}* ||||||||||||")
  mesh = r.get("decode_mesh")
  name = r["program"] + (f" (decode mesh {tuple(mesh.values())})" if mesh else "")
  gib = lambda k: f"{r[k]:.2f}"
  return (f"| {name} | {gib('argument_gib')} | {gib('output_gib')} | {gib('temp_gib')} "
          f"| {gib('resident_gib')} | **{r['total_gib']:.2f}** | {100 * r['hbm_share']:.0f} % "
          f"| {'✓' if r['fits'] else '✗'} | {r['compile_s']:.0f} s | {r['tflops']:.0f} "
          f"| {r['roofline_s']:.2f} s | {r['bound_by']} | {r['mosaic_calls']} |")


def table(path: Path) -> str:
  """The markdown section of one JSON-lines file."""
  reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  first = reports[0]
  mesh = tuple(first["mesh"].values())
  out = [f"### `{path.stem}`: {first['params_b']:.2f}B params on {first['topology']} "
         f"({first['chips']} × {first['chip']}, {first.get('hbm_gib', 0):.0f} GiB each), "
         f"stage {first['stage']}, mesh {mesh}", "", _HEAD, *map(_row, reports), ""]
  for r in reports:
    if "reshard_moved_gib" in r and "decode_layout_gib" in r:
      out.append(f"Decode layout: {r['train_layout_gib']:.2f} GiB a chip in the trainer's "
                 f"layout, {r['decode_layout_gib']:.2f} GiB in the sampler's; the reshard "
                 f"brings {r['reshard_moved_gib']:.2f} GiB to a chip.")
    if not r.get("fits", True) and r.get("dominant_gib"):
      top = ", ".join(f"`{p}` {g:.1f}" for p, g in r["dominant_gib"][:3])
      out.append(f"{r['program']} does not fit (largest part: {r.get('largest_part')}); "
                 f"dominant arrays, GiB a chip: {top}.")
  return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    sys.exit(__doc__)
  print("\n".join(table(Path(p)) for p in argv[1:]))


if __name__ == "__main__":
  main(sys.argv)
