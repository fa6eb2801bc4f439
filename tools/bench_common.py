"""Shared by the bench_* tools: random HF checkpoints of the benchmark shapes, prompts."""

import numpy as np

SHAPES = {
    "3.5m": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=768, vocab_size=1024),
    "30m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, intermediate_size=2048, vocab_size=1024),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
}


def use_cpu_devices(n: int) -> None:
  """Before JAX starts: expose n CPU devices (0 = JAX's default of one; -1 = one per core,
  as `python -m r1jax.main` does)."""
  import os

  import jax
  from r1jax.core import sharding
  n = sharding.cpu_devices_to_request(n, os.environ.get("XLA_FLAGS", ""),
                                      os.environ.get("JAX_NUM_CPU_DEVICES", ""))
  if n:
    jax.config.update("jax_num_cpu_devices", n)


def make_random(path: str, shape: str) -> None:
  """Writes a randomly initialised Qwen2 of a benchmark shape as an HF folder."""
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.Qwen2Config(tie_word_embeddings=True, max_position_embeddings=4096,
                                    **SHAPES[shape])
  transformers.Qwen2ForCausalLM(config).save_pretrained(path)


def random_prompts(vocab: int, batch: int, longest: int, seed: int = 0) -> list[list[int]]:
  """`batch` prompts of random ids, lengths uniform in [longest/2, longest]."""
  rng = np.random.default_rng(seed)
  return [list(map(int, rng.integers(10, vocab, rng.integers(longest // 2, longest + 1))))
          for _ in range(batch)]
