"""Seconds per full GRPO iteration of the rl stage: rollout, host reward, one update.

  python tools/bench_grpo.py --hf_dir=DIR --prompts=8 --group=8 --completion=1024
  python tools/bench_grpo.py --make_random=3.5m --r1_shaped --hf_dir=/tmp/r1s --compare_trl
  python tools/bench_grpo.py --make_random=3.5m --hf_dir=/tmp/q3p5m --completion=64 \
      --compare_torch

The r1jax side is the `rl` stage's own iteration (`stages/rl.py:setup` and `iteration`, in
a scratch workdir): the prompts go through the prompt pipeline (a jsonl of word-level
prompts, template "plain", the same ids), each iteration samples G completions per prompt
at temperature 1, scores them on the host with an inline reward (share of even token ids,
specials aside: cheap and deterministic), forms group advantages and applies one GRPO update (β = 0.04
against a frozen reference, its log-probs computed beside the rollout as the stage does;
μ = 1, one mini-batch). Rows stop at the checkpoint's EOS when its config.json has one (an
R1-shaped checkpoint, `--r1_shaped`: heavy-tailed lengths), as training does; without one
every row runs to `completion` tokens. The update is padding-free (`--pack`, default).

Warm-up iterations (compilation) are excluded; the medians of the rest are printed as one
JSON line (the stage's rollout / reward / update timers and the whole iteration), with
`useful_tokens` (real completion tokens), `padded_tokens` (token positions the update
processed) and the update's useful-token FLOP/s as a fraction of the matmul peak measured
in the same run. Side by side, alternating iteration by iteration on the same checkpoint and
prompts: `--compare_trl`, TRL's GRPOTrainer (tools/trl_grpo.py; the `bench` extra);
`--compare_torch`, a plain PyTorch GRPO iteration (tools/torch_grpo.py, fixed-length only).
"""

import json
import os
import platform
import statistics
import time

from absl import app, flags

from bench_common import (checkpoint_eos, checkpoint_flags, matmul_peak, random_prompts,
                          rollout_flags, update_flops)

_CKPT = checkpoint_flags()
_ROLL = rollout_flags("Compute dtype (params stay f32 for the optimizer).")
_COMPLETION = flags.DEFINE_integer("completion", 64, "Completion tokens per row (T).")
_ITERS = flags.DEFINE_integer("iters", 6, "Timed iterations (after 2 warm-up ones).")
_BETA = flags.DEFINE_float("beta", 0.04, "KL coefficient (0 skips the reference forward).")
_MICRO = flags.DEFINE_integer("microbatches", 1, "Gradient-accumulation micro-batches.")
_COMPARE = flags.DEFINE_bool("compare_torch", False,
                              "Also time a plain PyTorch GRPO iteration (tools/torch_grpo.py).")
_TRL = flags.DEFINE_bool("compare_trl", False, "Also time TRL's GRPOTrainer (tools/trl_grpo.py).")
_PAUSE = flags.DEFINE_float("pause_s", 1.0, "With a comparison: idle seconds before each "
                             "timed iteration.")
_PACK = flags.DEFINE_bool("pack", True, "Padding-free update (grpo.pack); else one sequence a row.")


def even_share(tokens, mask):
  """The benchmark's reward: the share of a completion's tokens that are even ids, special
  ones (pad, BOS, EOS: ids < 3) not counted as even (cheap, deterministic)."""
  import numpy as np
  return ((tokens % 2 == 0) & (tokens >= 3) & mask).sum(1) / np.maximum(mask.sum(1), 1)


def even_share_of_text(text: str, num_tokens: int) -> float:
  """The same reward on a completion's text: its words "tN" are the token ids (the
  checkpoint's word-level tokenizer; the text leaves the special tokens out, `num_tokens`
  counts them)."""
  return sum(int(w[1:]) % 2 == 0 for w in text.split()) / max(num_tokens, 1)


def rl_run(hf_dir: str, prompts: list[list[int]], workdir: str):
  """The rl stage's RLRun for this benchmark: the prompts as a jsonl, the reward inline."""
  import json as json_lib
  from r1jax.core.config import eval_group, model_group
  from r1jax.rewards import registry
  from r1jax.stages import rl as rl_stage

  path = os.path.join(workdir, "prompts.jsonl")
  with open(path, "w") as f:
    for i, p in enumerate(prompts):
      f.write(json_lib.dumps({"id": str(i), "prompt": " ".join(f"t{t}" for t in p),
                              "answer": "0", "task": "bench"}) + "\n")
  registry.register("bench_even_share", even_share_of_text, inputs=("num_tokens",),
                    kind="inline", overwrite=True)
  c = rl_stage.rl_config(steps=2 + _ITERS.value)
  c.model = model_group(hf_dir=hf_dir, compute_dtype=_ROLL.dtype.value)
  c.mesh.shape = (-1, 1, 1)
  c.data.update(train=path, adapter="generic", batch=len(prompts), template="plain",
                max_prompt_tokens=_ROLL.prompt_len.value + 1)  # + BOS
  c.sampler.update(max_new_tokens=_COMPLETION.value, stop=())
  c.grpo.update(group_size=_ROLL.group.value, beta=_BETA.value, mu=1, temperature=1.0,
                microbatches=_MICRO.value, pack=_PACK.value)
  c.opt.lr = 1e-6
  c.rewards.update(default_task="bench", num_workers=1,
                   components=[{"name": "bench_even_share", "weight": 1.0}])
  c.eval = eval_group(stop=())
  c.ckpt.every = 0
  return rl_stage, rl_stage.setup(c, os.path.join(workdir, "run"))


def main(argv):
  del argv
  hf_dir = _CKPT.prepare()
  import tempfile

  import numpy as np

  g = _ROLL.group.value
  eos = checkpoint_eos(hf_dir)
  vocab = json.load(open(os.path.join(hf_dir, "config.json")))["vocab_size"]
  prompts = random_prompts(vocab, _ROLL.prompts.value, _ROLL.prompt_len.value)
  scratch = tempfile.TemporaryDirectory(prefix="bench_grpo_")  # the stage's workdir
  rl_stage, rl = rl_run(hf_dir, prompts, scratch.name)
  bos = rl.tokenizer.bos_id  # the prompt pipeline starts each prompt with it, as training does
  prompts = [([] if bos is None else [bos]) + p for p in prompts]  # what every engine samples
  cfg, mesh = rl.cfg, rl.trainer.mesh
  seen = []  # each iteration's host samples, as the stage's engine hands them on
  collect = rl.engine.collect
  rl.engine.collect = lambda *a, **kw: seen.append(collect(*a, **kw)) or seen[-1]
  update_passes = 3 + (rl.ref_source is rl_stage.RefSource.UPDATE)
  lengths: list[np.ndarray] = []
  state = ref = None

  def r1jax_step(it):
    nonlocal state, ref
    t0 = time.perf_counter()
    state, ref, metrics, _ = rl_stage.iteration(rl, state, ref, it + 1)
    step_s = time.perf_counter() - t0
    smp = seen[-1]
    if it == 0:  # the stage saw the benchmark's own prompt ids and reward
      got = sorted(tuple(t[m]) for t, m in zip(smp.prompt_tokens, smp.prompt_mask))
      assert got == sorted(map(tuple, prompts)), "the prompt ids changed in the pipeline"
      want = float(np.mean(even_share(smp.tokens, smp.mask)))
      assert abs(metrics["reward/total"] - want) < 1e-5, (metrics["reward/total"], want)
    comp = smp.mask.sum(1)
    seqs = np.repeat(smp.prompt_mask.sum(1), g) + comp
    shared = int(metrics.get("pack/shared_prompt_tokens", 0))
    padded = (round((seqs.sum() - shared) / metrics["pack/fill"]) if "pack/fill" in metrics
              else smp.mask.shape[0] * (smp.prompt_mask.shape[1] + smp.mask.shape[1]))
    if it >= 2:  # timed iterations only
      skipped.append(int(metrics["skipped"]))
      lengths.append(comp)
    return {"rollout_s": metrics["time/rollout"], "reward_s": metrics["time/reward"],
            "update_s": metrics["time/update"], "step_s": step_s,
            "useful_tokens": int(comp.sum()), "padded_tokens": int(padded),
            "shared_prompt_tokens": shared,
            "update_flops": update_flops(cfg, seqs, update_passes, shared)}

  skipped: list[int] = []
  times = {"r1jax": [], "trl": [], "torch": []}
  with scratch, rl.loop, rl.scorer:
    _, state, ref, _ = rl_stage.initial_state(rl)
    _alternate(r1jax_step, hf_dir, prompts, times)
  _report(times, cfg, mesh, eos, lengths, skipped)


def _alternate(r1jax_step, hf_dir: str, prompts, times: dict) -> None:
  """Warm-up (compilation) first, then the engines take turns iteration by iteration, so
  drift in the machine's speed hits both alike; the pause lets the other engine's idle
  thread pool go quiet before the clock starts."""
  g = _ROLL.group.value
  if _TRL.value:
    import trl_grpo
    # TRL drives: after each TRL step, one r1jax iteration (warm-up ones included).
    def between(i):
      out = r1jax_step(i)
      if i >= 2:
        times["r1jax"].append(out)
    rows = trl_grpo.run(hf_dir, prompts, g, _COMPLETION.value, _BETA.value,
                        _ROLL.dtype.value, even_share, 2 + _ITERS.value, between, _PAUSE.value)
    times["trl"] = rows[2:]
  else:
    steps = {"r1jax": r1jax_step}
    if _COMPARE.value:
      import torch_grpo
      steps["torch"] = torch_grpo.make_step(hf_dir, prompts, g, _COMPLETION.value,
                                            _BETA.value, _ROLL.dtype.value, even_share)
    for it in range(2 + _ITERS.value):
      for name, step in steps.items():
        if len(steps) > 1:
          time.sleep(_PAUSE.value)
        t = step(it)
        if it >= 2:
          times[name].append(t)


def _report(times: dict, cfg, mesh, eos, lengths: list, skipped: list[int]) -> None:
  """The medians, the update's FLOP/s against the measured matmul peak, one JSON line."""
  import jax
  import numpy as np
  g = _ROLL.group.value
  median = lambda rows, k: round(statistics.median(r[k] for r in rows), 4)
  keys = ("step_s", "rollout_s", "reward_s", "update_s", "useful_tokens", "padded_tokens")
  result = {k: median(times["r1jax"], k) for k in keys}
  result["shared_prompt_tokens"] = median(times["r1jax"], "shared_prompt_tokens")
  peak = matmul_peak(mesh, _ROLL.dtype.value)
  rates = [r["update_flops"] / r["update_s"] for r in times["r1jax"]]
  result.update(update_gflop_per_s=round(statistics.median(rates) / 1e9, 1),
                matmul_peak_gflop_per_s=round(peak / 1e9, 1),
                update_peak_fraction=round(statistics.median(rates) / peak, 3))
  for other in ("trl", "torch"):
    if times[other]:
      result.update({f"{other}_{k}": median(times[other], k) for k in keys})
      result[f"speedup_vs_{other}"] = round(result[f"{other}_step_s"] / result["step_s"], 2)
  comp = np.concatenate(lengths)
  result.update(params=cfg.num_params, sequences=_ROLL.prompts.value * g,
                completion=_COMPLETION.value, eos=eos, pack=_PACK.value,
                length_median=float(np.median(comp)), length_mean=round(float(comp.mean()), 1),
                length_max=int(comp.max()),
                at_budget=round(float((comp >= _COMPLETION.value).mean()), 3),
                beta=_BETA.value, dtype=_ROLL.dtype.value,
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
