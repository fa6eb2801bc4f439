"""A CPU-sized model for smoke runs and tests: 3.5M-param Qwen2 shape, random init.

  python -m r1jax.main --config=experiments/tiny.py --workdir=/tmp/r1jax_tiny
  python -m r1jax.main --config=experiments/tiny.py:size=30m --workdir=/tmp/r1jax_30m
"""

import ml_collections

from r1jax.core.config import model_group, parse_arg

SIZES = {
    "tiny": dict(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, mlp_dim=768),
    "30m": dict(hidden=512, layers=8, heads=8, kv_heads=2, head_dim=64, mlp_dim=2048),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, size="tiny")
  if a.size not in SIZES:
    raise ValueError(f"size={a.size!r} not in {sorted(SIZES)}")
  c = ml_collections.ConfigDict()
  c.stage = "smoke"  # what main runs: smoke = sharded init + forward + report
  c.seed = 0  # PRNG seed for init and data
  c.model = model_group(vocab_size=1024, **SIZES[a.size])  # see r1jax/core/config.py
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 fills the devices
  c.smoke = ml_collections.ConfigDict()
  c.smoke.batch = 8  # sequences in the smoke forward
  c.smoke.seq_len = 64  # tokens per sequence (rows are left-padded to varied lengths)
  c.lock()
  return c
