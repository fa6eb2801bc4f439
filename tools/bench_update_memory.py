"""Peak host memory of one GRPO update on long completions at a real vocabulary.

  python tools/bench_update_memory.py --rows=16 --completion=8192 --vocab=151936

A tiny-width random Qwen2-shaped model (the width does not matter here: the vocabulary and
the length do) takes one GRPO update (β > 0, so the reference log-probs are computed too)
on `rows` completions of `completion` tokens. Full logits would be rows × T × V f32: 80 GB
at 16 × 8,192 × 151,936. The update never builds them: log-probs and entropy are computed
`logits_chunk` positions at a time under remat (train/losses.py), attention one block of
queries at a time (core/attention.py), and rows go through in `microbatches`, packed as
the RL stage packs them (`--pack`, the default; at one sample per micro-batch, one per row).
Prints one JSON line: peak RSS (the process's high-water mark, runtime included), the step
time and what full logits would have needed.
"""

import json
import os
import platform
import resource
import time

from absl import app, flags

from bench_common import cpu_devices_flag, use_cpu_devices

_ROWS = flags.DEFINE_integer("rows", 16, "Completions in the batch (N).")
_COMPLETION = flags.DEFINE_integer("completion", 8192, "Completion tokens per row (T).")
_PROMPT = flags.DEFINE_integer("prompt", 64, "Prompt tokens per row.")
_VOCAB = flags.DEFINE_integer("vocab", 151936, "Vocabulary (Qwen2.5: 151,936).")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Model width.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Decoder layers.")
_MICRO = flags.DEFINE_integer("microbatches", 16, "Gradient-accumulation micro-batches.")
_CHUNK = flags.DEFINE_integer("logits_chunk", 128, "Completion positions per unembed chunk.")
_CPU_DEVICES = cpu_devices_flag(0)
_PACK = flags.DEFINE_bool("pack", True, "Padding-free update (grpo.pack, the default): the "
                          "real tokens in packed rows; else one sequence a row.")


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main(argv):
  del argv
  use_cpu_devices(_CPU_DEVICES.value)
  import jax
  import numpy as np
  from r1jax.core import attention, sharding
  from r1jax.core.config import GRPOConfig, ModelConfig, OptConfig
  from r1jax.train.batches import RolloutBatch
  from r1jax.train.logprobs import LogProbs
  from r1jax.train.trainer import Trainer

  n, t, s = _ROWS.value, _COMPLETION.value, _PROMPT.value
  cfg = ModelConfig(vocab_size=_VOCAB.value, hidden=_HIDDEN.value, layers=_LAYERS.value,
                    heads=2, kv_heads=1, head_dim=32, mlp_dim=4 * _HIDDEN.value,
                    max_position=s + t, tie_embeddings=True)
  mesh = sharding.make_mesh((-1, 1, 1))
  g = GRPOConfig(group_size=n, beta=0.04, mu=1, microbatches=_MICRO.value,
                 logits_chunk=_CHUNK.value, pack=_PACK.value)
  trainer = Trainer(cfg, OptConfig(lr=1e-6), mesh, g)
  state = trainer.init_state_random(jax.random.key(0))
  ref = LogProbs(cfg, g, mesh).make_ref(state.params)
  rng = np.random.default_rng(0)
  lengths = rng.integers(t // 8, t + 1, n)  # uneven, some at the budget
  lengths[0] = t
  comp_mask = np.arange(t)[None, :] < lengths[:, None]
  tokens = rng.integers(0, cfg.vocab_size, (n, s + t)).astype(np.int32)
  mask = np.concatenate([np.ones((n, s), bool), comp_mask], axis=1)
  batch = RolloutBatch(tokens=tokens, mask=mask, completion_mask=comp_mask,
                       old_logp=np.full((n, t), -np.log(cfg.vocab_size), np.float32),
                       advantages=rng.standard_normal(n).astype(np.float32))
  batch, _ = trainer.pack(batch)
  positions = int(np.asarray(batch.tokens).size)
  before = _peak_rss_gb()
  t0 = time.perf_counter()
  state, metrics = trainer.rl_step(state, trainer.put_batch(batch), ref)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - t0
  loss = np.asarray(metrics["loss"])
  print(json.dumps({
      "peak_rss_gb": round(_peak_rss_gb(), 3), "rss_before_step_gb": round(before, 3),
      "step_s_with_compile": round(seconds, 1), "loss_finite": bool(np.isfinite(loss).all()),
      "rows": n, "completion": t, "prompt": s, "vocab": cfg.vocab_size,
      "useful_tokens": int(lengths.sum()), "params": cfg.num_params,
      "full_logits_gb": round(n * t * cfg.vocab_size * 4 / 2**30, 1),
      "microbatches": _MICRO.value, "logits_chunk": _CHUNK.value, "pack": _PACK.value,
      "positions": positions,
      "attention_block": attention.ATTENTION_BLOCK, "cpu_devices": jax.device_count(),
      "device": jax.devices()[0].device_kind,
      "machine": f"{platform.machine()} {os.cpu_count()} cores"}))


if __name__ == "__main__":
  app.run(main)
