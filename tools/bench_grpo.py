"""Seconds per full GRPO iteration: rollout + a simple host reward + one update.

  python tools/bench_grpo.py --hf_dir=DIR --prompts=8 --group=8 --completion=64
  python tools/bench_grpo.py --make_random=3.5m --hf_dir=/tmp/q3p5m

Each iteration samples G completions per prompt with the current policy
(temperature 1, no EOS so every row runs to `completion` tokens), scores them
on the host (reward = share of even token ids: cheap and deterministic),
forms group advantages and applies one GRPO update (β = 0.04 against a frozen
reference, μ = 1, one mini-batch). Warm-up iterations (compilation) are
excluded; the medians of the rest are printed as one JSON line.
"""

import json
import os
import platform
import statistics
import time

from absl import app, flags

from bench_common import SHAPES, make_random, random_prompts

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint folder.")
_MAKE = flags.DEFINE_enum("make_random", None, list(SHAPES), "First write a random Qwen2 here.")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "Prompts per iteration (B).")
_GROUP = flags.DEFINE_integer("group", 8, "Completions per prompt (G).")
_COMPLETION = flags.DEFINE_integer("completion", 64, "Completion tokens per row (T).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Longest prompt.")
_ITERS = flags.DEFINE_integer("iters", 6, "Timed iterations (after 2 warm-up ones).")
_BETA = flags.DEFINE_float("beta", 0.04, "KL coefficient (0 skips the reference forward).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype (params stay f32 for the optimizer).")
flags.mark_flag_as_required("hf_dir")


def main(argv):
  del argv
  if _MAKE.value:
    make_random(_HF_DIR.value, _MAKE.value)
  import jax
  import numpy as np
  from r1jax import hf, losses, rl, sampler, sharding
  from r1jax.config import GRPOConfig, OptConfig
  from r1jax.train_step import Trainer

  mesh = sharding.make_mesh((-1, 1, 1))
  cfg, params = hf.load_pretrained(_HF_DIR.value, mesh=mesh, compute_dtype=_DTYPE.value)
  g = _GROUP.value
  trainer = Trainer(cfg, OptConfig(lr=1e-6), mesh,
                    GRPOConfig(group_size=g, beta=_BETA.value, mu=1, temperature=1.0))
  ref = trainer.make_ref(params) if _BETA.value else None
  state = trainer.init_state(params)
  smp = sampler.Sampler(cfg, mesh)
  sp = sampler.SamplingParams(temperature=1.0, max_new_tokens=_COMPLETION.value)
  prompts = random_prompts(cfg.vocab_size, _PROMPTS.value, _PROMPT_LEN.value)
  times = {"rollout_s": [], "reward_s": [], "update_s": [], "step_s": []}
  for it in range(2 + _ITERS.value):
    t0 = time.perf_counter()
    rollout = jax.block_until_ready(
        smp.generate(state.params, prompts, sp, jax.random.key(it), group=g))
    t1 = time.perf_counter()
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    rewards = ((tokens % 2 == 0) & mask).sum(1) / np.maximum(mask.sum(1), 1)
    adv = losses.group_advantages(rewards, g)
    t2 = time.perf_counter()
    batch = trainer.put_batch(rl.to_batch(rollout, adv, g))
    state, metrics = trainer.rl_step(state, batch, ref)
    jax.block_until_ready((state, metrics))
    t3 = time.perf_counter()
    if it >= 2:
      for k, v in (("rollout_s", t1 - t0), ("reward_s", t2 - t1), ("update_s", t3 - t2),
                   ("step_s", t3 - t0)):
        times[k].append(v)
  result = {k: round(statistics.median(v), 4) for k, v in times.items()}
  result.update(params=cfg.num_params, sequences=_PROMPTS.value * g,
                completion=_COMPLETION.value, beta=_BETA.value, dtype=_DTYPE.value,
                device=jax.devices()[0].device_kind,
                machine=f"{platform.machine()} {os.cpu_count()} cores",
                load_1m=round(os.getloadavg()[0], 2),
                skipped=int(np.asarray(metrics["skipped"]).sum()))
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
