"""R1-Zero on an HF base model: the paper's hyperparameters where they apply, bf16, FSDP.

The recipe the Qwen2.5 R1-Zero experiments start from (r1_zero_qwen2p5_*.py). Weights and
tokenizer come from --config.model.hf_dir; data from local jsonl files:
  python -m r1jax.main --config=experiments/r1_zero_hf.py:preset=qwen2.5-1.5b,steps=400 \\
      --config.model.hf_dir=/data/Qwen2.5-1.5B --config.data.train=/data/gsm8k/train.jsonl \\
      --config.eval.benchmarks=/data/gsm8k/test.jsonl --workdir=/data/runs/r1z
"""

import ml_collections

from r1jax.core.config import eval_group, model_group, parse_arg
from r1jax.stages.rl import ANSWER_STOPS, rl_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, preset="qwen2.5-7b", steps=1000, max_new_tokens=4096, train="",
                benchmarks="")
  c = rl_config(steps=a.steps)
  # f32 master weights, bf16 compute: an AdamW step at lr 3e-6 is below half a bf16 ulp of
  # most weights, so bf16 weights would round most updates away.
  mixed = dict(param_dtype="float32", compute_dtype="bfloat16", remat="full")
  c.model = model_group(a.preset, **mixed)  # the HF base: f32 weights, bf16 compute, full remat
  c.mesh.shape = (1, -1, 1)  # FSDP over every chip of the slice / GPU of the host
  c.data.train = a.train  # local jsonl of problems
  c.data.batch = 32  # questions per step (paper: 32)
  c.sampler.max_new_tokens = a.max_new_tokens  # completion budget
  # Byte-level BPE tokenizes '</answer>' differently after a space, so both forms stop a
  # rollout; a form merged with other text runs on to EOS, and the format reward sees it.
  c.sampler.stop = ANSWER_STOPS  # both forms of the closing tag
  c.grpo.update(group_size=16, temperature=1.0, beta=0.001, eps_low=10.0, eps_high=10.0,
                mu=1, minibatches=16, loss_mode="grpo", ref_reset_every=400,
                ref_dtype="bfloat16", logits_chunk=256)  # paper: G 16, KL 0.001, eps 10
  c.opt.update(lr=3e-6, warmup_steps=10, weight_decay=0.0, grad_clip=1.0)  # paper: 3e-6
  c.rewards.num_workers = 8  # host processes grading rollouts
  held_out = dict(k=8, max_new_tokens=a.max_new_tokens, batch_size=64, every=50,
                  stop=ANSWER_STOPS)
  c.eval = eval_group(benchmarks=a.benchmarks, **held_out)  # pass@1 / cons@8 every 50 steps
  c.ckpt.update(every=25, keep=3)  # a checkpoint every 25 steps, the last 3 kept
  c.lock()
  return c
