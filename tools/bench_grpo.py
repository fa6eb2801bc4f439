"""Seconds per full GRPO iteration: rollout + a simple host reward + one update.

  python tools/bench_grpo.py --hf_dir=DIR --prompts=8 --group=8 --completion=1024
  python tools/bench_grpo.py --make_random=3.5m --r1_shaped --hf_dir=/tmp/r1s --compare_trl
  python tools/bench_grpo.py --make_random=3.5m --hf_dir=/tmp/q3p5m --completion=64 \
      --compare_torch

Each iteration samples G completions per prompt with the current policy at temperature
1, scores them on the host (reward = share of even token ids: cheap and deterministic),
forms group advantages and applies one GRPO update (β = 0.04 against a frozen reference,
μ = 1, one mini-batch). Rows stop at the checkpoint's EOS when its config.json has one
(an R1-shaped checkpoint, `--r1_shaped`: heavy-tailed lengths), as training does; without
one every row runs to `completion` tokens. The update is padding-free (`--pack`, default):
completions packed into rows of prompt + completion tokens.

Warm-up iterations (compilation) are excluded; the medians of the rest are printed as one
JSON line, with `useful_tokens` (real completion tokens), `padded_tokens` (token positions
the update processed) and the update's useful-token FLOP/s as a fraction of the matmul
peak measured in the same run. Side by side, alternating iteration by iteration on the
same checkpoint and prompts: `--compare_trl`, TRL's GRPOTrainer (tools/trl_grpo.py; the
`bench` extra); `--compare_torch`, a plain PyTorch GRPO iteration (tools/torch_grpo.py,
fixed-length only).
"""

import json
import os
import platform
import statistics
import time

from absl import app, flags

from bench_common import (SHAPES, checkpoint_eos, make_random, matmul_peak, random_prompts,
                          update_flops, use_cpu_devices)

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint folder.")
_MAKE = flags.DEFINE_enum("make_random", None, list(SHAPES), "First write a random Qwen2 here.")
_R1 = flags.DEFINE_bool("r1_shaped", False, "With --make_random: a checkpoint that ends its "
                        "completions at EOS with heavy-tailed lengths (bench_common.make_random).")
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
_TRL = flags.DEFINE_bool("compare_trl", False, "Also time TRL's GRPOTrainer (tools/trl_grpo.py).")
_PAUSE = flags.DEFINE_float("pause_s", 1.0, "With a comparison: idle seconds before each "
                             "timed iteration.")
_PACK = flags.DEFINE_bool("pack", True, "Padding-free update (grpo.pack); else one sequence a row.")
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
    make_random(_HF_DIR.value, _MAKE.value, r1_shaped=_R1.value)
  import jax
  import numpy as np
  from r1jax.core import hf, sharding
  from r1jax.core.config import GRPOConfig, OptConfig
  from r1jax.generation import sampler
  from r1jax.generation.engine import Samples
  from r1jax.train import advantages, batches
  from r1jax.train.logprobs import LogProbs
  from r1jax.train.trainer import Trainer

  mesh = sharding.make_mesh((-1, 1, 1))
  cfg, params = hf.load_pretrained(_HF_DIR.value, mesh=mesh, compute_dtype=_DTYPE.value)
  g = _GROUP.value
  grpo = GRPOConfig(group_size=g, beta=_BETA.value, mu=1, temperature=1.0,
                    microbatches=_MICRO.value, pack=_PACK.value)
  trainer = Trainer(cfg, OptConfig(lr=1e-6), mesh, grpo)
  ref = LogProbs(cfg, grpo, mesh).make_ref(params) if _BETA.value else None
  state = trainer.init_state(params)
  smp = sampler.Sampler(cfg, mesh)
  eos = checkpoint_eos(_HF_DIR.value)
  sp = sampler.SamplingParams(temperature=1.0, max_new_tokens=_COMPLETION.value, eos_id=eos)
  prompts = random_prompts(cfg.vocab_size, _PROMPTS.value, _PROMPT_LEN.value)
  lengths: list[np.ndarray] = []

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
    batch, stats = trainer.pack(batches.rollout_batch(samples, adv))
    shared = int(stats.get("pack/shared_prompt_tokens", 0))
    padded = int(np.asarray(batch.tokens).size)
    state, metrics = trainer.rl_step(state, trainer.put_batch(batch), ref)
    jax.block_until_ready((state, metrics))
    t3 = time.perf_counter()
    comp = host.mask.sum(1)
    seqs = np.repeat(host.prompt_mask.sum(1), g) + comp
    if it >= 2:  # timed iterations only
      skipped.append(int(np.asarray(metrics["skipped"]).sum()))
      lengths.append(comp)
    return {"rollout_s": t1 - t0, "reward_s": t2 - t1, "update_s": t3 - t2, "step_s": t3 - t0,
            "useful_tokens": int(comp.sum()), "padded_tokens": padded,
            "shared_prompt_tokens": shared,
            "update_flops": update_flops(cfg, seqs, 4 if _BETA.value else 3, shared)}

  skipped: list[int] = []
  times = {"r1jax": [], "trl": [], "torch": []}
  if _TRL.value:
    import trl_grpo
    # TRL drives: after each TRL step, one r1jax iteration (warm-up ones included).
    def between(i):
      out = r1jax_step(i)
      if i >= 2:
        times["r1jax"].append(out)
    rows = trl_grpo.run(_HF_DIR.value, prompts, g, _COMPLETION.value, _BETA.value,
                        _DTYPE.value, even_share, 2 + _ITERS.value, between, _PAUSE.value)
    times["trl"] = rows[2:]
  else:
    steps = {"r1jax": r1jax_step}
    if _COMPARE.value:
      import torch_grpo
      steps["torch"] = torch_grpo.make_step(_HF_DIR.value, prompts, g, _COMPLETION.value,
                                            _BETA.value, _DTYPE.value, even_share)
    # Warm-up (compilation) first, then the engines take turns iteration by
    # iteration, so drift in the machine's speed hits both alike; the pause lets
    # the other engine's idle thread pool go quiet before the clock starts.
    for it in range(2 + _ITERS.value):
      for name, step in steps.items():
        if len(steps) > 1:
          time.sleep(_PAUSE.value)
        t = step(it)
        if it >= 2:
          times[name].append(t)
  median = lambda rows, k: round(statistics.median(r[k] for r in rows), 4)
  keys = ("step_s", "rollout_s", "reward_s", "update_s", "useful_tokens", "padded_tokens")
  result = {k: median(times["r1jax"], k) for k in keys}
  result["shared_prompt_tokens"] = median(times["r1jax"], "shared_prompt_tokens")
  peak = matmul_peak(mesh, _DTYPE.value)
  rates = [r["update_flops"] / r["update_s"] for r in times["r1jax"]]
  result.update(update_gflop_per_s=round(statistics.median(rates) / 1e9, 1),
                matmul_peak_gflop_per_s=round(peak / 1e9, 1),
                update_peak_fraction=round(statistics.median(rates) / peak, 3))
  for other in ("trl", "torch"):
    if times[other]:
      result.update({f"{other}_{k}": median(times[other], k) for k in keys})
      result[f"speedup_vs_{other}"] = round(result[f"{other}_step_s"] / result["step_s"], 2)
  comp = np.concatenate(lengths)
  result.update(params=cfg.num_params, sequences=_PROMPTS.value * g,
                completion=_COMPLETION.value, eos=eos, pack=_PACK.value,
                length_median=float(np.median(comp)), length_mean=round(float(comp.mean()), 1),
                length_max=int(comp.max()),
                at_budget=round(float((comp >= _COMPLETION.value).mean()), 3),
                beta=_BETA.value, dtype=_DTYPE.value,
                microbatches=_MICRO.value, cpu_devices=jax.device_count(),
                pause_s=_PAUSE.value if len(times["r1jax"]) and (_COMPARE.value or _TRL.value)
                else 0.0,
                iters=_ITERS.value, device=jax.devices()[0].device_kind,
                machine=f"{platform.machine()} {os.cpu_count()} cores",
                load_1m=round(os.getloadavg()[0], 2),
                skipped=sum(skipped))
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
