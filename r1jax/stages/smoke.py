"""The `smoke` stage: sharded init (or HF load) and one forward, reported as JSON.

It checks an install, a device and a mesh end to end in seconds, and is the GPU
smoke test when an accelerator is available.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r1jax.core import model as model_lib
from r1jax.core import sharding
from r1jax.core.storage import Path
from r1jax.core.weights import load_model


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  """Sharded init (or HF load) + one forward on a left-padded batch; reports a JSON line."""
  mesh = sharding.make_mesh(config.mesh.shape)
  t0 = time.perf_counter()
  cfg, params = load_model(config.model, mesh, seed=config.seed)
  jax.block_until_ready(params)
  init_s = time.perf_counter() - t0
  b, t = config.smoke.batch, config.smoke.seq_len
  rng = np.random.default_rng(config.seed)
  tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
  lengths = rng.integers(1, t + 1, b)
  mask = np.arange(t)[None, :] >= (t - lengths)[:, None]  # left padding
  batch = sharding.batch_sharding(mesh, (b, t))
  fwd = jax.jit(lambda p, x, m: model_lib.forward(p, x, cfg, mask_BxT=m),
                in_shardings=(jax.tree.map(lambda a: a.sharding, params), batch, batch))
  t0 = time.perf_counter()
  compiled = fwd.lower(params, tokens, mask).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  logits = jax.block_until_ready(compiled(params, jax.device_put(tokens, batch),
                                          jax.device_put(mask, batch)))
  step_s = time.perf_counter() - t0
  finite = bool(jnp.all(jnp.isfinite(logits)))
  per_device = sharding.bytes_per_device(params)
  report = dict(stage="smoke", devices=jax.device_count(), platform=jax.devices()[0].platform,
                mesh=dict(mesh.shape), params=cfg.num_params,
                param_bytes=sharding.tree_bytes(params),
                max_param_bytes_per_device=max(per_device.values()),
                logits_shape=list(logits.shape), logits_finite=finite,
                init_s=round(init_s, 3), compile_s=round(compile_s, 3),
                forward_s=round(step_s, 4), tokens_per_s=round(b * t / step_s, 1))
  (workdir / "smoke.json").write_text(json.dumps(report, indent=2))
  print(json.dumps(report))
  if not finite:
    raise FloatingPointError("smoke forward produced non-finite logits")
  return report


