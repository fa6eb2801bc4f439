"""Real model shapes (Qwen2.5-0.5B/1.5B/7B, Llama-3.1-8B): random init or HF weights.

  python -m r1jax.main --config=experiments/pretrained.py:model=qwen2.5-1.5b \\
      --config.model.hf_dir=/path/to/Qwen2.5-1.5B --workdir=/tmp/smoke_1p5b
Without hf_dir the preset's shape is initialised randomly on the mesh (never on
one device), which checks memory and sharding before a real run.
"""

import ml_collections

from r1jax.core.config import PRESETS, model_group, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, model="qwen2.5-1.5b", fsdp=-1, tensor=1)
  if a.model not in PRESETS:
    raise ValueError(f"model={a.model!r} not in {sorted(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.stage = "smoke"  # what main runs: smoke = sharded init/load + forward + report
  c.seed = 0  # PRNG seed for init and data
  c.model = model_group(a.model, param_dtype="bfloat16",  # bf16: accelerator runs
                        compute_dtype="bfloat16", remat="full")
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, a.fsdp, a.tensor)  # (data, fsdp, tensor): FSDP over all devices
  c.smoke = ml_collections.ConfigDict()
  c.smoke.batch = 8  # sequences in the smoke forward
  c.smoke.seq_len = 512  # tokens per sequence
  c.lock()
  return c
