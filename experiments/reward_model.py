"""Bradley–Terry reward model on preference pairs (helpfulness / safety for all-scenario RL).

  python -m r1jax.main --config=experiments/reward_model.py:model=qwen2.5-1.5b \\
      --config.model.hf_dir=/data/Qwen2.5-1.5B-Instruct --config.tokenizer=/data/Qwen2.5-1.5B-Instruct \\
      --config.data.train=prefs/train.jsonl --config.data.eval=prefs/eval.jsonl --workdir=/tmp/rm
Rows are {"prompt", "chosen", "rejected"}. The trained model is saved to
WORKDIR/reward_model and plugs into RL via r1jax.rewards.reward_model.RewardModel.
Re-running the same command resumes from WORKDIR/checkpoints.
A 7B reward model (model=qwen2.5-7b, 32 pairs of 1,024 tokens a step) is sized for a v5p-8
(`v5p:2x2x1`): its update needs 42 % of a chip's HBM there (benchmarks/aot/).
"""

import ml_collections

from r1jax.core.config import PRESETS, model_group, parse_arg
from r1jax.stages.reward_model import reward_model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, model="tiny")
  if a.model != "tiny" and a.model not in PRESETS:
    raise ValueError(f"model={a.model!r} not in {['tiny', *sorted(PRESETS)]}")
  real = a.model != "tiny"
  c = reward_model_config(steps=2000 if real else 60)
  c.model = (model_group(a.model, param_dtype="float32",  # f32 master weights (r1_zero_hf)
                         compute_dtype="bfloat16", remat="full")
             if real else model_group(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32,
                                      mlp_dim=256))
  c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor)
  c.data.template = "chatml" if real else "plain"  # chat template around the prompt
  c.data.max_len = 1024 if real else 64  # tokens per (prompt + response); the end is kept
  c.data.batch = 32 if real else 16  # preference pairs per step
  c.log_every = 10  # steps between console progress lines
  c.eval_every = 200 if real else 30  # steps between held-out pairwise accuracy checks
  c.opt.update(lr=1e-5 if real else 3e-3, warmup_steps=50 if real else 0, grad_clip=1.0)
  c.ckpt.every = 200 if real else 20  # steps between checkpoints
  c.lock()
  return c
