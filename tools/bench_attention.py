"""Where the packed update's time goes: its gradient with each form of attention, side by side.

  python tools/bench_attention.py --make_random=3.5m --hf_dir=/tmp/q3p5m

On the benchmark model's shape, R1-shaped lengths (completions ~ exponential with mean
`--mean_length`, capped at `--completion`; prompts of 16–32 tokens; 8 × 8 samples) are packed
by `train/packing.py` as the RL stage packs them. The gradient of the packed hidden states is
timed (min of `--repeats`, after compiling) with:
- `causal_blocks`: each query block over every key up to its last query, the segment mask
  discarding other sequences' keys (an attention plan with no narrow windows);
- `causal_blocks_no_segment_mask`: the same keys without the segment mask (the unpacked
  path's work);
- `one_step`: windowed attention, all rows in one step (window = the widest row's);
- `per_device`: windowed, one row per device per step, rows in the packer's order;
- `per_device_unsorted`: the same with the rows shuffled;
- `no_attention`: attention replaced by the identity (the floor for everything else).
Prints one JSON line. Only the model's shape is read from `--hf_dir`; params are random.
"""

import json
import os
import platform
import time

from absl import app, flags

from bench_common import checkpoint_flags

_CKPT = checkpoint_flags()
_COMPLETION = flags.DEFINE_integer("completion", 1024, "Completion budget (cap).")
_MEAN = flags.DEFINE_float("mean_length", 330.0, "Mean of the uncapped completion lengths.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per form (the minimum is kept).")


def _batch(vocab: int, rng, rows_multiple: int):
  """A packed R1-shaped batch: 8 prompts × 8 samples."""
  import numpy as np
  from r1jax.core.config import GRPOConfig
  from r1jax.train import packing
  from r1jax.train.batches import RolloutBatch
  n, g, s, t = 64, 8, 32, _COMPLETION.value
  comp = np.minimum(t, np.ceil(rng.exponential(_MEAN.value, n))).astype(int)
  plen = np.repeat(rng.integers(16, s + 1, n // g), g)
  tokens = rng.integers(3, vocab, (n, s + t)).astype(np.int32)
  tokens[:, :s] = np.repeat(tokens[::g, :s], g, axis=0)
  pmask = np.arange(s)[None, :] >= (s - plen)[:, None]
  cmask = np.arange(t)[None, :] < comp[:, None]
  batch = RolloutBatch(tokens=tokens, mask=np.concatenate([pmask, cmask], 1),
                       completion_mask=cmask, old_logp=np.zeros((n, t), np.float32),
                       advantages=np.zeros(n, np.float32))
  packed, stats = packing.pack_rollout(batch, GRPOConfig(group_size=g), 0, rows_multiple)
  return packed, stats, comp


def main(argv):
  del argv
  hf_dir = _CKPT.prepare()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from r1jax.core import attention, hf, model, sharding

  mesh = sharding.make_mesh((-1, 1, 1))
  with open(os.path.join(hf_dir, "config.json")) as f:
    cfg = hf.config_from_hf(json.load(f))
  params = jax.jit(lambda k: model.init_params(cfg, k))(jax.random.key(0))
  lanes = mesh.shape["data"]
  packed, stats, comp = _batch(cfg.vocab_size, np.random.default_rng(0), lanes)
  rows = NamedSharding(mesh, P("data"))
  shuffled = np.random.default_rng(1).permutation(packed.tokens.shape[0])

  def put(order):
    return tuple(jax.device_put(np.asarray(x)[order], rows)
                 for x in (packed.tokens, packed.positions, packed.segment_ids))

  def grad(lanes, segments=True, windows=attention.WINDOW_STEPS):
    def loss(p, tok, pos, seg):
      plan = attention.plan(seg > 0, seg if segments else None, lanes=lanes, windows=windows)
      h = model.hidden_states(p, tok, cfg, plan, pos)
      return jnp.sum(jnp.where((seg > 0)[..., None], h, 0.0))
    return jax.jit(jax.grad(loss))

  def timed(fn, args):
    jax.block_until_ready(fn(params, *args))
    best = float("inf")
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, *args))
      best = min(best, time.perf_counter() - t0)
    return round(best, 3)

  ordered = put(np.arange(packed.tokens.shape[0]))
  result = {  # no narrow windows: every block over every key up to its last query
      "causal_blocks_s": timed(grad(None, windows=0), ordered)}
  result.update({
      "causal_blocks_no_segment_mask_s": timed(grad(None, segments=False), ordered),
      "one_step_s": timed(grad(None), ordered),
      "per_device_s": timed(grad(lanes), ordered),
      "per_device_unsorted_s": timed(grad(lanes), put(shuffled)),
  })
  keep = attention.blocked_attention
  attention.blocked_attention = lambda q, k, v, plan: q  # the identity: no attention at all
  try:
    result["no_attention_s"] = timed(grad(lanes), ordered)
  finally:
    attention.blocked_attention = keep
  result.update(rows=int(packed.tokens.shape[0]), row_len=int(packed.tokens.shape[1]),
                useful_tokens=int((np.asarray(packed.segment_ids) > 0).sum()),
                completion_median=float(np.median(comp)), completion_mean=float(comp.mean()),
                pack_fill=round(stats["pack/fill"], 3), attention_block=attention.ATTENTION_BLOCK,
                cpu_devices=jax.device_count(), params=cfg.num_params,
                machine=f"{platform.machine()} {os.cpu_count()} cores",
                load_1m=round(os.getloadavg()[0], 2))
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
