"""Seconds per full GRPO iteration: rollout + a simple host reward + one update.

  python tools/bench_grpo.py --hf_dir=DIR --prompts=8 --group=8 --completion=64
  python tools/bench_grpo.py --make_random=3.5m --hf_dir=/tmp/q3p5m

Each iteration samples G completions per prompt with the current policy
(temperature 1, no EOS so every row runs to `completion` tokens), scores them
on the host (reward = share of even token ids: cheap and deterministic),
forms group advantages and applies one GRPO update (β = 0.04 against a frozen
reference, μ = 1, one mini-batch). Warm-up iterations (compilation) are
excluded; the medians of the rest are printed as one JSON line. With
`--compare_torch` a plain PyTorch GRPO iteration (tools/torch_grpo.py: HF
generate, then the same loss with torch autograd and AdamW) runs on the same
checkpoint and prompts, alternating with r1jax's iterations.
"""

import json
import os
import platform
import statistics
import time

from absl import app, flags

from bench_common import SHAPES, make_random, random_prompts, use_cpu_devices

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint folder.")
_MAKE = flags.DEFINE_enum("make_random", None, list(SHAPES), "First write a random Qwen2 here.")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "Prompts per iteration (B).")
_GROUP = flags.DEFINE_integer("group", 8, "Completions per prompt (G).")
_COMPLETION = flags.DEFINE_integer("completion", 64, "Completion tokens per row (T).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Longest prompt.")
_ITERS = flags.DEFINE_integer("iters", 6, "Timed iterations (after 2 warm-up ones).")
_BETA = flags.DEFINE_float("beta", 0.04, "KL coefficient (0 skips the reference forward).")
_MICRO = flags.DEFINE_integer("microbatches", 1, "Gradient-accumulation micro-batches.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", -1, "CPU only: run on this many CPU devices, a (data) mesh over them. "
    "-1 (default): one per core; 0 = JAX's single device.")
_COMPARE = flags.DEFINE_bool("compare_torch", False,
                              "Also time a plain PyTorch GRPO iteration (tools/torch_grpo.py).")
_PAUSE = flags.DEFINE_float("pause_s", 1.0, "With --compare_torch: idle seconds before each "
                             "timed iteration.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype (params stay f32 for the optimizer).")
flags.mark_flag_as_required("hf_dir")


def even_share(tokens, mask):
  """The benchmark's reward: share of even token ids in each completion (cheap, deterministic)."""
  import numpy as np
  return ((tokens % 2 == 0) & mask).sum(1) / np.maximum(mask.sum(1), 1)


def main(argv):
  del argv
  use_cpu_devices(_CPU_DEVICES.value)
  if _MAKE.value:
    make_random(_HF_DIR.value, _MAKE.value)
  import jax
  import numpy as np
  from r1jax.core import hf, sharding
  from r1jax.core.config import GRPOConfig, OptConfig
  from r1jax.generation import sampler
  from r1jax.generation.engine import Samples
  from r1jax.train import advantages, batches
  from r1jax.train.trainer import Trainer

  mesh = sharding.make_mesh((-1, 1, 1))
  cfg, params = hf.load_pretrained(_HF_DIR.value, mesh=mesh, compute_dtype=_DTYPE.value)
  g = _GROUP.value
  trainer = Trainer(cfg, OptConfig(lr=1e-6), mesh,
                    GRPOConfig(group_size=g, beta=_BETA.value, mu=1, temperature=1.0,
                               microbatches=_MICRO.value))
  ref = trainer.make_ref(params) if _BETA.value else None
  state = trainer.init_state(params)
  smp = sampler.Sampler(cfg, mesh)
  sp = sampler.SamplingParams(temperature=1.0, max_new_tokens=_COMPLETION.value)
  prompts = random_prompts(cfg.vocab_size, _PROMPTS.value, _PROMPT_LEN.value)

  def r1jax_step(it):
    nonlocal state
    t0 = time.perf_counter()
    rollout = jax.block_until_ready(
        smp.generate(state.params, prompts, sp, jax.random.key(it), group=g))
    t1 = time.perf_counter()
    host = jax.device_get(rollout)
    samples = Samples(host.prompt_tokens, host.prompt_mask, host.tokens, host.mask,
                      host.logprobs, host.stop_reason, (), g)
    adv = advantages.group_advantages(even_share(host.tokens, host.mask), g)
    t2 = time.perf_counter()
    batch = trainer.put_batch(batches.rollout_batch(samples, adv))
    state, metrics = trainer.rl_step(state, batch, ref)
    jax.block_until_ready((state, metrics))
    if it >= 2:  # timed iterations only
      skipped.append(int(np.asarray(metrics["skipped"]).sum()))
    t3 = time.perf_counter()
    return {"rollout_s": t1 - t0, "reward_s": t2 - t1, "update_s": t3 - t2, "step_s": t3 - t0}

  steps = {"r1jax": r1jax_step}
  if _COMPARE.value:
    import torch_grpo
    steps["torch"] = torch_grpo.make_step(_HF_DIR.value, prompts, g, _COMPLETION.value,
                                          _BETA.value, _DTYPE.value, even_share)
  # Warm-up (compilation) first, then the engines take turns iteration by
  # iteration, so drift in the machine's speed hits both alike; the pause lets
  # the other engine's idle thread pool go quiet before the clock starts.
  skipped: list[int] = []
  times = {name: [] for name in steps}
  for it in range(2 + _ITERS.value):
    for name, step in steps.items():
      if len(steps) > 1:
        time.sleep(_PAUSE.value)
      t = step(it)
      if it >= 2:
        times[name].append(t)
  median = lambda rows, k: round(statistics.median(r[k] for r in rows), 4)
  keys = ("step_s", "rollout_s", "reward_s", "update_s")
  result = {k: median(times["r1jax"], k) for k in keys}
  if _COMPARE.value:
    result.update({f"torch_{k}": median(times["torch"], k) for k in keys})
    result["speedup"] = round(result["torch_step_s"] / result["step_s"], 2)
  result.update(params=cfg.num_params, sequences=_PROMPTS.value * g,
                completion=_COMPLETION.value, beta=_BETA.value, dtype=_DTYPE.value,
                microbatches=_MICRO.value, cpu_devices=jax.device_count(),
                pause_s=_PAUSE.value if _COMPARE.value else 0.0,
                device=jax.devices()[0].device_kind,
                machine=f"{platform.machine()} {os.cpu_count()} cores",
                load_1m=round(os.getloadavg()[0], 2),
                skipped=sum(skipped))
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
