"""An SFT step of tiny_r1's policy on packed rows, with each way of cutting its attention.

  python tools/bench_sft_blocks.py                     # tiny_r1's base: 16 rows x 256 tokens
  python tools/bench_sft_blocks.py --variants=256/none,64/full --rounds=20

Each variant is `model.attention_block` / `model.remat` (256/none: one piece, the scores
of every layer kept for the backward; 64/full: query blocks of 64 over the keys their
documents can see, the forward recomputed in the backward). The rows are packed from
documents of `--doc_min`..`--doc_max` tokens (tiny_r1's corpus averages ~125 a document),
random tokens, on the trainer's mesh over `--cpu_devices`. All variants are compiled first,
then timed in turns (`--rounds` each), so a machine that speeds up or slows down during the
run moves them all alike: the ratio to the first variant is the number to read. Prints one
JSON line.
"""

import json
import os
import platform
import statistics
import time

from absl import app, flags

from bench_common import cpu_devices_flag, use_cpu_devices

_VARIANTS = flags.DEFINE_list("variants", ["256/none", "128/none", "64/none", "64/full"],
                              "attention_block/remat per variant; the first is the baseline.")
_ROWS = flags.DEFINE_integer("rows", 16, "Packed rows per step (tiny_r1's SFT batch).")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per packed row.")
_DOC_MIN = flags.DEFINE_integer("doc_min", 40, "Shortest document.")
_DOC_MAX = flags.DEFINE_integer("doc_max", 210, "Longest document.")
_ROUNDS = flags.DEFINE_integer("rounds", 15, "Timed steps per variant, taken in turns.")
_CPU_DEVICES = cpu_devices_flag()


def _packed(rng, vocab: int):
  """(tokens, segment_ids, positions) of rows filled with documents; a row's last one is cut
  to the room left (none when under `--doc_min`: padding), as tiny_r1's rows are ~92 % full."""
  import numpy as np
  n, t = _ROWS.value, _SEQ.value
  seg = np.zeros((n, t), np.int32)
  pos = np.zeros((n, t), np.int32)
  for r in range(n):
    at, doc = 0, 1
    while True:
      length = min(int(rng.integers(_DOC_MIN.value, _DOC_MAX.value + 1)), t - at)
      if length < _DOC_MIN.value:
        break
      seg[r, at:at + length], pos[r, at:at + length] = doc, np.arange(length)
      at, doc = at + length, doc + 1
  return rng.integers(3, vocab, (n, t)).astype(np.int32), seg, pos


def main(argv):
  del argv
  use_cpu_devices(_CPU_DEVICES.value)
  import importlib.util
  import pathlib

  import jax
  import numpy as np
  from r1jax.core import model, sharding
  from r1jax.core.config import ModelConfig, OptConfig
  from r1jax.train.batches import SFTBatch
  from r1jax.train.trainer import SFTSettings, Trainer

  path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "tiny_r1.py"
  spec = importlib.util.spec_from_file_location("tiny_r1", path)
  tiny_r1 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny_r1)
  cfg = ModelConfig(**tiny_r1.POLICY)
  tokens, seg, pos = _packed(np.random.default_rng(0), cfg.vocab_size)
  batch = SFTBatch(tokens, seg > 0, seg > 0, pos, seg)
  mesh = sharding.make_mesh((-1, 1, 1))
  params = model.init_params(cfg, jax.random.key(0))
  steps, states, placed = {}, {}, {}
  for v in _VARIANTS.value:
    block, remat = v.split("/")
    tr = Trainer(cfg.replace(attention_block=int(block), remat=remat),
                 OptConfig(lr=1e-4, warmup_steps=0), mesh, sft=SFTSettings())
    placed[v] = tr.put_batch(batch)
    states[v], _ = tr.sft_step(tr.init_state(jax.tree.map(np.copy, params)), placed[v])
    jax.block_until_ready(states[v])  # compiled
    steps[v] = tr.sft_step
  times = {v: [] for v in steps}
  for _ in range(_ROUNDS.value):
    for v, step in steps.items():
      start = time.perf_counter()
      states[v], metrics = step(states[v], placed[v])
      jax.block_until_ready((states[v], metrics))
      times[v].append(time.perf_counter() - start)
  first = times[_VARIANTS.value[0]]
  out = {f"{v}_s": round(statistics.median(ts), 4) for v, ts in times.items()}
  out.update({f"{v}_ratio": round(statistics.median(a / b for a, b in zip(ts, first)), 3)
              for v, ts in times.items()})
  fill = float((seg > 0).mean())
  out.update(rows=_ROWS.value, seq_len=_SEQ.value, fill=round(fill, 3),
             docs_per_row=round(float(seg.max(1).mean()), 2), rounds=_ROUNDS.value,
             devices=jax.device_count(),
             machine=f"{platform.machine()} {jax.local_devices()[0].platform} "
                     f"{os.cpu_count()} cores")
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
