"""Bradley–Terry reward model on preference pairs (helpfulness / safety for all-scenario RL).

  python -m r1jax.main --config=experiments/reward_model.py:model=qwen2.5-1.5b \\
      --config.model.hf_dir=/data/Qwen2.5-1.5B-Instruct --config.tokenizer=/data/Qwen2.5-1.5B-Instruct \\
      --config.data.train=prefs/train.jsonl --config.data.eval=prefs/eval.jsonl --workdir=/tmp/rm
Rows are {"prompt", "chosen", "rejected"}. The trained model is saved to
WORKDIR/reward_model and plugs into RL via r1jax.rewards.model.RewardModel.
"""

import ml_collections

from r1jax.config import PRESETS, model_group, opt_group, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, model="tiny")
  if a.model != "tiny" and a.model not in PRESETS:
    raise ValueError(f"model={a.model!r} not in {['tiny', *sorted(PRESETS)]}")
  real = a.model != "tiny"
  c = ml_collections.ConfigDict()
  c.stage = "reward_model"  # Bradley–Terry training, then save WORKDIR/reward_model
  c.seed = 0  # PRNG seed for init and data order
  c.model = (model_group(a.model, param_dtype="bfloat16",  # backbone shape (hf_dir loads weights)
                         compute_dtype="bfloat16", remat="full")
             if real else model_group(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32,
                                      mlp_dim=256))
  c.tokenizer = ""  # sentencepiece .model or HF folder with tokenizer.json
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor)
  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # preference jsonl: {"prompt", "chosen", "rejected"} per line
  c.data.eval = ""  # held-out preference jsonl ('' = no eval)
  c.data.template = "chatml" if real else "plain"  # chat template around the prompt
  c.data.max_len = 1024 if real else 64  # tokens per (prompt + response); the end is kept
  c.data.batch = 32 if real else 16  # preference pairs per step
  c.steps = 2000 if real else 60  # optimizer steps
  c.log_every = 10  # steps between metric lines in WORKDIR/metrics.jsonl
  c.eval_every = 200 if real else 30  # steps between held-out pairwise accuracy checks
  c.opt = opt_group(lr=1e-5 if real else 3e-3, warmup_steps=50 if real else 0,  # AdamW
                    grad_clip=1.0)
  c.lock()
  return c
