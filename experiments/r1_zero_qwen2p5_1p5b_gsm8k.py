"""R1-Zero on Qwen2.5-1.5B (base) with GSM8K: GRPO straight from the base model.

On a TPU VM (v4-8 / v5e-8) or one GPU host, with the HF folder and the data copied locally:
  python -m r1jax.main --config=experiments/r1_zero_qwen2p5_1p5b_gsm8k.py \\
      --config.model.hf_dir=/data/Qwen2.5-1.5B \\
      --config.data.train=/data/gsm8k/train.jsonl \\
      --config.eval.benchmarks=/data/gsm8k/test.jsonl --workdir=/data/runs/r1z_1p5b
Multi-host slices add --distributed on every host. On a single GPU the same command runs on
its one device (install jax[cuda] first); lower --config.data.batch or raise
--config.grpo.microbatches if rollouts or the update do not fit. `:steps=N` shortens the run.
"""

import pathlib

import ml_collections

from r1jax.core.config import config_from_file, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, steps=400)
  c = config_from_file(pathlib.Path(__file__).with_name("r1_zero_hf.py"),
                       f"preset=qwen2.5-1.5b,steps={a.steps},max_new_tokens=1024,"
                       "train=gsm8k/train.jsonl,benchmarks=gsm8k/test.jsonl")
  c.data.adapter = "gsm8k"  # question + answer ending in '#### N'
  c.lock()
  return c
