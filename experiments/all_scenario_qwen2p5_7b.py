"""All-scenario RL (R1, stage 4) on Qwen2.5-7B: rule rewards on math / code rows, reward
models on general rows, a safety model on every row, language consistency, temperature 0.7.

The policy starts from the rejection-sampling SFT checkpoint; the two 1.5B reward models come
from the `reward_model` stage (experiments/reward_model.py:model=qwen2.5-1.5b), one trained
on helpfulness pairs and one on safety pairs, each saved to WORKDIR/reward_model. All paths
are local folders.

TPU VM (v5p-16 or larger, every host runs the same command):
  python -m r1jax.main --config=experiments/all_scenario_qwen2p5_7b.py:\\
helpful_rm=/data/runs/rm_helpful/reward_model,safety_rm=/data/runs/rm_safety/reward_model,\\
rm_tokenizer=/data/Qwen2.5-1.5B-Instruct \\
      --config.model.init_from=/data/runs/rs_sft_7b/final --config.tokenizer=/data/Qwen2.5-7B \\
      --config.data.train=/data/mix/train.jsonl --workdir=gs://or/local/runs/stage4 --distributed
GPU host (8×H100): the same command without --distributed; the mesh is FSDP over the GPUs.

Mixture rows (one jsonl): {"question", "answer", "task": "math"}, {"question", "tests",
"task": "code"}, {"question", "task": "general"} (no gold: the helpfulness model judges it).
Each row's task picks its rewards (rewards.by_task below); a task with none is an error
before work, and so is a file whose task shares are off data.task_weights by more than 0.05.
Reward models see their view: helpfulness the summary after </think>, safety the whole
response, reasoning included, each in the chat template it was trained with; their scores
are normalised by the mean / std of each RM's held-out scores (its norm.json, written by the
reward_model stage when data.eval is set), so they sit on the rule rewards' scale and mean
the same in every run.
"""

import ml_collections

from r1jax.core.config import eval_group, model_group, parse_arg
from r1jax.stages.rl import rl_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, steps=1000, max_new_tokens=4096, helpful_rm="rm_helpful/reward_model",
                safety_rm="rm_safety/reward_model", rm_tokenizer="Qwen2.5-1.5B-Instruct")
  c = rl_config(steps=a.steps)
  c.model = model_group("qwen2.5-7b", param_dtype="float32",  # f32 master weights (r1_zero_hf)
                        compute_dtype="bfloat16", remat="full")  # weights: model.init_from
  c.mesh.shape = (1, -1, 1)  # FSDP over every chip of the slice / GPU of the host
  c.data.update(train="mix/train.jsonl", batch=32, template="chatml", max_prompt_tokens=1024)
  c.data.task_weights = ml_collections.ConfigDict(  # the file's mix (0.05 off fails)
      dict(math=0.5, code=0.2, general=0.3))
  c.sampler.max_new_tokens = a.max_new_tokens  # completion budget
  c.sampler.stop = ()  # the readable format ends at EOS, not at a tag
  c.grpo.update(group_size=16, temperature=0.7, beta=0.001, eps_low=10.0, eps_high=10.0,
                mu=1, minibatches=16, loss_mode="grpo", ref_reset_every=400,
                ref_dtype="bfloat16", logits_chunk=256)  # R1 stage 4: temperature 0.7
  c.opt.update(lr=3e-6, warmup_steps=10, weight_decay=0.0, grad_clip=1.0)
  rm = lambda name, path, view: {"name": name, "path": path, "tokenizer": a.rm_tokenizer,
                                 "template": "chatml", "view": view, "max_len": 4096,
                                 "batch_size": 16, "norm": "validation"}
  c.rewards = ml_collections.ConfigDict(dict(  # rewards/compose.py; models: rewards/model_specs.py
      task_field="task", default_task="math", num_workers=16, timeout_s=10.0, fallback=0.0,
      worker_memory_mb=4096,
      models=[rm("helpful", a.helpful_rm, "summary"), rm("safety", a.safety_rm, "full")],
      components=[{"name": "accuracy"}, {"name": "code"},
                  {"name": "format", "kwargs": {"require_answer_tag": False}},
                  {"name": "language", "kwargs": {"lang": "en"}},
                  {"name": "helpful", "fields": {"prompt": "question"}},
                  {"name": "safety", "fields": {"prompt": "question"}}],
      by_task={"math": {"accuracy": 1.0, "format": 0.5, "language": 0.1, "safety": 1.0},
               "code": {"code": 1.0, "format": 0.5, "language": 0.1, "safety": 1.0},
               "general": {"helpful": 1.0, "safety": 1.0}}))
  c.eval = eval_group(benchmarks="math500/test.jsonl", k=8,  # reasoning must not regress
                      max_new_tokens=a.max_new_tokens, batch_size=64, every=50,
                      template="chatml", stop=())
  c.ckpt.update(every=25, keep=3)
  c.lock()
  return c
