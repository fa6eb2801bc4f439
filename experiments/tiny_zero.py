"""R1-Zero in miniature, on a laptop CPU with nothing downloaded (README's main command).

  python -m r1jax.main --config=experiments/tiny_zero.py --workdir=/tmp/r1jax_zero
  python -m r1jax.main --config=experiments/tiny_zero.py:quick --workdir=/tmp/z  # a few minutes, smaller

1. data: synthetic multi-step arithmetic (r1jax/data/synthetic.py): RL prompts, a held-out split,
   and a "web" corpus that works such problems in several styles (a few with <think> tags)
   but never uses the R1-Zero instruction template.
2. base: a 0.92M-parameter Qwen2-shaped model pretrained on that corpus (the `sft` stage).
3. rl: GRPO from the base with the R1-Zero template, accuracy + format rewards, G = 8;
   held-out pass@1 and format are measured before the first update and after the last.
4. report: WORKDIR/report.md, report.json and curves/*.png.
Re-running the command resumes: finished stages are skipped, RL resumes from its checkpoint.
"""

import ml_collections

from r1jax.core.config import eval_group, model_group, parse_arg
from r1jax.stages.rl import rl_config
from r1jax.stages.sft import sft_config

MODEL = dict(vocab_size=512, hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32,
             mlp_dim=384, max_position=512, tie_embeddings=True)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, quick=False, base_steps=1500, rl_steps=250)
  quick = a.quick
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"  # data -> base (sft) -> rl -> report, see r1jax/stages/pipeline.py
  c.seed = 0  # seeds the synthetic data, the init, data order and sampling
  c.allow_changes = ""  # fields a re-run may change in a stage that ran, e.g. "rl.steps"

  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.corpus_docs = 20000 if quick else 120000  # pretraining documents
  c.synthetic.train_problems = 4000  # RL prompts (train split)
  c.synthetic.held_out_problems = 64 if quick else 256  # held-out eval problems
  c.synthetic.vocab_size = MODEL["vocab_size"]  # sentencepiece vocabulary

  tok = "{workdir}/data/tokenizer.model"
  b = sft_config(steps=200 if quick else a.base_steps)
  b.seed = c.seed
  b.tokenizer = tok
  b.model = model_group(**MODEL)
  b.data.train = "{workdir}/data/corpus.jsonl"
  b.data.batch = 16  # packed rows of 256 tokens: ~4k tokens per step
  b.data.seq_len = 256
  b.opt.update(lr=2e-3, warmup_steps=50, schedule="cosine", total_steps=b.steps,
               final_lr_ratio=0.1, weight_decay=0.1)
  b.ckpt.every = 500
  b.log_every = 50
  c.base = b  # the `sft` stage config of the base pretraining

  r = rl_config(steps=20 if quick else a.rl_steps)
  r.seed = c.seed
  r.tokenizer = tok
  r.model = model_group(**MODEL)
  r.model.init_from = "{workdir}/base/final"
  r.data.train = "{workdir}/data/rl_train.jsonl"
  r.data.batch = 8  # prompts per iteration (x 8 samples = 64 completions)
  r.data.max_prompt_tokens = 104  # also the sampler's prompt bucket: prompts are 90-98 tokens
  r.sampler.max_new_tokens = 64
  r.grpo.update(group_size=8, beta=0.0, eps_low=0.2, eps_high=0.28, loss_mode="bnpo")
  r.opt.update(lr=2e-4, warmup_steps=5, grad_clip=1.0)
  r.rewards.components = [{"name": "accuracy", "weight": 1.0, "tasks": ["math"]},
                          {"name": "format", "weight": 0.5}]
  r.rewards.num_workers = 1
  r.eval = eval_group(benchmarks="{workdir}/data/held_out.jsonl", k=4, max_new_tokens=64,
                      batch_size=64, max_prompt_tokens=128, every=0 if quick else 50)
  r.ckpt.every = 50
  r.log_every = 10
  c.rl = r  # the `rl` stage config (GRPO from the base)
  c.lock()
  return c
