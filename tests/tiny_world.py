"""A tiny synthetic RL world for loop tests: data, tokenizer and stage configs (no downloads)."""

from pathlib import Path

import ml_collections

from r1jax.core.config import eval_group, model_group
from r1jax.core.tokenizer import train_sentencepiece
from r1jax.data import synthetic
from r1jax.stages.rl import rl_config
from r1jax.stages.sft import sft_config

MODEL = dict(vocab_size=384, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64,
             max_position=256)


def make_world(root: Path) -> dict[str, str]:
  """Corpus, RL prompts, held-out problems and a sentencepiece tokenizer under root."""
  paths = synthetic.write_dataset(root, corpus_docs=400, train_problems=64,
                                  held_out_problems=8, seed=0)
  tok = train_sentencepiece(synthetic.tokenizer_texts(paths["corpus"], limit=400),
                            root / "tokenizer", MODEL["vocab_size"])
  return {**{k: str(v) for k, v in paths.items()}, "tokenizer": str(tok)}


def rl_test_config(world: dict, steps: int = 4, **model_overrides) -> ml_collections.ConfigDict:
  """GRPO on the tiny world: 4 prompts x 4 samples, 12 new tokens, checkpoint every step."""
  c = rl_config(steps=steps)
  c.tokenizer = world["tokenizer"]
  c.model = model_group(**{**MODEL, **model_overrides})
  c.data.train = world["rl_train"]
  c.data.batch = 4
  c.data.template = "plain"  # the bare question: short prompts, fast tests
  c.data.max_prompt_tokens = 32
  c.sampler.max_new_tokens = 12
  c.grpo.update(group_size=4, beta=0.04, mu=2, minibatches=2)
  c.opt.update(lr=1e-3)
  c.rewards.num_workers = 1
  c.rewards.components = [{"name": "accuracy", "weight": 1.0, "tasks": ["math"]},
                          {"name": "tag_count", "weight": 0.5}]
  c.eval = eval_group(benchmarks="", k=2, max_new_tokens=12, batch_size=8, template="plain",
                      max_prompt_tokens=32)
  c.ckpt.update(every=1, keep=10, async_save=True)
  c.log_every = 1
  c.tensorboard = False
  return c


def sft_test_config(world: dict, steps: int = 6) -> ml_collections.ConfigDict:
  c = sft_config(steps=steps)
  c.tokenizer = world["tokenizer"]
  c.model = model_group(**MODEL)
  c.data.train = world["corpus"]
  c.data.batch = 8
  c.data.seq_len = 128
  c.opt.update(lr=3e-3, warmup_steps=2)
  c.ckpt.update(every=2, keep=5)
  c.log_every = 1
  c.tensorboard = False
  return c
