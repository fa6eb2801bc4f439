"""experiments/tiny_r1.py:quick shrunk to toy size for tests: every stage, a few steps each.

Loaded in-process by test_r1_pipeline.py and, as `--config=tests/tiny_r1_toy.py`, by the
`python -m r1jax.main` run that test kills.
"""

from pathlib import Path

import ml_collections

from r1jax.core.config import config_from_file

REPO = Path(__file__).resolve().parents[1]
# One-piece attention, no remat: tiny_r1's SFT query blocks and remat only change the speed
# of its SFT steps (the same math: test_train_step.py), and would compile longer here.
MODEL = dict(vocab_size=400, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64,
             max_position=512, attention_block=256, remat="none")
SHAPES = {"policy": MODEL, "student": {**MODEL, "hidden": 16, "heads": 2, "kv_heads": 1},
          "rm": {**MODEL, "layers": 1}}


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The quick pipeline at toy size: 2 steps a stage, 8 new tokens, a handful of prompts."""
  c.unlock()
  c.synthetic.update(corpus_docs=1500, train_problems=64, held_out_problems=8, vocab_size=400)
  c.scenarios.update(sft_general=8, sft_unsafe=8, pairs=64, eval_pairs=32, rl_math=8,
                     rl_general=8, rl_unsafe=4)  # tiny_r1's R1 mix: 0.4 / 0.4 / 0.2
  for name in c.order:
    s = c[name]
    kind = "rm" if s.stage == "reward_model" else "student" if "student" in name else "policy"
    s.model.update(SHAPES[kind])
    if s.stage in ("rl", "sft", "reward_model"):
      s.steps = 2
      s.ckpt.update(every=1, async_save=False)
    if s.stage == "reward_model":
      s.update(eval_every=2)
      s.data.batch = 8
    if s.stage == "sft":
      s.opt.update(total_steps=2, warmup_steps=1)
      s.data.update(batch=4, seq_len=256)  # R1-Zero prompts are ~100 toy tokens
    if s.stage == "rl":
      s.opt.update(total_steps=2, warmup_steps=1)
      s.data.update(batch=4, max_prompt_tokens=200)
      s.grpo.group_size = 2
      s.sampler.max_new_tokens = 8
      s.eval.update(k=2, max_new_tokens=8, batch_size=8, max_prompt_tokens=200, every=0)
      for m in s.rewards.get("models") or ():
        m.update(max_len=64, batch_size=8)
    if s.stage == "eval":
      s.eval.update(k=2, max_new_tokens=8, batch_size=8, max_prompt_tokens=200)
    if s.stage == "generate":
      s.k, s.sampler.max_new_tokens = 2, 8
      s.data.update(max_prompt_tokens=200, limit=min(s.data.limit, 8) if s.data.limit else 0)
      for m in s.rewards.get("models") or ():
        m.update(max_len=64, batch_size=8)
  c.lock()
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  seed = int(arg or 0)
  return shrink(config_from_file(REPO / "experiments" / "tiny_r1.py", f"quick,seed={seed}"))
