"""R1-Zero on Qwen2.5-7B (base) with MATH: the paper's hyperparameters where they apply.

lr 3e-6, KL 0.001, clip ratio 10, temperature 1, G = 16, 32 questions per step split into 16
mini-batches, reference reset every 400 steps. The paper's 32k-token rollouts do not fit this
sampler's dense KV cache on one host; 4096 new tokens does on a v5p-8 / 8×H100 with FSDP.
  python -m r1jax.main --config=experiments/r1_zero_qwen2p5_7b_math.py \\
      --config.model.hf_dir=/data/Qwen2.5-7B --config.data.train=/data/math/train.jsonl \\
      --config.eval.benchmarks=/data/math500/test.jsonl,/data/aime24/test.jsonl \\
      --workdir=/data/runs/r1z_7b --distributed
"""

import pathlib

import ml_collections

from r1jax.core.config import config_from_file, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, steps=1000, max_new_tokens=4096)
  c = config_from_file(pathlib.Path(__file__).with_name("r1_zero_hf.py"),
                       f"preset=qwen2.5-7b,steps={a.steps},max_new_tokens={a.max_new_tokens},"
                       "train=math/train.jsonl,benchmarks=math500/test.jsonl")
  c.data.adapter = "math"  # problem + solution (gold: answer field or last \boxed{})
  c.data.max_prompt_tokens = 1024  # MATH problems run longer than GSM8K's
  c.eval.max_prompt_tokens = 1024  # the same limit for MATH-500 / AIME prompts
  c.lock()
  return c
