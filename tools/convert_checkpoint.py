"""Converts between HF folders and r1jax (orbax) params checkpoints.

  python tools/convert_checkpoint.py --hf_dir=Qwen2.5-1.5B --out=ckpt/qwen1p5b     # HF -> r1jax
  python tools/convert_checkpoint.py --ckpt=ckpt/step_400 --out_hf=export/          # r1jax -> HF
  python tools/convert_checkpoint.py --hf_dir=A --out_hf=B --dtype=bfloat16         # re-dtype/re-shard

Weights move one tensor at a time through the devices of a (1, -1, 1) FSDP mesh,
so a 7B checkpoint never sits whole in one place.
"""

import json

from absl import app, flags

from r1jax.core import checkpoint
from r1jax.core import hf
from r1jax.core import sharding

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Source HF folder (config.json + safetensors).")
_CKPT = flags.DEFINE_string("ckpt", None, "Source r1jax params checkpoint folder.")
_OUT = flags.DEFINE_string("out", None, "Destination r1jax params checkpoint folder.")
_OUT_HF = flags.DEFINE_string("out_hf", None, "Destination HF folder.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Storage dtype of the output (default: the source's).")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 4.0, "Largest HF safetensors shard, in GB.")


def main(argv):
  del argv
  if (_HF_DIR.value is None) == (_CKPT.value is None):
    raise app.UsageError("give exactly one source: --hf_dir or --ckpt")
  if (_OUT.value is None) == (_OUT_HF.value is None):
    raise app.UsageError("give exactly one destination: --out or --out_hf")
  mesh = sharding.make_mesh((1, -1, 1))
  overrides = {"param_dtype": _DTYPE.value} if _DTYPE.value else {}
  if _HF_DIR.value:
    cfg, params = hf.load_pretrained(_HF_DIR.value, mesh=mesh, **overrides)
  else:
    cfg, params = checkpoint.load_params(_CKPT.value, mesh=mesh, **overrides)
  if _OUT.value:
    out = checkpoint.save_params(_OUT.value, params, cfg)
  else:
    out = hf.save_pretrained(cfg, params, _OUT_HF.value,
                             max_shard_bytes=int(_SHARD_GB.value * 2**30))
  print(json.dumps({"out": str(out), "params": cfg.num_params, "dtype": cfg.param_dtype}))


if __name__ == "__main__":
  app.run(main)
